"""`pagedserve-executor`: run one executor rank, serving the executor API over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from executor_svc.backend import ExecutorBackend
from executor_svc.config import Backend, ExecutorConfig
from executor_svc.server import serve
from executor_svc.simulated_backend import SimulatedBackend
from pagedserve.errors import InvalidArgumentError
from pagedserve.logs import add_logging_arguments, configure_logging


def make_backend(config: ExecutorConfig) -> ExecutorBackend:
    """The backend the config names (the model backend imports torch only when chosen)."""
    if config.backend is Backend.SIMULATED:
        return SimulatedBackend(config)
    from executor_svc.model_backend import ModelBackend

    return ModelBackend(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve-executor` console script."""
    parser = argparse.ArgumentParser(prog="pagedserve-executor", description=__doc__)
    ExecutorConfig.add_arguments(parser)
    add_logging_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = ExecutorConfig.from_sources(args)
        asyncio.run(serve(config, make_backend(config)))
    except InvalidArgumentError as err:
        print(f"pagedserve-executor: invalid {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
