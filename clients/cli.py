"""`pagedserve`: the user command line. Subcommands are added as the services grow."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Protocol

from clients import (
    bench_command,
    generate_command,
    healthcheck_command,
    info_command,
    serve_command,
    simulate_command,
)
from clients.client import PagedServeError
from pagedserve.errors import InvalidArgumentError
from pagedserve.settings import HelpFormatter, add_version_argument, error_line


class Command(Protocol):
    """A subcommand module: its docstring is the description, and it defines these two functions."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds the subcommand's flags."""

    def run(self, args: argparse.Namespace) -> int:
        """Runs it; returns the exit status."""


# Subcommand name -> (module, one-line help). A new subcommand is one more entry here.
COMMANDS: dict[str, tuple[Command, str]] = {
    "serve": (serve_command, "start a scheduler and its executors here and serve until interrupted"),
    "simulate": (simulate_command,
                 "run the scheduler on a synthetic trace against the simulated executor (no GPU)"),
    "bench": (bench_command, "benchmark serving throughput and latency on a synthetic workload"),
    "generate": (generate_command, "stream a completion of one prompt from a running server"),
    "info": (info_command, "describe the served model and its KV cache"),
    "healthcheck": (healthcheck_command, "exit 0 when the server is SERVING (for docker HEALTHCHECK)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The `pagedserve` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="pagedserve", description="PagedAttention LLM serving.",
                                     formatter_class=HelpFormatter)
    add_version_argument(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=module.__doc__,
                                      formatter_class=HelpFormatter)
        add_version_argument(command)
        module.add_arguments(command)
        command.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InvalidArgumentError as err:
        print(error_line(f"pagedserve {args.command}", err), file=sys.stderr)
        return 2
    except PagedServeError as err:
        print(f"pagedserve {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
