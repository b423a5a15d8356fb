"""Start a scheduler and its executors on this machine and serve until interrupted.

With no flags it serves the embedded default model (a small Llama trained on the Python standard
library) on the CPU at 127.0.0.1:50051. `--demo-prompt` streams one completion through the real gRPC
API once the stack is up. Every scheduler flag (`pagedserve-scheduler --help`) and the executor's
model flags are accepted; `--executors N` starts N ranks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clients.stack import (
    MAX_RESTART_DELAY_SECONDS,
    RESTART_LIMIT_BURST,
    RESTART_LIMIT_INTERVAL_SECONDS,
    LocalStack,
    RestartPolicy,
    free_port,
    stack_specs,
)
from executor_svc.config import ENV_PREFIX as EXECUTOR_ENV_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.errors import InvalidArgumentError
from pagedserve.logs import add_logging_arguments, configure_logging, logging_environment
from pagedserve.ports import PortInUseError
from pagedserve.settings import (
    ConfigFile,
    add_config_file_argument,
    config_file_from_args,
    env_names,
    options,
    unknown_environment,
    unknown_file_keys,
    warn,
)
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_ENV_PREFIX
from scheduler_svc.config import SchedulerServiceConfig, ServingConfig

# Executor fields the launcher decides itself, or takes from the scheduler's flags of the same name.
LAUNCHER_EXECUTOR_FIELDS = ("host", "port", "rank", "world_size", "metrics_port", "model", "revision",
                            "served_model_name", "max_model_len", "max_message_bytes",
                            "distributed_init_address")
READY_TIMEOUT_SECONDS = 900.0
log = logging.getLogger("pagedserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo flags and the stack's flags."""
    parser.add_argument("--demo-prompt", default=None, metavar="TEXT",
                        help="once serving, stream a completion of TEXT to stdout")
    parser.add_argument("--demo-max-tokens", type=int, default=64, help="tokens of the demo completion")
    add_logging_arguments(parser)
    add_stack_arguments(parser)


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    """Launcher flags, every scheduler flag, and the executor's model and device flags."""
    parser.add_argument("--executors", "--tensor-parallel-size", type=int, default=1, metavar="N",
                        help="executor ranks to start, one tensor-parallel group: each holds 1/N of the "
                             "model's heads and MLP (default 1)")
    parser.add_argument("--no-restart-executors", dest="restart_executors", action="store_false",
                        help="leave an executor that died down (by default it is restarted on its port)")
    parser.add_argument("--restart-limit", type=int, default=RESTART_LIMIT_BURST, metavar="N",
                        help="restarts of an executor that crashed after serving allowed within "
                             "--restart-limit-interval before serve gives up and exits 1; each waits "
                             f"twice as long as the last, up to {MAX_RESTART_DELAY_SECONDS:.0f} s "
                             f"(default {RESTART_LIMIT_BURST})")
    parser.add_argument("--restart-limit-interval", type=float, default=RESTART_LIMIT_INTERVAL_SECONDS,
                        metavar="SECONDS", help="the window --restart-limit counts restarts in "
                                                f"(default {RESTART_LIMIT_INTERVAL_SECONDS:.0f} s)")
    add_config_file_argument(parser)
    SchedulerServiceConfig.add_arguments(parser)
    ExecutorConfig.add_arguments(parser, exclude=LAUNCHER_EXECUTOR_FIELDS)


def build_configs(args: argparse.Namespace) -> tuple[SchedulerServiceConfig, list[ExecutorConfig]]:
    """The scheduler's config and one config per rank, validated, with ports chosen.

    Settings come from the flags, then the environment, then the --config file, then the defaults;
    unknown PAGEDSERVE_* variables and file keys are warned about, with the closest valid name.
    """
    if args.executors < 1:
        raise InvalidArgumentError("executors", f"must be at least 1, got {args.executors}")
    config_file = config_file_from_args(args)
    warn(unknown_settings(config_file))
    if config_file is not None:     # a key serve has no flag for is ignored, as its warning says
        config_file = config_file.only(serve_keys())
    service = SchedulerServiceConfig.from_sources(args, config_file=config_file)
    base = ExecutorConfig.from_sources(args, config_file=config_file)
    serving = service.serving
    ephemeral = serving.port == 0
    if ephemeral and serving.http_port:
        # `--port 0` picks free ports for everything (0 itself would turn the HTTP API off).
        serving = dataclasses.replace(serving, http_port=free_port(serving.host))
    # Rank 0 hosts the tensor-parallel group's rendezvous on a free port; every rank names it.
    rendezvous = (base.distributed_init_address if args.executors == 1
                  else f"{serving.host}:{free_port(serving.host)}")
    executors = []
    for rank in range(args.executors):
        port = free_port(serving.host) if ephemeral else serving.port + 10 + rank
        metrics_port = 0 if serving.metrics_port <= 0 else serving.metrics_port + 1 + rank
        executors.append(dataclasses.replace(
            base, host=serving.host, port=port, rank=rank, world_size=args.executors,
            distributed_init_address=rendezvous, metrics_port=metrics_port, model=serving.model,
            revision=serving.revision, served_model_name=serving.served_model_name))
    addresses = ",".join(f"{c.host}:{c.port}" for c in executors)
    serving = dataclasses.replace(serving, executor_addresses=addresses)
    return dataclasses.replace(service, serving=serving), executors


