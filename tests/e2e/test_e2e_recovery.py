"""Executor loss, draining and the frontend's limits, through real processes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from clients.client import PagedServeClient, PagedServeError

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _requests(count: int) -> list[dict]:
    return [{"prompt": f"def step_{i}(state):", "max_tokens": 60, "temperature": 0.9, "seed": 100 + i,
             "ignore_eos": True} for i in range(count)]


class StreamsInFlight:
    """Requests streaming on threads; collects each one's tokens, or the error that ended it."""

    def __init__(self, target: str, requests: list[dict]) -> None:
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.errors: list[PagedServeError | None] = [None] * len(requests)
        self.threads = [threading.Thread(target=self._run, args=(target, i, r), daemon=True)
                        for i, r in enumerate(requests)]
        for t in self.threads:
            t.start()

    def _run(self, target: str, i: int, request: dict) -> None:
        try:
            with PagedServeClient(target) as client:
                for event in client.stream(**request):
                    for choice in event.choices:
                        self.tokens[i].extend(choice.token_ids)
        except PagedServeError as err:
            self.errors[i] = err

    def wait_for_tokens(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while min(len(t) for t in self.tokens) < count:
            assert time.monotonic() < deadline, "streams made no progress"
            time.sleep(0.02)

    def join(self, timeout: float = 300.0) -> None:
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a stream never ended"


def _kill_executor(running) -> None:
    running.stack.processes["executor-0"].proc.send_signal(signal.SIGKILL)


def test_killed_executor_is_restarted_and_waiting_requests_finish_unchanged(stack, start_stack):
    requests = _requests(6)
    with stack.client() as client:
        expected = [list(client.generate(**r).outputs[0].token_ids) for r in requests]
    running = start_stack()
    streams = StreamsInFlight(running.target, requests)
    streams.wait_for_tokens(5)
    _kill_executor(running)
    running.wait_health(NOT_SERVING, timeout=30)
    running.wait_health(SERVING, timeout=120)      # the launcher restarted it on the same port
    streams.join()
    assert streams.errors == [None] * len(requests)
    assert streams.tokens == expected              # invariant 4: recomputed, nothing lost or changed
    assert running.stack.processes["executor-0"].restarts == 1


def _stop_executor_and_time_not_serving(running, timeout: float) -> float:
    """SIGSTOP the executor; seconds until the scheduler reads NOT_SERVING."""
    stopped = time.monotonic()
    running.stack.processes["executor-0"].proc.send_signal(signal.SIGSTOP)
    running.wait_health(NOT_SERVING, timeout=timeout + 10)
    return time.monotonic() - stopped


def test_stopped_executor_is_found_hung_restarted_and_requests_finish_unchanged(stack, start_stack):
    """A SIGSTOPped executor never exits and never answers: the health probes find it (mid-run and
    idle), the launcher kills and restarts it, and the requests finish as if nothing happened."""
    requests = _requests(6)
    with stack.client() as client:
        expected = [list(client.generate(**r).outputs[0].token_ids) for r in requests]
    timeout = 3.0
    running = start_stack("--executor-health-timeout-seconds", str(timeout))
    streams = StreamsInFlight(running.target, requests)
    streams.wait_for_tokens(5)
    # The probe runs each second, and its answer may take the whole timeout.
    assert _stop_executor_and_time_not_serving(running, timeout) <= timeout + 1.5
    running.wait_health(SERVING, timeout=120)
    streams.join()
    assert streams.errors == [None] * len(requests)
    assert streams.tokens == expected              # invariant 4: recomputed, nothing lost or changed
    assert running.stack.processes["executor-0"].restarts == 1
    assert _stop_executor_and_time_not_serving(running, timeout) <= timeout + 1.5    # idle now
    running.wait_health(SERVING, timeout=120)
    with running.client() as client:
        assert list(client.generate(**requests[0]).outputs[0].token_ids) == expected[0]
    assert running.stack.processes["executor-0"].restarts == 2


def test_a_killed_tensor_parallel_rank_restarts_its_group_and_requests_finish_unchanged(stack, start_stack):
    requests = [{**r, "temperature": 0.0} for r in _requests(4)]
    with stack.client() as client:
        expected = [list(client.generate(**r).outputs[0].token_ids) for r in requests]
    running = start_stack("--executors", "2")
    streams = StreamsInFlight(running.target, requests)
    streams.wait_for_tokens(5)
    running.stack.processes["executor-1"].proc.send_signal(signal.SIGKILL)
    running.wait_health(NOT_SERVING, timeout=30)
    running.wait_health(SERVING, timeout=180)      # both ranks restarted and rejoined their group
    streams.join()
    assert streams.errors == [None] * len(requests)
    assert streams.tokens == expected
    assert [running.stack.processes[f"executor-{r}"].restarts for r in range(2)] == [1, 1]


def test_a_killed_rank_ends_its_peer_so_a_process_supervisor_can_restart_the_group(start_stack):
    """Without the launcher's group restart (as under Compose, which restarts one container), the
    surviving rank notices the silent peer and exits with code 3, so its supervisor restarts it too."""
    running = start_stack("--executors", "2", "--distributed-heartbeat-timeout-seconds", "3",
                          restart_executors=False)
    survivor = running.stack.processes["executor-0"].proc
    running.stack.processes["executor-1"].proc.send_signal(signal.SIGKILL)
    assert survivor.wait(timeout=60) == 3


def test_a_tensor_parallel_stack_stops_cleanly(start_stack):
    """SIGTERM reaches every rank before any leaves, so no rank takes its peer's exit for a failure."""
    running = start_stack("--executors", "2", "--distributed-heartbeat-timeout-seconds", "3")
    with running.client() as client:
        assert len(client.generate("def f():", max_tokens=4).outputs[0].token_ids) == 4
    running.stop()
    assert [running.stack.processes[f"executor-{r}"].proc.returncode for r in range(2)] == [0, 0]


def test_past_the_grace_period_live_streams_fail_with_unavailable(start_stack):
    running = start_stack("--executor-grace-seconds", "2", restart_executors=False)
    streams = StreamsInFlight(running.target, _requests(3))
    streams.wait_for_tokens(3)
    _kill_executor(running)
    running.wait_health(NOT_SERVING, timeout=30)
    streams.join(timeout=60)
    assert [e.code if e else None for e in streams.errors] == [grpc.StatusCode.UNAVAILABLE] * 3
    with running.client() as client, pytest.raises(PagedServeError) as err:
        client.generate("def f():", max_tokens=4)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert running.metric('pagedserve_requests_finished_total{finish_reason="error"}') == 3


def test_sigterm_drains_live_requests_and_refuses_new_ones(start_stack):
    running = start_stack()
    streams = StreamsInFlight(running.target, _requests(2))
    streams.wait_for_tokens(2)
    scheduler = running.stack.processes["scheduler"].proc
    scheduler.send_signal(signal.SIGTERM)
    running.wait_health(NOT_SERVING, timeout=10)
    with running.client() as client, pytest.raises(PagedServeError) as err:
        client.generate("def f():", max_tokens=4)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    streams.join()
    assert streams.errors == [None, None] and [len(t) for t in streams.tokens] == [60, 60]
    assert scheduler.wait(timeout=30) == 0


def test_full_waiting_queue_is_resource_exhausted(start_stack):
    running = start_stack("--max-num-seqs", "1", "--max-waiting-requests", "1")
    with running.client() as client:
        first = client.stream("def a():", max_tokens=300, ignore_eos=True)
        next(first)                                     # running
        second = client.stream("def b():", max_tokens=4, ignore_eos=True, request_id="queued")
        waiting = threading.Thread(target=lambda: list(second), daemon=True)
        waiting.start()
        deadline = time.monotonic() + 30
        while running.metric("pagedserve_requests_waiting") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(PagedServeError) as err:
            client.generate("def c():", max_tokens=4)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.close()
        waiting.join(timeout=60)
    assert running.metric('pagedserve_requests_rejected_total{code="RESOURCE_EXHAUSTED"}') == 1


def test_bearer_token_is_required_when_configured(start_stack):
    running = start_stack("--auth-token", "s3cret")
    with running.client() as client:
        with pytest.raises(PagedServeError) as err:
            client.generate("def f():", max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert client.health() == "SERVING"         # health stays open for load balancers
    with running.client(token="wrong") as client, pytest.raises(PagedServeError):
        client.model_info()
    with running.client(token="s3cret") as client:
        assert client.generate("def f():", max_tokens=2).usage.completion_tokens == 2


def test_tls(tmp_path, start_stack):
    if subprocess.run(["openssl", "version"], capture_output=True).returncode != 0:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    running = start_stack("--tls-cert-file", str(cert), "--tls-key-file", str(key))
    with running.client(root_certificates=cert.read_bytes()) as client:
        assert client.generate("def f():", max_tokens=3).usage.completion_tokens == 3
