"""Start a scheduler and its executor ranks as local processes, the way docker-compose runs them.

Each service is its console entry point (`python -m scheduler_svc`, `python -m executor_svc`)
configured only through its environment (`PAGEDSERVE_*` for the scheduler, `PAGEDSERVE_EXECUTOR_*`
for each rank), so what the launcher starts is what a compose file starts. The stack restarts an
executor that dies on the same port, which lets the scheduler recover the live requests, and, like a
liveness probe, kills and restarts one that stops answering its gRPC health check (a stopped or wedged
process never exits on its own).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor_svc.config import ENV_PREFIX as EXECUTOR_ENV_PREFIX
from executor_svc.config import ExecutorConfig
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_ENV_PREFIX
from scheduler_svc.config import SchedulerConfig

log = logging.getLogger("pagedserve.serve")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
HTTP = re.compile(r"http on https?://(\S+):(\d+)")      # the scheduler's OpenAI-compatible API
# The scheduler's executors are all up; the second form is the line as --log-format json writes it.
READY = re.compile(r'pagedserve\.engine(?:: |", "message": ")serving ')
RESTART_DELAY_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 60.0
LIVENESS_PROBE_INTERVAL_SECONDS = 1.0


def config_environment(config: object, prefix: str) -> dict[str, str]:
    """Every field of a config dataclass as `<prefix><FIELD>` environment variables."""
    env = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[prefix + f.name.upper()] = str(value)
    return env


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One process to run: a name for its log lines, its command and its environment additions."""

    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str]


def stack_specs(scheduler: SchedulerConfig, executors: list[ExecutorConfig]) -> list[ServiceSpec]:
    """The executor ranks, then the scheduler, each configured purely by environment."""
    specs = [ServiceSpec(f"executor-{c.rank}", (sys.executable, "-m", "executor_svc"),
                         config_environment(c, EXECUTOR_ENV_PREFIX)) for c in executors]
    specs.append(ServiceSpec("scheduler", (sys.executable, "-m", "scheduler_svc"),
                             config_environment(scheduler, SCHEDULER_ENV_PREFIX)))
    return specs


def tensor_parallel_group(spec: ServiceSpec) -> str | None:
    """The rendezvous address that names an executor's tensor-parallel group; None for a lone rank."""
    world_size = spec.environment.get(EXECUTOR_ENV_PREFIX + "WORLD_SIZE", "1")
    if world_size == "1":
        return None
    return spec.environment.get(EXECUTOR_ENV_PREFIX + "DISTRIBUTED_INIT_ADDRESS")


