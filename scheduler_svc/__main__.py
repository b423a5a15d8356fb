"""`pagedserve-scheduler`: run the scheduler service alone.

It serves the client API (pagedserve.v1.GenerationService, health, reflection) on --host/--port and
the OpenAI-compatible HTTP API on --http-port (0: none), connects to the executor ranks listed in
--executor-addresses (host:port, comma-separated, in rank order), and exposes Prometheus metrics on
--metrics-port. Every flag has a PAGEDSERVE_<FLAG> environment variable.
`pagedserve simulate` runs the scheduling policy offline against the simulated executor instead.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.server import serve


def build_parser() -> argparse.ArgumentParser:
    """The `pagedserve-scheduler` parser: every SchedulerConfig field plus --log-level."""
    parser = argparse.ArgumentParser(prog="pagedserve-scheduler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    SchedulerConfig.add_arguments(parser)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve-scheduler` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = SchedulerConfig.from_sources(args)
        return asyncio.run(serve(config))
    except InvalidArgumentError as err:
        print(f"pagedserve-scheduler: invalid {err}", file=sys.stderr)
        return 2
    except OSError as err:          # a port that is taken, a certificate that cannot be read
        print(f"pagedserve-scheduler: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
