"""The executor's gRPC server: a thin layer over an ExecutorBackend.

Backend calls run on one worker thread so the event loop keeps answering health checks while a step
computes. The Execute stream's plans go to that thread through a StepPipeline: with
`overlap_steps`, the next plan is launched while the step before it still computes (when the backend
can launch steps, as the model backend does), and results go back strictly in step order. A plan the
backend rejects is answered with an error result for that step, and the stream goes on. Every step
and the KV cache size are recorded in ExecutorMetrics, served at `/metrics` for Prometheus.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from executor_svc.backend import ExecutorBackend, StepLauncher, launcher_of
from executor_svc.config import ExecutorConfig
from executor_svc.metrics import ExecutorMetrics
from executor_svc.step_pipeline import STOP, PlanInbox, StepHandle, StepPipeline, WorkerThread
from executor_svc.step_watchdog import StepWatchdog
from pagedserve.contract.plan import MalformedPlanError, StepPlan, StepResult
from pagedserve.contract.plan_codec import error_result, plan_from_proto, result_to_proto
from pagedserve.gc_policy import settle_heap
from pagedserve.grpc_decoding import DecodeErrorInterceptor, Undecodable
from pagedserve.metrics_http import metrics_url, start_metrics_server
from pagedserve.model_label import model_label
from pagedserve.v1 import executor_pb2 as pb
from pagedserve.v1 import executor_pb2_grpc

log = logging.getLogger("pagedserve.executor")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExecutorService"].full_name
EXECUTE_METHOD = f"/{SERVICE_NAME}/Execute"
SHUTDOWN_GRACE_SECONDS = 5.0


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """Describe, InitCache and the Execute stream over one backend; one scheduler at a time."""

    def __init__(self, backend: ExecutorBackend, metrics: ExecutorMetrics | None = None,
                 watchdog: StepWatchdog | None = None, overlap_steps: bool = True) -> None:
        self._backend = backend
        self._launch: StepLauncher = launcher_of(backend)
        self._max_in_flight = 2 if overlap_steps else 1
        self._metrics = metrics if metrics is not None else ExecutorMetrics()
        self._worker = WorkerThread("executor-step")
        self._stream_open = False
        self._watchdog = watchdog if watchdog is not None else StepWatchdog(_no_health)
        self._watchdog_task: asyncio.Task[None] | None = None

    async def _on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def Describe(self, request: pb.DescribeRequest,
                       context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        """The model shard this rank serves."""
        return pb.DescribeResponse(**dataclasses.asdict(self._backend.describe()))

    async def InitCache(self, request: pb.InitCacheRequest,
                        context: grpc.aio.ServicerContext) -> pb.InitCacheResponse:
        """Size and allocate the KV cache; refused while a scheduler's Execute stream is open."""
        size = request.block_size
        if size <= 0 or size & (size - 1):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"block_size: must be a power of two, got {size}")
        if not 0.0 < request.gpu_memory_utilization <= 1.0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "gpu_memory_utilization: must be in "
                                f"(0, 1], got {request.gpu_memory_utilization}")
        if self._stream_open:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "the KV cache cannot change while an Execute stream is open")
        self._start_watchdog(request.step_timeout_seconds)
        cache = await self._on_worker(self._backend.init_cache, size, request.gpu_memory_utilization,
                                      request.swap_space_bytes, request.max_num_batched_tokens)
        log.info("KV cache: %d GPU blocks, %d CPU blocks of %d tokens", cache.num_gpu_blocks,
                 cache.num_cpu_blocks, size)
        self._metrics.record_cache(cache.num_gpu_blocks, cache.num_cpu_blocks)
        settle_heap()                   # the cache, the graphs and their buffers will live until the next
        return pb.InitCacheResponse(**dataclasses.asdict(cache))

    async def Execute(self, request_iterator: AsyncIterator[pb.StepPlan],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StepResult]:
        """Answer each plan with one result, in order. A new stream starts with no sequences.

        Plans are read (`context.read`, so that an undecodable one reaches the pipeline in its turn
        rather than ending the call at once) while earlier ones compute; an undecodable plan ends the
        call with INVALID_ARGUMENT once every plan before it is answered.
        """
        if not self._backend.cache_ready:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "call InitCache before Execute")
        if self._stream_open:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "another Execute stream is open: an executor serves one scheduler")
        self._stream_open = True
        loop = asyncio.get_running_loop()
        inbox: PlanInbox[_Answer] = PlanInbox()
        answers: asyncio.Queue[_Answer | None] = asyncio.Queue()
        reader = loop.create_task(_read_plans(context, inbox), name="execute-reader")
        try:
            await self._on_worker(self._backend.reset_sequences)
            def emit(answer: _Answer | None) -> None:       # from the worker thread
                loop.call_soon_threadsafe(answers.put_nowait, answer)

            pipeline = StepPipeline(self._launch_step, emit, self._watchdog, self._max_in_flight)
            worker = loop.run_in_executor(self._worker, _run_then_close, pipeline, inbox, emit)
            while (answer := await answers.get()) is not None:
                if isinstance(answer, _Rejection):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, answer.details)
                yield answer
            await worker                    # re-raises what ended the pipeline, if anything did
        finally:
            reader.cancel()
            inbox.put(STOP)                 # the client went away: the worker answers what is in flight
            self._stream_open = False

    def _start_watchdog(self, step_timeout_seconds: float) -> None:
        """Watch steps against the scheduler's timeout from now on (0: no limit)."""
        self._watchdog.timeout = max(step_timeout_seconds, 0.0)
        if self._watchdog_task is None:
            self._watchdog_task = asyncio.get_running_loop().create_task(self._watchdog.run(),
                                                                         name="step-watchdog")

    def _launch_step(self, msg: object) -> _AnsweredStep:
        """Decode and launch one plan on the worker thread; a rejected plan is answered at once."""
        if isinstance(msg, _Rejection):
            return _AnsweredStep.failed(self._metrics, msg)
        assert isinstance(msg, pb.StepPlan)
        try:
            plan = plan_from_proto(msg)
            return _AnsweredStep(self._metrics, msg.step_id, plan, self._launch(plan))
        except (MalformedPlanError, ValueError) as err:
            log.warning("step %d rejected: %s", msg.step_id, err)
            self._metrics.record_step_error()
            return _AnsweredStep.failed(self._metrics, error_result(msg.step_id, f"malformed plan: {err}"))
        except Exception as err:
            log.exception("step %d failed", msg.step_id)
            self._metrics.record_step_error()
            failure = error_result(msg.step_id, f"executor failure: {err!r}")
            return _AnsweredStep.failed(self._metrics, failure)


@dataclass(frozen=True, slots=True)
class _Rejection:
    """A plan whose bytes did not decode: the call ends with INVALID_ARGUMENT when its turn comes."""

    details: str


# What the worker thread hands back for each plan, in order.
_Answer = pb.StepResult | _Rejection


class _AnsweredStep:
    """A launched step as the stream answers it: its result encoded, any failure its error result."""

    def __init__(self, metrics: ExecutorMetrics, step_id: int, plan: StepPlan | None,
                 handle: StepHandle[StepResult] | None, answer: _Answer | None = None) -> None:
        self._metrics = metrics
        self._step_id = step_id
        self._plan = plan
        self._handle = handle
        self._answer = answer

    @classmethod
    def failed(cls, metrics: ExecutorMetrics, answer: _Answer) -> _AnsweredStep:
        """A step answered with an error (or a rejection) before it ran."""
        step_id = answer.step_id if isinstance(answer, pb.StepResult) else -1
        return cls(metrics, step_id, None, None, answer)

    def ready(self) -> bool:
        """Whether finishing would not wait for the device."""
        return self._handle is None or self._handle.ready()

    def finish(self) -> _Answer:
        """The step's result message; a failure while finishing is that step's error."""
        if self._answer is not None:
            return self._answer
        assert self._handle is not None and self._plan is not None
        try:
            result = self._handle.finish()
            answer = result_to_proto(result)
        except Exception as err:
            log.exception("step %d failed", self._step_id)
            self._metrics.record_step_error()
            return error_result(self._step_id, f"executor failure: {err!r}")
        self._metrics.record_step(self._plan, result)
        return answer


async def _read_plans(context: grpc.aio.ServicerContext, inbox: PlanInbox[_Answer]) -> None:
    """Hand each plan of the stream to the worker thread as it arrives (an undecodable one as a
    _Rejection, which ends the stream); STOP when the stream ends."""
    try:
        index = 0
        while (msg := await context.read()) is not grpc.aio.EOF:
            if isinstance(msg, Undecodable):
                inbox.put(_Rejection(msg.details(EXECUTE_METHOD, index)))
                break
            inbox.put(msg)
            index += 1
    finally:
        inbox.put(STOP)


def _run_then_close(pipeline: StepPipeline[_Answer], inbox: PlanInbox[_Answer],
                    close: Callable[[_Answer | None], None]) -> None:
    """Run the pipeline on the worker thread; the answer stream ends (None) however it returns."""
    try:
        pipeline.run(inbox)
    finally:
        close(None)


async def _no_health(serving: bool) -> None:
    """The watchdog's health hook when the servicer runs without a health service (tests)."""


async def _set_health(servicer: health.aio.HealthServicer, serving: bool) -> None:
    """Set the whole server's and the ExecutorService's health."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await servicer.set(name, status)


def _message_options(config: ExecutorConfig) -> list[tuple[str, int]]:
    # Block tables of big batches exceed gRPC's 4 MiB default.
    return [("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_receive_message_length", config.max_message_bytes)]


async def start_server(config: ExecutorConfig, backend: ExecutorBackend,
                       metrics: ExecutorMetrics | None = None) -> tuple[grpc.aio.Server, int]:
    """Start serving; returns the server and the port it bound (useful with port 0).

    Steps are recorded in `metrics` (a private set when None); serving them over HTTP is serve()'s job.
    """
    server = grpc.aio.server(options=_message_options(config), interceptors=[DecodeErrorInterceptor()])
    health_servicer = health.aio.HealthServicer()
    watchdog = StepWatchdog(functools.partial(_set_health, health_servicer))
    servicer = ExecutorServicer(backend, metrics, watchdog, overlap_steps=config.overlap_steps)
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"cannot listen on {config.address}")
    await server.start()
    await _set_health(health_servicer, True)
    return server, port


async def serve(config: ExecutorConfig, backend: ExecutorBackend) -> None:
    """Serve until SIGTERM or SIGINT, then stop within a short grace period.

    The metrics server starts (and logs its URL) before the gRPC server, so by the time `listening on`
    is logged, everything is up.
    """
    metrics = ExecutorMetrics(rank=config.rank,
                              model_name=model_label(config.served_model_name, config.model))
    if config.metrics_port >= 0:
        metrics_port = start_metrics_server(metrics.registry, config.host, config.metrics_port)
        log.info("metrics on %s", metrics_url(config.host, metrics_port))
    settle_heap()                       # the model is loaded: freeze it with every module
    server, port = await start_server(config, backend, metrics)
    log.info("pagedserve-executor listening on %s:%d (backend %s, rank %d/%d)", config.host, port,
             config.backend.value, config.rank, config.world_size)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        backend.begin_shutdown()            # first, before the peers that get the same signal go away
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await stop.wait()
    log.info("shutting down")
    await server.stop(SHUTDOWN_GRACE_SECONDS)
