"""LocalStack's supervision, with stand-in processes: a rank that never served stops the stack at once
with its last error line; a rank that crashes after serving restarts with backoff, up to a limit."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from clients.cli import build_parser
from clients.serve_command import build_configs
from clients.stack import LocalStack, RestartPolicy, ServiceSpec, stack_ports, stack_specs
from pagedserve.ports import PortInUseError

# A scheduler stand-in that listens (as far as the stack can tell) and then waits to be stopped.
SCHEDULER = ServiceSpec("scheduler", (sys.executable, "-c",
                                      "import sys, time; print('listening on 127.0.0.1:1', file=sys.stderr, "
                                      "flush=True); time.sleep(60)"), {})
QUICK = RestartPolicy(initial_delay=0.05, max_delay=0.2, burst=3, interval=60.0)


def executor(script: str) -> ServiceSpec:
    """An executor-0 stand-in running `script`."""
    return ServiceSpec("executor-0", (sys.executable, "-c", "import sys, time\n" + script), {})


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_rank_that_exits_before_listening_stops_the_stack_with_its_last_line():
    fails = executor("print('loading', file=sys.stderr)\n"
                     "print('pagedserve-executor: invalid max_model_len: too long', file=sys.stderr)\n"
                     "sys.exit(2)")
    stack = LocalStack([fails, SCHEDULER], restart_policy=QUICK)
    stack.start()
    try:
        wait_for(lambda: stack.failed)
        assert stack.failure == ("executor-0 failed to start (exit code 2): "
                                 "pagedserve-executor: invalid max_model_len: too long")
        time.sleep(0.3)                                 # longer than any restart delay of QUICK
        assert stack.processes["executor-0"].restarts == 0
        with pytest.raises(RuntimeError, match="failed to start"):
            stack.wait_ready(5)
    finally:
        stack.stop()


def test_a_rank_that_crashes_after_serving_is_restarted_with_backoff_then_given_up_on():
    crashes = executor("print('pagedserve-executor listening on 127.0.0.1:1', file=sys.stderr, flush=True)\n"
                       "time.sleep(0.2)\nprint('RuntimeError: lost the device', file=sys.stderr)\n"
                       "sys.exit(1)")
    stack = LocalStack([crashes, SCHEDULER], restart_policy=QUICK)
    started = time.monotonic()
    stack.start()
    try:
        wait_for(lambda: stack.failed, timeout=30)
        assert stack.processes["executor-0"].restarts == QUICK.burst
        assert stack.failure == ("executor-0 exited with code 1 after 3 restarts within 60 s; giving up: "
                                 "RuntimeError: lost the device")
        # Four lives of 0.2 s and the delays 0.05, 0.1 and 0.2 (capped) between them.
        assert time.monotonic() - started >= 4 * 0.2 + 0.05 + 0.1 + 0.2
    finally:
        stack.stop()


def test_restarts_spread_out_beyond_the_interval_are_not_limited():
    policy = RestartPolicy(initial_delay=0.05, max_delay=0.05, burst=1, interval=0.3)
    crashes = executor("print('listening on 127.0.0.1:1', file=sys.stderr, flush=True)\n"
                       "time.sleep(0.5)\nsys.exit(1)")
    stack = LocalStack([crashes, SCHEDULER], restart_policy=policy)
    stack.start()
    try:
        wait_for(lambda: stack.processes["executor-0"].restarts >= 3, timeout=30)
        assert stack.failure is None
    finally:
        stack.stop()


def test_the_restart_delay_doubles_up_to_its_cap():
    policy = RestartPolicy(initial_delay=1.0, max_delay=30.0)
    assert [policy.delay(n) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_the_scheduler_exiting_is_a_failure_with_its_last_line():
    scheduler = ServiceSpec("scheduler", (sys.executable, "-c", "import sys\n"
                                          "print('listening on 127.0.0.1:1', file=sys.stderr)\n"
                                          "print('fatal: engine stopped', file=sys.stderr)\nsys.exit(1)"), {})
    stack = LocalStack([scheduler])
    stack.start()
    try:
        wait_for(lambda: stack.failed)
        assert stack.failure == "the scheduler exited with code 1: fatal: engine stopped"
    finally:
        stack.stop()


def serve_specs(*flags: str) -> list[ServiceSpec]:
    scheduler, executors = build_configs(build_parser().parse_args(["serve", *flags]))
    return stack_specs(scheduler, executors)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago, with room above each for derived ports."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 60000 and all(abs(port - p) > 20 for p in ports):
            ports.append(port)
    return ports


def test_every_fixed_port_of_the_stack_is_labelled_with_its_serve_flag():
    grpc, http, metrics = free_ports(3)
    ports = stack_ports(serve_specs("--port", str(grpc), "--http-port", str(http), "--metrics-port",
                                    str(metrics), "--executors", "2"))
    assert {(p.flag, p.port) for p in ports} == {
        ("--port", grpc), ("--http-port", http), ("--metrics-port", metrics),
        ("--port (executor-0 listens on --port + 10)", grpc + 10),
        ("--port (executor-1 listens on --port + 11)", grpc + 11),
        ("--metrics-port (executor-0's metrics are on --metrics-port + 1)", metrics + 1),
        ("--metrics-port (executor-1's metrics are on --metrics-port + 2)", metrics + 2)}


@pytest.mark.parametrize("taken", ["--port", "--http-port", "--metrics-port", "executor"])
def test_a_taken_port_stops_the_stack_before_anything_starts(taken):
    grpc, http, metrics = free_ports(3)
    busy = {"--port": grpc, "--http-port": http, "--metrics-port": metrics, "executor": grpc + 10}[taken]
    specs = serve_specs("--port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        stack = LocalStack(specs)
        with pytest.raises(PortInUseError) as raised:
            stack.start()
    assert str(raised.value).startswith("--port" if taken == "executor" else taken)
    assert f"127.0.0.1:{busy}" in str(raised.value)
    assert not stack.processes                          # nothing was started


def test_serve_takes_the_restart_limit_from_its_flags():
    from clients.serve_command import restart_policy
    from pagedserve.errors import InvalidArgumentError

    parse = build_parser().parse_args
    assert restart_policy(parse(["serve"])) == RestartPolicy()
    assert restart_policy(parse(["serve", "--restart-limit", "2", "--restart-limit-interval", "30"])) == \
        RestartPolicy(burst=2, interval=30.0)
    assert restart_policy(parse(["serve", "--restart-limit", "0"])).burst == 0      # never restart
    with pytest.raises(InvalidArgumentError, match="restart_limit"):
        restart_policy(parse(["serve", "--restart-limit", "-1"]))
    with pytest.raises(InvalidArgumentError, match="restart_limit_interval"):
        restart_policy(parse(["serve", "--restart-limit-interval", "0"]))


def test_a_restart_limit_of_zero_gives_up_on_the_first_crash():
    crashes = executor("print('listening on 127.0.0.1:1', file=sys.stderr, flush=True)\n"
                       "time.sleep(0.2)\nprint('killed', file=sys.stderr)\nsys.exit(1)")
    stack = LocalStack([crashes, SCHEDULER], restart_policy=RestartPolicy(burst=0))
    stack.start()
    try:
        wait_for(lambda: stack.failed)
        assert stack.processes["executor-0"].restarts == 0
        assert stack.failure == ("executor-0 exited with code 1 after 0 restarts within 300 s; giving up: "
                                 "killed")
    finally:
        stack.stop()
