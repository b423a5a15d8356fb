"""Run a real Prometheus server (and promtool) in tests: scrape given targets, query what it stored.

Tests that need the binaries call `require_prometheus()` / `require_promtool()`: they skip where the
binary is missing, except when the environment sets PAGEDSERVE_REQUIRE_PROMETHEUS=1 (CI does), where a
missing binary fails the test instead of silently skipping it. Stdlib only (urllib) for the HTTP API.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from clients.stack import stop_process
from tests.required_tools import require_tool

REQUIRE_ENV = "PAGEDSERVE_REQUIRE_PROMETHEUS"
POLL_SECONDS = 0.1
HTTP_TIMEOUT_SECONDS = 5.0


def require_prometheus() -> str:
    """The path of the `prometheus` binary, or skip (fail under PAGEDSERVE_REQUIRE_PROMETHEUS=1)."""
    return require_tool("prometheus", "apt-get install prometheus", REQUIRE_ENV)


def require_promtool() -> str:
    """The path of the `promtool` binary, or skip (fail under PAGEDSERVE_REQUIRE_PROMETHEUS=1)."""
    return require_tool("promtool", "apt-get install prometheus", REQUIRE_ENV)


def promtool_check_metrics(exposition: bytes) -> tuple[int, str]:
    """Lint a text exposition (e.g. `generate_latest(registry)`) with `promtool check metrics`.

    Returns promtool's exit status and what it printed; (0, "") means no problems.
    """
    result = subprocess.run([require_promtool(), "check", "metrics"], input=exposition,
                            capture_output=True, timeout=60, check=False)
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace").strip()


def free_port() -> int:
    """A TCP port free on loopback right now (Prometheus cannot report a port 0 binding)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """A Prometheus process scraping `targets` (job name -> host:port list) every second.

    Use as a context manager, or call start() and stop(). Its config, TSDB and log live in `workdir`.
    """

    def __init__(self, workdir: Path, targets: Mapping[str, Sequence[str]],
                 start_timeout: float = 60.0) -> None:
        self.workdir = Path(workdir)
        self.targets = {job: list(addresses) for job, addresses in targets.items()}
        self.start_timeout = start_timeout
        self.binary = require_prometheus()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = self.workdir / "prometheus.log"

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _write_config(self) -> Path:
        # JSON is YAML, so no YAML library is needed.
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                               for job, addresses in self.targets.items()],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> None:
        """Start Prometheus and wait until it reports ready; retries when its port was taken meanwhile."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self._write_config()
        for attempt in range(3):
            address = f"127.0.0.1:{free_port()}"
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                     f"--web.listen-address={address}", "--log.level=warn"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
            self.url = f"http://{address}"
            if self._wait_ready():
                return
            if attempt == 2 or "address already in use" not in self.log_tail():
                break
        self.stop()
        raise RuntimeError(f"prometheus did not become ready:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        """Poll /-/ready until it answers 200; False when the process exits or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=HTTP_TIMEOUT_SECONDS) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass        # not listening yet, or 503 while starting
            time.sleep(POLL_SECONDS)
        return False

    def log_tail(self, chars: int = 4000) -> str:
        """The end of Prometheus' log, for failure messages."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET an API path and return its `data`; raises RuntimeError unless the status is success."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"{url}: {body}")
        return body["data"]

    def targets_status(self) -> list[dict[str, Any]]:
        """The active targets as /api/v1/targets reports them (labels, health, lastError...)."""
        return self._get("/api/v1/targets", {"state": "active"})["activeTargets"]

    def wait_for_targets_up(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped successfully; returns their status."""
        expected = sum(len(addresses) for addresses in self.targets.values())
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets_status()
            if len(active) == expected and all(t["health"] == "up" for t in active):
                return active
            if time.monotonic() >= deadline:
                seen = [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in active]
                raise TimeoutError(f"targets not up after {timeout} s: {seen}\n{self.log_tail()}")
            time.sleep(POLL_SECONDS)

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Evaluate an instant PromQL query now; returns the result vector (`metric`, `value`)."""
        return self._get("/api/v1/query", {"query": expr})["result"]

    def query_until(self, expr: str, condition: Callable[[list[dict[str, Any]]], bool],
                    timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `query(expr)` until `condition(result)` holds (a later scrape may be needed)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if condition(result):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{expr!r} still gives {result} after {timeout} s")
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        """SIGTERM, then wait (SIGKILL after 15 s)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=15)
