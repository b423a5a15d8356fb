"""Start a scheduler and its executor ranks as local processes, the way docker-compose runs them.

Each service is its console entry point (`python -m scheduler_svc`, `python -m executor_svc`)
configured only through its environment (`PAGEDSERVE_*` for the scheduler, `PAGEDSERVE_EXECUTOR_*`
for each rank), so what the launcher starts is what a compose file starts. The stack restarts an
executor that dies on the same port, which lets the scheduler recover the live requests, and, like a
liveness probe, kills and restarts one that stops answering its gRPC health check (a stopped or wedged
process never exits on its own).

A rank that exits before it ever listened failed to start (a bad flag, a model it cannot load, a port
that is taken): restarting it would fail the same way, so the whole stack stops with that rank's last
error line. A rank that crashes after serving is restarted with exponential backoff, at most
`RestartPolicy.burst` times within `RestartPolicy.interval` seconds (systemd's start limit), and then
the stack gives up.
"""

from __future__ import annotations

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
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor_svc.config import ENV_PREFIX as EXECUTOR_ENV_PREFIX
from executor_svc.config import ExecutorConfig
from pagedserve.ports import ListenPort, check_ports
from pagedserve.settings import environment_of
from scheduler_svc.config import ENV_PREFIX as SCHEDULER_ENV_PREFIX
from scheduler_svc.config import SchedulerServiceConfig

log = logging.getLogger("pagedserve.serve")
LISTENING = re.compile(r"listening on (\S+):(\d+)")
METRICS = re.compile(r"metrics on http://(\S+):(\d+)/metrics")
HTTP = re.compile(r"http on https?://(\S+):(\d+)")      # the scheduler's OpenAI-compatible API
# The scheduler's executors are all up; the second form is the line as --log-format json writes it.
READY = re.compile(r'pagedserve\.engine(?:: |", "message": ")serving ')
RESTART_DELAY_SECONDS = 1.0          # the first restart's delay; each quick crash after it doubles it
MAX_RESTART_DELAY_SECONDS = 30.0
RESTART_LIMIT_BURST = 5              # restarts of one rank allowed within RESTART_LIMIT_INTERVAL_SECONDS
RESTART_LIMIT_INTERVAL_SECONDS = 300.0
STOP_TIMEOUT_SECONDS = 60.0
LIVENESS_PROBE_INTERVAL_SECONDS = 1.0


def config_environment(config: object, prefix: str) -> dict[str, str]:
    """Every field of a config dataclass (sections walked) as the environment variables it is read from."""
    return environment_of(config, prefix)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """One process to run: a name for its log lines, its command and its environment additions."""

    name: str
    command: tuple[str, ...]
    environment: Mapping[str, str]


def stack_specs(scheduler: SchedulerServiceConfig, executors: list[ExecutorConfig]) -> list[ServiceSpec]:
    """The executor ranks, then the scheduler, each configured purely by environment."""
    specs = [ServiceSpec(f"executor-{c.rank}", (sys.executable, "-m", "executor_svc"),
                         config_environment(c, EXECUTOR_ENV_PREFIX)) for c in executors]
    specs.append(ServiceSpec("scheduler", (sys.executable, "-m", "scheduler_svc"),
                             config_environment(scheduler, SCHEDULER_ENV_PREFIX)))
    return specs


