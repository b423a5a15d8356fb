"""Start real `pagedserve-executor` processes on loopback."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.stack import stop_process

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"listening on (\S+:\d+)")
METRICS = re.compile(r"metrics on http://(\S+:\d+)/metrics")


class ExecutorProcess:
    """A running executor process, the address it listens on and where it serves `/metrics`.

    `metrics_address` (host:port) is None when the executor runs without a metrics server.
    """

    def __init__(self, *flags: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-m", "executor_svc", "--port", "0", *flags],
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.metrics_address: str | None = None
        self.address = self._wait_for_address(timeout=30.0)

    def _wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        lines = []
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            metrics = METRICS.search(line)      # logged before `listening on`, when enabled
            if metrics:
                self.metrics_address = metrics.group(1)
            match = LISTENING.search(line)
            if match:
                return match.group(1)
        self.stop()
        raise RuntimeError("executor did not start:\n" + "".join(lines))

    def stop(self) -> int:
        """SIGTERM, then wait (SIGKILL after 15 s); returns the exit code."""
        return stop_process(self.proc, timeout=15)


@pytest.fixture
def start_executor() -> Iterator:
    """Start executors with the given flags; all are stopped after the test."""
    started: list[ExecutorProcess] = []

    def start(*flags: str) -> ExecutorProcess:
        process = ExecutorProcess(*flags)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
