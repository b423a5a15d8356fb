"""The whole stack (scheduler + executor processes on loopback), started the way `pagedserve serve` does."""

from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.cli import build_parser
from clients.client import PagedServeClient
from clients.serve_command import build_configs
from clients.stack import LocalStack, stack_specs
from pagedserve.default_model import default_model_dir

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = Path(default_model_dir())
START_TIMEOUT = 180.0


class RunningStack:
    """A started LocalStack and how to reach it."""

    def __init__(self, *flags: str, restart_executors: bool = True) -> None:
        args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "0", *flags])
        self.scheduler_config, self.executor_configs = build_configs(args)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stack = LocalStack(stack_specs(self.scheduler_config, self.executor_configs),
                                restart_executors=restart_executors, base_environment=env,
                                liveness_timeout=self.scheduler_config.serving.executor_health_timeout_seconds)
        self.stack.start()
        try:
            self.target = self.stack.wait_listening("scheduler", timeout=START_TIMEOUT)
            self.stack.wait_ready(START_TIMEOUT)
        except BaseException:
            self.stack.stop()
            raise

    def client(self, **kwargs: object) -> PagedServeClient:
        """A client of this stack's frontend."""
        return PagedServeClient(self.target, **kwargs)  # type: ignore[arg-type]

    @property
    def http_url(self) -> str:
        """The base URL of the scheduler's OpenAI-compatible HTTP API (`--port 0` gives it a free port)."""
        address = self.stack.processes["scheduler"].http_address
        assert address is not None, "the scheduler reported no HTTP address"
        return f"http://{address}"

    def health(self) -> int:
        """The scheduler's overall health status (a HealthCheckResponse enum value)."""
        with grpc.insecure_channel(self.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status

    def wait_health(self, status: int, timeout: float = 60.0) -> None:
        """Poll until the scheduler reports `status`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.health() == status:
                return
            time.sleep(0.05)
        raise AssertionError(f"health never became {status}")

    def metrics_text(self, name: str = "scheduler") -> str:
        """The /metrics page of one process."""
        address = self.stack.processes[name].metrics_address
        assert address is not None, f"{name} reported no metrics address"
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            return reply.read().decode()

    def metric(self, sample: str, name: str = "scheduler") -> float:
        """The value of one sample line (such as `pagedserve_requests_running`) of a process, named
        without its `model_name` label (every series has it; one process serves one model)."""
        for line in self.metrics_text(name).splitlines():
            key, _, value = line.rpartition(" ")
            if without_model_name(key) == sample and not line.startswith("#"):
                return float(value)
        raise KeyError(sample)

    def stop(self) -> int:
        """Stop every process; returns the scheduler's exit code."""
        return self.stack.stop()


def without_model_name(key: str) -> str:
    """A sample line's `name{labels}` without model_name: `a{model_name="m",b="1"}` -> `a{b="1"}`."""
    key = re.sub(r'model_name="[^"]*",?', "", key).replace(",}", "}")
    return key.removesuffix("{}")


def require_model() -> None:
    """Fail clearly when the embedded model is missing from the checkout."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"the embedded default model is missing at {MODEL_DIR}; run models/train_stdlib_llama.py")