def stack_ports(specs: list[ServiceSpec]) -> list[ListenPort]:
    """Every fixed port the services will listen on, each labelled with the `serve` flag that chose it.

    An executor's ports are derived from the scheduler's (`--port` + 10 + rank, `--metrics-port` + 1 +
    rank), so their labels say how.
    """
    ports = []
    for spec in specs:
        env = spec.environment
        if spec.name == "scheduler":
            host = env.get(SCHEDULER_ENV_PREFIX + "HOST", "127.0.0.1")
            for flag in ("--port", "--http-port", "--metrics-port"):
                value = env.get(SCHEDULER_ENV_PREFIX + flag[2:].replace("-", "_").upper())
                if value is not None:
                    ports.append(ListenPort(flag, host, int(value)))
            continue
        host = env.get(EXECUTOR_ENV_PREFIX + "HOST", "127.0.0.1")
        rank = int(env.get(EXECUTOR_ENV_PREFIX + "RANK", "0"))
        if (port := env.get(EXECUTOR_ENV_PREFIX + "PORT")) is not None:
            ports.append(ListenPort(f"--port ({spec.name} listens on --port + {10 + rank})", host, int(port)))
        if (port := env.get(EXECUTOR_ENV_PREFIX + "METRICS_PORT")) is not None:
            label = f"--metrics-port ({spec.name}'s metrics are on --metrics-port + {1 + rank})"
            ports.append(ListenPort(label, host, int(port)))
    return ports


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
    last_line: str = ""             # its last non-empty log line: the error, when it exits on one
    log_thread: threading.Thread | None = None


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a rank that crashed after serving is restarted: like systemd's RestartSec= doubling up to a
    cap, and StartLimitBurst= restarts within StartLimitIntervalSec= before giving up."""

    initial_delay: float = RESTART_DELAY_SECONDS
    max_delay: float = MAX_RESTART_DELAY_SECONDS
    burst: int = RESTART_LIMIT_BURST
    interval: float = RESTART_LIMIT_INTERVAL_SECONDS

    def delay(self, recent_restarts: int) -> float:
        """Seconds to wait before the next restart, after `recent_restarts` within the interval."""
        return min(self.max_delay, self.initial_delay * 2 ** recent_restarts)


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
    with SERVING for that long is killed, and so restarted like any dead one (None: never). `failure`
    says why the stack gave up on its own (None while it runs, or when it was stopped).
    """

    def __init__(self, specs: list[ServiceSpec], restart_executors: bool = True,
                 base_environment: Mapping[str, str] | None = None,
                 liveness_timeout: float | None = None, restart_policy: RestartPolicy | None = None) -> None:
        self.specs = specs
        self.restart_executors = restart_executors
        self.liveness_timeout = liveness_timeout
        self.restart_policy = restart_policy or RestartPolicy()
        self._base_env = dict(os.environ if base_environment is None else base_environment)
        self.processes: dict[str, ManagedProcess] = {}
        self.failure: str | None = None
        self._served: set[str] = set()              # services that have listened, in any of their lives
        self._restart_times: dict[str, deque[float]] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start every service (executors first) and a watcher that restarts dead executors.

        Raises PortInUseError, naming the flag, before starting anything when a fixed port is taken.
        """
        check_ports(stack_ports(self.specs))
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
        managed.log_thread = threading.Thread(target=self._forward, args=(managed,), name=f"log-{spec.name}",
                                              daemon=True)
        managed.log_thread.start()
        return managed

    def _forward(self, managed: ManagedProcess) -> None:
        """Copy the child's stderr to ours, noting the addresses it reports and its last line."""
        assert managed.proc.stderr is not None
        for line in managed.proc.stderr:
            if line.strip():
                managed.last_line = line.strip()
            if (match := LISTENING.search(line)) is not None:
                managed.address = f"{match.group(1)}:{match.group(2)}"
                managed.last_alive = time.monotonic()
                managed.listening.set()
                self._served.add(managed.spec.name)
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
                # The log thread may still hold the last lines: they name the error.
                self._drain_log(managed)
                if name not in self._served:
                    self._give_up(f"{name} failed to start (exit code {code}): "
                                  f"{managed.last_line or 'no output'}")
                elif name == "scheduler":
                    self._give_up(f"the scheduler exited with code {code}: "
                                  f"{managed.last_line or 'no output'}")
                elif self.restart_executors:
                    self._restart_group(managed, code)

    @staticmethod
    def _drain_log(managed: ManagedProcess) -> None:
        """Give the forwarding thread of an exited process a moment to read what it wrote last."""
        if managed.log_thread is not None:
            managed.log_thread.join(timeout=2.0)

    def _give_up(self, reason: str) -> None:
        """Stop supervising: the stack cannot serve. `serve` prints the reason and stops the rest."""
        self.failure = reason
        self._stopping.set()

    def _restart_delay(self, name: str) -> float | None:
        """The backoff before restarting `name` again, or None once it hit the restart limit."""
        policy = self.restart_policy
        now = time.monotonic()
        times = self._restart_times.setdefault(name, deque())
        while times and now - times[0] > policy.interval:
            times.popleft()
        if len(times) >= policy.burst:
            return None
        delay = policy.delay(len(times))
        times.append(now)
        return delay

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
        delay = self._restart_delay(dead.spec.name)
        if delay is None:
            policy = self.restart_policy
            self._give_up(f"{dead.spec.name} exited with code {code} after {policy.burst} restarts within "
                          f"{policy.interval:.0f} s; giving up: {dead.last_line or 'no output'}")
            return
        log.warning("%s exited with code %s; restarting it in %.0f s%s", dead.spec.name, code, delay,
                    f" with the rest of its tensor-parallel group ({', '.join(others)})" if others else "")
        for managed in group:
            if managed is not dead:
                stop_process(managed.proc, timeout=10.0)
        # Waiting on the stop event lets Ctrl-C end a long backoff at once.
        self._stopping.wait(delay)
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
            if self.failure is not None:            # the watcher saw it exit, with its last line
                raise RuntimeError(self.failure)
        raise TimeoutError(f"{name} did not start listening within {timeout:.0f} s")

    def wait_ready(self, timeout: float) -> None:
        """Wait until the scheduler reports that every executor serves (raises TimeoutError)."""
        deadline = time.monotonic() + timeout
        while not self.processes["scheduler"].ready.wait(0.1):
            if self.failure is not None:
                raise RuntimeError(self.failure)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack was not serving after {timeout:.0f} s")

    @property
    def failed(self) -> bool:
        """Whether the stack gave up on its own: a service failed to start, the scheduler exited, or a
        rank hit its restart limit (`failure` says which)."""
        return self.failure is not None

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
            # types-grpcio-health-checking declares HealthStub without its methods.
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # type: ignore[attr-defined]
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
