"""`pagedserve-scheduler`: run the scheduler service alone.

It serves the client API (pagedserve.v1.GenerationService, health, reflection) on --host/--port and
the OpenAI-compatible HTTP API on --http-port (0: none), connects to the executor ranks listed in
--executor-addresses (host:port, comma-separated, in rank order), and exposes Prometheus metrics on
--metrics-port. Every setting is a flag, a PAGEDSERVE_<FLAG> environment variable and a key of the
--config file (TOML or YAML); a flag wins over the environment, which wins over the file.
`pagedserve simulate` runs the scheduling policy offline against the simulated executor instead.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from pagedserve.errors import InvalidArgumentError
from pagedserve.logs import add_logging_arguments, configure_logging
from pagedserve.ports import ListenPort, check_ports
from pagedserve.settings import (
    HelpFormatter,
    add_config_file_argument,
    add_version_argument,
    error_line,
    from_command_line,
)
from scheduler_svc.config import ENV_PREFIX, SchedulerServiceConfig, known_environment
from scheduler_svc.server import serve


def build_parser() -> argparse.ArgumentParser:
    """The `pagedserve-scheduler` parser: every SchedulerServiceConfig field, --config, --version, logging."""
    parser = argparse.ArgumentParser(prog="pagedserve-scheduler", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_version_argument(parser)
    add_config_file_argument(parser)
    SchedulerServiceConfig.add_arguments(parser)
    add_logging_arguments(parser)
    return parser


def listen_ports(config: SchedulerServiceConfig) -> list[ListenPort]:
    """The ports the scheduler listens on, by flag: checked before anything starts, so that a taken
    one is a line naming its flag rather than a traceback after the servers began to start."""
    serving = config.serving
    return [ListenPort("--port", serving.host, serving.port),
            ListenPort("--http-port", serving.host, serving.http_port),
            ListenPort("--metrics-port", serving.host, serving.metrics_port)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve-scheduler` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, log_requests=args.log_requests)
    try:
        config = from_command_line(SchedulerServiceConfig, ENV_PREFIX, args, known_environment())
        check_ports(listen_ports(config))
        return asyncio.run(serve(config))
    except InvalidArgumentError as err:
        print(error_line("pagedserve-scheduler", err), file=sys.stderr)
        return 2
    except OSError as err:          # a port that is taken, a certificate that cannot be read
        print(f"pagedserve-scheduler: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
