"""The user commands against real processes: `pagedserve generate`, `info`, `healthcheck`, `serve`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from e2e_stack import REPO

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def pagedserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clients.cli", *args], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout)


def test_generate_streams_the_same_text_as_the_client_library(stack):
    with stack.client() as client:
        expected = client.generate("def fibonacci(n):", max_tokens=24, temperature=0.0).text
    done = pagedserve("generate", "def fibonacci(n):", "--target", stack.target, "--max-tokens", "24",
                      "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "completion_tokens=" in done.stderr


def test_generate_json_info_and_healthcheck(stack):
    done = pagedserve("generate", "import", "--target", stack.target, "--max-tokens", "3", "--json",
                      "--logprobs", "2", "-n", "2", "--seed", "1")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 0 and "usage" in lines[-1]
    assert pagedserve("info", "--target", stack.target, "--json").returncode == 0
    health = pagedserve("healthcheck", "--target", stack.target)
    assert health.returncode == 0 and "SERVING" in health.stdout


def test_generate_reports_invalid_arguments(stack):
    done = pagedserve("generate", "x", "--target", stack.target, "--temperature", "-2")
    assert done.returncode == 1 and "INVALID_ARGUMENT: temperature" in done.stderr


def test_serve_streams_a_demo_completion_and_stops_on_sigint():
    proc = subprocess.Popen([sys.executable, "-m", "clients.cli", "serve", "--port", "0", "--metrics-port",
                             "-1", "--demo-prompt", "def fibonacci(n):", "--demo-max-tokens", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    try:
        lines = []
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("---") and len(lines) > 2:
                break
        assert lines[-1].startswith("---"), "".join(lines)
        assert "def fibonacci(n):" in "".join(lines)
    finally:
        proc.send_signal(signal.SIGINT)
        # communicate, not wait: stderr must be drained while the stack shuts down (a full pipe blocks it).
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
