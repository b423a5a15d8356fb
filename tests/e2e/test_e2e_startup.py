"""Start fast, fail fast: a stack that cannot start says why in one line and exits non-zero, at once.

A setting the model cannot take (`--max-model-len` beyond its limit) stops `serve` with the executor's
error line instead of restarting the executor forever; a taken port is one line naming its flag, from
`serve` and from each service on its own, before anything loads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from e2e_stack import REPO, require_model

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=ENV,
                          cwd=REPO, timeout=timeout)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port that another socket listens on during the test (with free ports around it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_a_max_model_len_beyond_the_models_limit_stops_serve_with_one_clear_line():
    require_model()
    started = time.monotonic()
    done = run("clients.cli", "serve", "--max-model-len", "5000", "--port", "0", "--metrics-port", "0")
    elapsed = time.monotonic() - started
    assert done.returncode != 0, done.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    assert "Traceback" not in done.stderr
    assert "restarting" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if "max_model_len" in line]
    assert errors == [
        "[executor-0] pagedserve-executor: invalid max_model_len: 5000 must be in [1, 1024], the model's "
        "max_position_embeddings",
        "pagedserve serve: executor-0 failed to start (exit code 2): pagedserve-executor: invalid "
        "max_model_len: 5000 must be in [1, 1024], the model's max_position_embeddings"], done.stderr


def free_port() -> int:
    """A port that was free a moment ago, low enough for the ports `serve` derives from it."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            if (port := sock.getsockname()[1]) < 60000:
                return port


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_serve_names_the_flag_of_a_taken_port_in_one_line(flag, taken_port):
    # Fixed ports: `--port 0` would pick a free HTTP port whatever --http-port says.
    ports = {"--port": str(free_port()), "--http-port": str(free_port()), "--metrics-port": str(free_port()),
             flag: str(taken_port)}
    done = run("clients.cli", "serve", *(item for pair in ports.items() for item in pair), timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pagedserve serve: {flag}: cannot listen on 127.0.0.1:{taken_port}: the port is already in use; "
        "choose another port"], done.stderr


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_the_scheduler_names_the_flag_of_a_taken_port_in_one_line(flag, taken_port):
    ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(taken_port)}
    done = run("scheduler_svc", *(item for pair in ports.items() for item in pair), timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pagedserve-scheduler: {flag}: cannot listen on 127.0.0.1:{taken_port}: the port is already in "
        "use; choose another port"], done.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_the_executor_names_the_flag_of_a_taken_port_before_loading_the_model(flag, taken_port):
    ports = {"--port": "0", "--metrics-port": "0", flag: str(taken_port)}
    done = run("executor_svc", *(item for pair in ports.items() for item in pair), timeout=60)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pagedserve-executor: {flag}: cannot listen on 127.0.0.1:{taken_port}: the port is already in "
        "use; choose another port"], done.stderr


def test_the_executor_reports_a_model_it_cannot_load_in_one_line(tmp_path):
    done = run("executor_svc", "--port", "0", "--metrics-port", "-1", "--model", str(tmp_path), timeout=120)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"pagedserve-executor: cannot start: no config.json in {tmp_path}: give the path of a local Hugging "
        "Face model directory"], done.stderr