def free_port(host: str) -> int:
    """A port that is free on `host` now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass(slots=True)
class ManagedProcess:
    """A running service whose stderr is forwarded line by line with its name in front."""

    spec: ServiceSpec
    proc: subprocess.Popen[str]
    address: str | None = None
    metrics_address: str | None = None
    http_address: str | None = None
    restarts: int = 0
    listening: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)
    last_alive: float = field(default_factory=time.monotonic)   # last SERVING health answer (or start)


def labelled_line(service: str, line: str) -> str:
    """A child's log line marked with its service: `[name] line`, or for a JSON line (--log-format json)
    the same object with a "service" key first, so that every line stays one JSON object."""
    body = line.rstrip()
    if body.startswith("{") and body.endswith("}") and body != "{}":
        return f'{{"service": {json.dumps(service)}, {line[1:]}'
    return f"[{service}] {line}"


class LocalStack:
    """Runs the services, forwards their logs, restarts dead executors, and stops everything.

    With `liveness_timeout` (seconds) an executor that has listened but then answers no health check
    with SERVING for that long is killed, and so restarted like any dead one (None: never).
    """

    def __init__(self, specs: list[ServiceSpec], restart_executors: bool = True,
                 base_environment: Mapping[str, str] | None = None,
                 liveness_timeout: float | None = None) -> None:
        self.specs = specs
        self.restart_executors = restart_executors
        self.liveness_timeout = liveness_timeout
        self._base_env = dict(os.environ if base_environment is None else base_environment)
        self.processes: dict[str, ManagedProcess] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every service (executors first) and a watcher that restarts dead executors."""
        for spec in self.specs:
            self._spawn(spec)
        threading.Thread(target=self._watch, name="stack-watch", daemon=True).start()
        if self.liveness_timeout is not None and self.restart_executors:
            threading.Thread(target=self._probe_liveness, name="stack-liveness", daemon=True).start()

    def _spawn(self, spec: ServiceSpec, restarts: int = 0) -> ManagedProcess:
        env = {**self._base_env, **spec.environment, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(spec.command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        managed = ManagedProcess(spec, proc, restarts=restarts)
        with self._lock:
            self.processes[spec.name] = managed
        threading.Thread(target=self._forward, args=(managed,), name=f"log-{spec.name}", daemon=True).start()
        return managed

    @staticmethod
    def _forward(managed: ManagedProcess) -> None:
        """Copy the child's stderr to ours, noting the addresses it reports."""
        assert managed.proc.stderr is not None
        for line in managed.proc.stderr:
            if (match := LISTENING.search(line)) is not None:
                managed.address = f"{match.group(1)}:{match.group(2)}"
                managed.last_alive = time.monotonic()
                managed.listening.set()
            elif (match := METRICS.search(line)) is not None:
                managed.metrics_address = f"{match.group(1)}:{match.group(2)}"
            elif (match := HTTP.search(line)) is not None:
                managed.http_address = f"{match.group(1)}:{match.group(2)}"
            elif READY.search(line) is not None:
                managed.ready.set()
            sys.stderr.write(labelled_line(managed.spec.name, line))
            sys.stderr.flush()

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            for name, managed in list(self.processes.items()):
                code = managed.proc.poll()
                # A group restart earlier in this pass may already have replaced this process.
                if code is None or self._stopping.is_set() or self.processes.get(name) is not managed:
                    continue
                if name.startswith("executor") and self.restart_executors:
                    self._restart_group(managed, code)
                elif name == "scheduler":
                    log.error("the scheduler exited with code %s", code)
                    self._stopping.set()

    def _probe_liveness(self) -> None:
        """Kill each listening executor whose health has not read SERVING for `liveness_timeout` s.

        The watcher then restarts it as it restarts any dead executor. SIGKILL because a stopped
        process cannot act on SIGTERM, and a wedged one would not.
        """
        assert self.liveness_timeout is not None
        while not self._stopping.wait(LIVENESS_PROBE_INTERVAL_SECONDS):
            for name, managed in list(self.processes.items()):
                if not name.startswith("executor") or not managed.listening.is_set():
                    continue
                if managed.proc.poll() is not None:
                    continue
                now = time.monotonic()
                if _answers_serving(managed.address, timeout=min(2.0, self.liveness_timeout)):
                    managed.last_alive = now
                elif now - managed.last_alive > self.liveness_timeout and not self._stopping.is_set():
                    log.warning("%s has not answered its health check for %.0f s; killing it so that it "
                                "restarts", name, now - managed.last_alive)
                    managed.proc.kill()

    def _restart_group(self, dead: ManagedProcess, code: int) -> None:
        """Restart a dead executor on its port, with the rest of its tensor-parallel group.

        The ranks of a group meet in every forward pass, so the survivors of a lost rank would wait for
        it forever: they are stopped too, and the whole group starts again and rejoins.
        """
        group = [m for m in list(self.processes.values()) if tensor_parallel_group(m.spec) is not None
                 and tensor_parallel_group(m.spec) == tensor_parallel_group(dead.spec)] or [dead]
        others = [m.spec.name for m in group if m is not dead]
        log.warning("%s exited with code %s; restarting it%s", dead.spec.name, code,
                    f" with the rest of its tensor-parallel group ({', '.join(others)})" if others else "")
        for managed in group:
            if managed is not dead:
                stop_process(managed.proc, timeout=10.0)
        time.sleep(RESTART_DELAY_SECONDS)
        for managed in group:
            if not self._stopping.is_set():
                self._spawn(managed.spec, managed.restarts + 1)

    def wait_listening(self, name: str, timeout: float) -> str:
        """The address `name` listens on, once it says so (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            managed = self.processes[name]
            if managed.listening.wait(0.1):
                assert managed.address is not None
                return managed.address
            if managed.proc.poll() is not None and name == "scheduler":
                raise RuntimeError(f"{name} exited with code {managed.proc.returncode} before listening")
        raise TimeoutError(f"{name} did not start listening within {timeout:.0f} s")

    def wait_ready(self, timeout: float) -> None:
        """Wait until the scheduler reports that every executor serves (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while not self.processes["scheduler"].ready.wait(0.1):
            if self.failed:
                raise RuntimeError("the scheduler exited during startup; its log is above")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack was not serving after {timeout:.0f} s")

    @property
    def failed(self) -> bool:
        """Whether the scheduler has exited on its own."""
        scheduler = self.processes.get("scheduler")
        return scheduler is not None and scheduler.proc.poll() is not None and not self._stopping.is_set()

    def stop(self) -> int:
        """SIGTERM the scheduler (it drains), then every executor at once; returns the scheduler's code.

        The executors are signalled together so that each rank of a tensor-parallel group knows it is
        stopping before its peers go: one left behind would take their exit for a failure.
        """
        self._stopping.set()
        code = 0
        if (scheduler := self.processes.get("scheduler")) is not None:
            code = stop_process(scheduler.proc) or 0
        executors = [m.proc for n, m in self.processes.items() if n != "scheduler"]
        for proc in executors:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in executors:
            wait_or_kill(proc)
        return code


def _answers_serving(address: str | None, timeout: float) -> bool:
    """Whether the gRPC server at `address` answers its overall health check with SERVING in time."""
    if address is None:
        return False
    with grpc.insecure_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
    """SIGTERM, wait up to `timeout` seconds, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return wait_or_kill(proc, timeout)


def wait_or_kill(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
    """Wait up to `timeout` seconds for a signalled process, then SIGKILL it; returns the exit code.

    It never signals twice: a second SIGTERM could land after the process removed its handler on the
    way out, and end it with the signal instead of its own exit code.
    """
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode
