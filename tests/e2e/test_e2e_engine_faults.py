"""Faults the process tests cannot stage, in one process: a wedged step, a dead stream, a dead loop.

The scheduler and an executor on the simulated backend run on one event loop. In the first test the
backend's fourth step blocks until the test releases it, as a stuck kernel or collective would: the
scheduler must give up on the step after executor_step_timeout_seconds (NOT_SERVING, requests kept),
the rank's own health must read NOT_SERVING while the step is overdue (so a supervisor restarts it),
and once the rank serves again every request must finish exactly as without the fault.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import AsyncPagedServeClient, PagedServeError
from executor_svc.config import ExecutorConfig
from executor_svc.server import start_server
from executor_svc.simulated_backend import SimulatedBackend
from pagedserve.contract.plan import StepPlan, StepResult
from pagedserve.v1 import executor_pb2 as pb
from scheduler_svc.config import SchedulerServiceConfig
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.server import SchedulerServer

STEP_TIMEOUT = 1.5
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REQUESTS = [{"prompt": [5 + i, 6, 7], "max_tokens": 12, "temperature": 1.0, "seed": 40 + i,
             "ignore_eos": True} for i in range(4)]


class WedgingBackend:
    """The simulated backend, but the `wedge_at`-th step blocks until `release` is set."""

    def __init__(self, inner: SimulatedBackend, wedge_at: int) -> None:
        self.inner = inner
        self.wedge_at = wedge_at
        self.steps = 0
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, plan: StepPlan) -> StepResult:
        """Run the plan; the wedged one waits for the release first (on the worker thread)."""
        self.steps += 1
        if self.steps == self.wedge_at:
            self.release.wait(timeout=60)
        return self.inner.execute(plan)


async def _health(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status


async def _wait_for(predicate: Any, timeout: float) -> float:
    """Poll an async predicate; returns the seconds it took (fails the test after `timeout`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await predicate():
        assert loop.time() - start < timeout, "the condition never held"
        await asyncio.sleep(0.05)
    return loop.time() - start


async def _generate_all(target: str) -> list[list[int]]:
    async with AsyncPagedServeClient(target) as client:
        completions = await asyncio.gather(*(client.generate(**r) for r in REQUESTS))
    return [list(c.outputs[0].token_ids) for c in completions]


async def _serve(backend: Any, step_timeout: float) -> tuple[Any, SchedulerServer, str]:
    executor_config = ExecutorConfig(backend="simulated", port=0, metrics_port=-1, simulated_vocab_size=256)
    executor, port = await start_server(executor_config, backend)
    config = SchedulerServiceConfig.of(port=0, http_port=0, metrics_port=-1,
                                       executor_addresses=f"127.0.0.1:{port}",
                                       executor_step_timeout_seconds=step_timeout, startup_timeout_seconds=30,
                                       swap_space_bytes=2**20)
    scheduler = SchedulerServer(config)
    await scheduler.start()
    await scheduler.engine.start()
    return executor, scheduler, f"127.0.0.1:{port}"


async def _run(wedge_at: int) -> tuple[list[list[int]], dict[str, float]]:
    backend = WedgingBackend(SimulatedBackend(ExecutorConfig(backend="simulated", simulated_vocab_size=256)),
                             wedge_at)
    executor, scheduler, executor_address = await _serve(backend, STEP_TIMEOUT)
    target = f"127.0.0.1:{scheduler.port}"
    timings: dict[str, float] = {}
    try:
        outputs = asyncio.create_task(_generate_all(target))
        if wedge_at:
            await _wait_for(lambda: asyncio.sleep(0, backend.steps >= wedge_at), timeout=30)
            timings["scheduler"] = await _wait_for(
                lambda: asyncio.sleep(0, not scheduler.engine.serving), timeout=STEP_TIMEOUT + 5)
            timings["rank"] = await _wait_for(
                lambda: _is(executor_address, NOT_SERVING), timeout=STEP_TIMEOUT + 5)
            assert not outputs.done()                   # the requests wait for the rank: nothing lost
            backend.release.set()                       # as if a supervisor had restarted it
            await _wait_for(lambda: _is(executor_address, SERVING), timeout=10)
        return await asyncio.wait_for(outputs, timeout=60), timings
    finally:
        backend.release.set()
        await scheduler.engine.stop()
        await scheduler.server.stop(grace=0)
        await executor.stop(grace=0)


async def _is(address: str, status: int) -> bool:
    return await _health(address) == status


def test_a_wedged_step_is_given_up_after_the_step_timeout_and_its_requests_finish_unchanged():
    expected, _ = asyncio.run(_run(wedge_at=0))
    outputs, timings = asyncio.run(_run(wedge_at=4))
    assert outputs == expected                          # invariant 4: recomputed, nothing lost or changed
    assert timings["scheduler"] <= STEP_TIMEOUT + 1.0
    assert timings["rank"] <= STEP_TIMEOUT + 1.5        # the watchdog checks twice a second


async def _send_after_the_rank_is_gone() -> None:
    backend = SimulatedBackend(ExecutorConfig(backend="simulated", simulated_vocab_size=256))
    executor, scheduler, address = await _serve(backend, STEP_TIMEOUT)
    await scheduler.engine.stop()                       # the link below is the rank's only client
    link = ExecutorLink(address, rank=0)
    try:
        link.open_stream()
        await executor.stop(grace=0)                    # the rank goes away between two plans
        with pytest.raises(grpc.RpcError):
            for _ in range(50):                          # until the ended call is noticed
                await link.send(pb.StepPlan(step_id=1))
                await asyncio.sleep(0.02)
    finally:
        await link.close()
        await scheduler.server.stop(grace=0)


def test_a_plan_sent_on_a_stream_that_already_ended_raises_an_rpc_error():
    """grpc.aio raises InvalidStateError there; the engine only recovers from RpcError."""
    asyncio.run(_send_after_the_rank_is_gone())


async def _loop_dies() -> tuple[list[BaseException | list[int]], int, Any]:
    backend = SimulatedBackend(ExecutorConfig(backend="simulated", simulated_vocab_size=256))
    executor, scheduler, _ = await _serve(backend, STEP_TIMEOUT)
    engine = scheduler.engine
    assert engine.scheduler is not None
    process_result = engine.scheduler.process_result
    calls = 0

    def failing_process_result(result: StepResult) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("a scheduler bug")
        return process_result(result)

    engine.scheduler.process_result = failing_process_result  # type: ignore[method-assign]
    target = f"127.0.0.1:{scheduler.port}"
    try:
        async with AsyncPagedServeClient(target) as client:
            outcomes = await asyncio.gather(*(client.generate(**r) for r in REQUESTS), return_exceptions=True)
            with pytest.raises(PagedServeError) as refused:
                await client.generate(**REQUESTS[0])
        return outcomes, await _health(target), refused.value
    finally:
        await scheduler.engine.stop()
        await scheduler.server.stop(grace=0)
        await executor.stop(grace=0)


def test_an_unexpected_error_that_ends_the_engine_loop_ends_every_request_and_reads_not_serving():
    outcomes, health, refused = asyncio.run(_loop_dies())
    assert all(isinstance(o, PagedServeError) and o.code == grpc.StatusCode.INTERNAL
               and "a scheduler bug" in o.message for o in outcomes)
    assert health == NOT_SERVING
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "engine stopped" in refused.message
