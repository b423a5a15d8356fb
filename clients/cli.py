"""`pagedserve`: the user command line. Subcommands are added as the services grow."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from clients import simulate_command
from scheduler_svc.errors import InvalidArgumentError


def build_parser() -> argparse.ArgumentParser:
    """The `pagedserve` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="pagedserve", description="PagedAttention LLM serving.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    simulate = commands.add_parser(
        "simulate", help="run the scheduler on a synthetic trace against the simulated executor (no GPU)",
        description=simulate_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    simulate_command.add_arguments(simulate)
    simulate.set_defaults(handler=simulate_command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except InvalidArgumentError as err:
        print(f"pagedserve {args.command}: invalid {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
