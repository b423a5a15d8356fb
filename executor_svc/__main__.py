"""`pagedserve-executor`: run one executor rank, serving the executor API over gRPC.

Every setting is a flag, a PAGEDSERVE_EXECUTOR_<FLAG> environment variable (the kernel switches keep
PAGEDSERVE_CUDA_KERNELS, PAGEDSERVE_FUSED_LAYERS and PAGEDSERVE_KERNEL_CACHE) and a key of the --config
file (TOML or YAML); a flag wins over the environment, which wins over the file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from executor_svc.backend import ExecutorBackend
from executor_svc.config import ENV_PREFIX, Backend, ExecutorConfig, known_environment
from executor_svc.server import serve
from executor_svc.simulated_backend import SimulatedBackend
from pagedserve.errors import InvalidArgumentError
from pagedserve.logs import add_logging_arguments, configure_logging
from pagedserve.ports import ListenPort, PortInUseError, check_ports
from pagedserve.settings import (
    HelpFormatter,
    add_config_file_argument,
    add_version_argument,
    error_line,
    from_command_line,
)

log = logging.getLogger("pagedserve.executor")


class StartupError(RuntimeError):
    """The executor cannot start as configured; the message is the one line it prints before exiting."""


def make_backend(config: ExecutorConfig) -> ExecutorBackend:
    """The backend the config names (the model backend imports torch only when chosen)."""
    if config.backend is Backend.SIMULATED:
        return SimulatedBackend(config)
    from executor_svc.model_backend import ModelBackend

    return ModelBackend(config)


def configure_kernels(config: ExecutorConfig) -> None:
    """Fix this process's CUDA kernel switches from the config, once, before the model loads.

    Only the executor process does this: code that drives the model in process (tests, benchmarks)
    keeps reading PAGEDSERVE_CUDA_KERNELS and the like from the environment at each call.
    """
    if config.backend is Backend.MODEL:
        from executor_svc import ops  # imports torch: only for the model backend

        ops.configure(ops.KernelSettings(config.cuda_kernels, config.fused_layers, config.kernel_cache))


def start_backend(config: ExecutorConfig) -> ExecutorBackend:
    """Check that the ports are free, then build the backend (loading the model).

    What fails here is a setting, a model or a machine that will fail the same way on every start, so
    it is raised as one StartupError line rather than a traceback (kept at DEBUG for a bug report).
    """
    check_ports([ListenPort("--port", config.host, config.port),
                 ListenPort("--metrics-port", config.host, config.metrics_port)])
    try:
        return make_backend(config)
    except InvalidArgumentError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        log.debug("the backend could not start", exc_info=True)
        raise StartupError(f"cannot start: {err}") from err


def build_parser() -> argparse.ArgumentParser:
    """The `pagedserve-executor` parser: every ExecutorConfig field, --config, --version, logging."""
    parser = argparse.ArgumentParser(prog="pagedserve-executor", description=__doc__,
                                     formatter_class=HelpFormatter)
    add_version_argument(parser)
    add_config_file_argument(parser)
    ExecutorConfig.add_arguments(parser)
    add_logging_arguments(parser, requests=False)      # an executor sees no requests
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pagedserve-executor` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = from_command_line(ExecutorConfig, ENV_PREFIX, args, known_environment())
        configure_kernels(config)
        backend = start_backend(config)
        asyncio.run(serve(config, backend))
    except InvalidArgumentError as err:
        print(error_line("pagedserve-executor", err), file=sys.stderr)
        return 2
    except (StartupError, PortInUseError) as err:
        print(f"pagedserve-executor: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