def serve_keys() -> set[str]:
    """The config-file keys of `serve`: its scheduler flags and the executor flags it passes on."""
    executor_keys = {o.name for o in options(ExecutorConfig, EXECUTOR_ENV_PREFIX)}
    scheduler_keys = {o.name for o in options(SchedulerServiceConfig, SCHEDULER_ENV_PREFIX)}
    return scheduler_keys | (executor_keys - set(LAUNCHER_EXECUTOR_FIELDS))


def unknown_settings(config_file: ConfigFile | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Warnings for the file's keys that `serve` has no flag for, and for unknown PAGEDSERVE_* variables."""
    warnings = unknown_file_keys(config_file, serve_keys()) if config_file is not None else []
    return warnings + unknown_environment(os.environ if environ is None else environ, stack_environment())


def stack_environment() -> set[str]:
    """The environment variables of both services' configs: `serve` sees the whole stack's environment
    and checks every name in it."""
    return (env_names(SchedulerServiceConfig, SCHEDULER_ENV_PREFIX)
            | env_names(ExecutorConfig, EXECUTOR_ENV_PREFIX))


def restart_policy(args: argparse.Namespace) -> RestartPolicy:
    """The launcher's restart limit from --restart-limit and --restart-limit-interval."""
    if args.restart_limit < 0:
        raise InvalidArgumentError("restart_limit", f"must be at least 0, got {args.restart_limit}")
    if args.restart_limit_interval <= 0:
        raise InvalidArgumentError("restart_limit_interval",
                                   f"must be > 0, got {args.restart_limit_interval}")
    return RestartPolicy(burst=args.restart_limit, interval=args.restart_limit_interval)


def run_demo(target: str, prompt: str, max_tokens: int, config: ServingConfig) -> None:
    """Stream one completion of `prompt` through the client library to stdout."""
    from clients.client import PagedServeClient

    print(f"\n--- completion of {prompt!r} (max_tokens={max_tokens}, greedy) ---", flush=True)
    # A self-signed certificate is its own root; a CA-issued one verifies against the same file too.
    roots = Path(config.tls_cert_file).read_bytes() if config.tls_cert_file else None
    with PagedServeClient(target, token=config.auth_token or None, root_certificates=roots) as client:
        sys.stdout.write(prompt)
        for event in client.stream(prompt, max_tokens=max_tokens, temperature=0.0):
            for choice in event.choices:
                sys.stdout.write(choice.text)
                sys.stdout.flush()
    print("\n---", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the stack in the foreground until Ctrl-C or SIGTERM."""
    configure_logging(args.log_level, args.log_format, log_requests=args.log_requests)
    # The services inherit our environment: the same level and format for every line of the stack.
    os.environ.update(logging_environment(args.log_level, args.log_format, args.log_requests))
    scheduler, executors = build_configs(args)
    stack = LocalStack(stack_specs(scheduler, executors), restart_executors=args.restart_executors,
                       liveness_timeout=scheduler.serving.executor_health_timeout_seconds,
                       restart_policy=restart_policy(args))
    signal.signal(signal.SIGTERM, _interrupt)        # stop the children on SIGTERM as on Ctrl-C
    try:
        stack.start()
    except PortInUseError as err:                   # nothing has started yet: one line names the flag
        _status(str(err), args.log_format, logging.ERROR)
        return 1
    code = 1
    try:
        address = stack.wait_listening("scheduler", timeout=120.0)
        stack.wait_ready(READY_TIMEOUT_SECONDS)
        http = stack.processes["scheduler"].http_address
        api = f" (gRPC) and http://{http}/v1 (OpenAI-compatible HTTP)" if http else ""
        _status(f"serving on {address}{api} with {len(executors)} executor(s); Ctrl-C stops",
                args.log_format)
        if args.demo_prompt:
            run_demo(address, args.demo_prompt, args.demo_max_tokens, scheduler.serving)
        while not stack.failed:
            time.sleep(0.5)
        if stack.failure is not None:
            _status(stack.failure, args.log_format, logging.ERROR)
    except KeyboardInterrupt:
        code = 0
    except (TimeoutError, RuntimeError) as err:
        _status(str(err), args.log_format, logging.ERROR)
    finally:
        stopped = stack.stop()
    return code if code else stopped


def _status(message: str, log_format: str, level: int = logging.INFO) -> None:
    """A launcher status line: plain on stderr, or a JSON log record when every line must be one."""
    if log_format == "json":
        log.log(level, "%s", message)
    else:
        print(f"pagedserve serve: {message}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
