"""The engine loop: the scheduler driven against real executor ranks, one StepPlan per iteration.

Startup: every rank answers Describe and InitCache; the scheduler takes the smallest block counts
(DESIGN.md §5) and one Execute stream opens per rank. Each iteration then schedules, encodes the plan
once, sends it to every rank, and, while the ranks compute, hands the previous step's reports to the
request streams (detokenization, stop strings, client pushes). That overlap is safe because a
sequence a stop string ends while its next step is in flight is simply skipped when that step's
result arrives, exactly like an abort.

With `async_scheduling` the engine also plans step N+1 and sends it before step N's result arrives
(`Scheduler.schedule_ahead`), so the ranks start it as soon as step N ends: scheduling, result
processing and the request streams all run while the GPU computes, and only the ranks' own per-step
host work is left between two forward passes. Where a plan cannot be made ahead the engine waits for
the result, as without the option.

When a rank fails (its stream breaks, it dies, or it rejects a plan) or hangs (a step result later
than `executor_step_timeout_seconds`, or no SERVING health answer for
`executor_health_timeout_seconds`: a wedged or a stopped process), the engine reports NOT_SERVING,
keeps every live request, drops the step in flight, and reconnects. Once every rank serves again the
requests are recomputed from the tokens they had (DESIGN.md invariant 4). Past
`executor_grace_seconds` they end with UNAVAILABLE, and new requests are refused until the ranks are
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from pagedserve.contract.plan import StepPlan, StepResult
from pagedserve.contract.plan_codec import ExecutorStepError, plan_to_proto, result_from_proto
from pagedserve.errors import InvalidArgumentError, RequestErrorKind
from pagedserve.v1 import executor_pb2 as pb
from scheduler_svc.config import SchedulerServiceConfig
from scheduler_svc.executor_link import ExecutorLink
from scheduler_svc.metrics import SchedulerMetrics
from scheduler_svc.outputs import RequestOutput
from scheduler_svc.request_log import RequestSummary, log_request_ended
from scheduler_svc.request_stream import RequestStream
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.sequence import FinishReason
from scheduler_svc.tokenizer import TokenTexts

log = logging.getLogger("pagedserve.engine")
RECONNECT_INTERVAL_SECONDS = 0.5
LIVENESS_PROBE_INTERVAL_SECONDS = 1.0
STATS_LOG_INTERVAL_SECONDS = 10.0


class UnavailableError(RuntimeError):
    """No executor serves: none is ready yet, or they were lost past the grace period."""


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting_requests` requests."""


class ShuttingDownError(RuntimeError):
    """The server is draining and takes no new requests."""


class ExecutorHungError(RuntimeError):
    """A rank sent no step result within executor_step_timeout_seconds, or no SERVING health answer
    for executor_health_timeout_seconds."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the executors serve and how much KV cache they hold (minimum over ranks)."""

    model_name: str
    max_model_len: int
    block_size: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    world_size: int

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the GPU KV cache holds across all sequences."""
        return self.num_gpu_blocks * self.block_size


@dataclass(frozen=True, slots=True)
class _SentStep:
    """A plan sent to the ranks: when its iteration began and what the scheduler looked like then."""

    plan: StepPlan
    started: float              # perf_counter when scheduling it began
    schedule_seconds: float
    sent: float                 # perf_counter when it was on its way to every rank
    batch: Any                  # SchedulerStats before its results retire finished requests


@dataclass(frozen=True, slots=True)
class StepTiming:
    """Where one iteration's time went, in seconds."""

    schedule: float
    step: float            # plan sent to every rank until every result arrived (queueing included)
    executor_forward: float
    executor_swap: float


class Engine:
    """Owns the scheduler and the executor links; the frontend calls `submit`, `abort` and `model_info`."""

    def __init__(self, config: SchedulerServiceConfig, tokenizer: Any, metrics: SchedulerMetrics,
                 on_serving_change: Callable[[bool], None] = lambda serving: None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self._token_texts = TokenTexts(tokenizer)
        self._on_serving_change = on_serving_change
        self.links = [ExecutorLink(address, rank)
                      for rank, address in enumerate(config.serving.executor_list)]
        self.scheduler: Scheduler | None = None
        self.info: ModelInfo | None = None
        self.streams: dict[str, RequestStream] = {}
        self.serving = False
        self.unavailable_since: float | None = None     # when the ranks were lost, None while serving
        self.draining = False
        self.last_step: StepTiming | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pending: list[RequestOutput] = []
        self._sent: deque[_SentStep] = deque()        # plans in flight, oldest first
        self._last_result = 0.0                       # perf_counter when the last result arrived
        self._throughput = _ThroughputLog()
        # Fails with ExecutorHungError when the liveness probe finds a hung rank; a new one after each
        # recovery, so that a probe's finding is about the ranks it probed.
        self._hung: asyncio.Future[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._stopped_by: BaseException | None = None   # what ended the loop, if it died

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Handshake with every rank (waiting up to startup_timeout_seconds), then run the loop."""
        deadline = time.monotonic() + self.config.serving.startup_timeout_seconds
        await self._handshake(deadline, first=True)
        self._hung = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="engine-loop")
        self._task.add_done_callback(self._loop_ended)
        self._probe = asyncio.create_task(self._probe_liveness(), name="executor-liveness")

    async def stop(self) -> None:
        """Abort what is still live, stop the loop and close the links."""
        for request_id in list(self.streams):
            self.abort(request_id)
        for task in (self._task, self._probe):
            if task is not None:
                task.cancel()
                # A loop that died on an error has been reported by _loop_ended already.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for link in self.links:
            await link.close()

    async def _handshake(self, deadline: float, first: bool) -> None:
        """Wait for every rank to serve, size the KV cache, and open the Execute streams."""
        for link in self.links:
            while not await link.is_serving(timeout=2.0):
                if time.monotonic() > deadline:
                    raise UnavailableError(f"executor rank {link.rank} at {link.address} is not serving")
                await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)
        described = [await link.describe() for link in self.links]
        request = pb.InitCacheRequest(block_size=self.config.scheduling.block_size,
                                      gpu_memory_utilization=self.config.scheduling.gpu_memory_utilization,
                                      swap_space_bytes=self.config.scheduling.swap_space_bytes,
                                      max_num_batched_tokens=self._max_step_tokens(),
                                      step_timeout_seconds=self.config.serving.executor_step_timeout_seconds)
        # All at once: under tensor parallelism the ranks' profiling passes meet in collectives.
        caches = await asyncio.gather(*(link.init_cache(request) for link in self.links))
        num_gpu = min(c.num_gpu_blocks for c in caches)
        num_cpu = min(c.num_cpu_blocks for c in caches)
        if first:
            self._build_scheduler(described, num_gpu, num_cpu)
        elif self.info is not None and (num_gpu < self.info.num_gpu_blocks
                                        or num_cpu < self.info.num_cpu_blocks):
            raise UnavailableError(
                f"the restarted executors hold {num_gpu} GPU / {num_cpu} CPU blocks, fewer than the "
                f"{self.info.num_gpu_blocks} / {self.info.num_cpu_blocks} this scheduler started with")
        for link in self.links:
            link.open_stream()
        self._set_serving(True)

    def _max_step_tokens(self) -> int:
        return self.config.scheduling.max_num_batched_tokens + self.config.scheduling.max_num_seqs

    def _build_scheduler(self, described: list[pb.DescribeResponse], num_gpu: int, num_cpu: int) -> None:
        head = described[0]
        max_model_len = min(d.max_model_len for d in described)
        if self.config.scheduling.max_model_len is not None:
            max_model_len = min(max_model_len, self.config.scheduling.max_model_len)
        self.scheduler = Scheduler(self.config.scheduling, num_gpu, num_cpu, max_model_len,
                                   eos_token_ids=head.eos_token_ids, vocab_size=head.vocab_size)
        self.info = ModelInfo(model_name=self.config.serving.served_model_name or head.model_name,
                              max_model_len=max_model_len, block_size=self.config.scheduling.block_size,
                              num_gpu_blocks=num_gpu, num_cpu_blocks=num_cpu, vocab_size=head.vocab_size,
                              eos_token_ids=tuple(head.eos_token_ids), world_size=len(self.links))
        self.metrics.set_cache_info(num_gpu, num_cpu, self.config.scheduling.block_size)
        log.info("serving %s: %d GPU blocks (%d tokens), %d CPU blocks, max_model_len %d, %d rank(s)",
                 self.info.model_name, num_gpu, self.info.kv_capacity_tokens, num_cpu, max_model_len,
                 len(self.links))

    def _set_serving(self, serving: bool) -> None:
        self.serving = serving
        self.unavailable_since = None if serving else time.monotonic()
        self.metrics.set_executors(len(self.links) if serving else 0, len(self.links))
        self._on_serving_change(serving)

    # ---- requests --------------------------------------------------------------------------------

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               skip_special_tokens: bool = True) -> RequestStream:
        """Queue a request; raises InvalidArgumentError, QueueFullError, UnavailableError or
        ShuttingDownError, each before anything is queued."""
        if self.draining:
            raise ShuttingDownError("the server is shutting down; send the request to another replica")
        scheduler = self.scheduler
        if scheduler is None:
            raise UnavailableError("no executor is serving yet; retry once health reports SERVING")
        if self._grace_expired():
            raise UnavailableError("no executor is serving: they were lost and have not come back")
        if self._stopped_by is not None:
            raise UnavailableError(f"the scheduler's engine stopped ({self._stopped_by!r}); restart it")
        limit = self.config.serving.max_waiting_requests
        if len(scheduler.waiting) >= limit:
            raise QueueFullError(f"the waiting queue is full ({limit} requests); retry later")
        _check_fits(len(prompt_token_ids), params.max_tokens, scheduler.max_model_len)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.streams:
            raise InvalidArgumentError("request_id", f"{request_id!r} is already in use by a live request")
        scheduler.add_request(request_id, prompt_token_ids, params)
        stream = RequestStream(request_id, prompt_token_ids, params, self.tokenizer, self._token_texts,
                               skip_special_tokens, self._stop_sequence)
        self.streams[request_id] = stream
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        """Abort a live request; its final update is queued at once. False when unknown."""
        if self.scheduler is None or request_id not in self.streams:
            return False
        found = self.scheduler.abort(request_id)
        self._dispatch(self.scheduler.pop_outputs())
        self._record_stats()            # its blocks are free now; the gauges say so before the next step
        return found

    def _stop_sequence(self, request_id: str, index: int, stop_string: str) -> None:
        """A stream matched a stop string: end that sequence in the scheduler."""
        assert self.scheduler is not None
        group = self.scheduler.groups.get(request_id)
        if group is None:
            return
        for seq in group.seqs:
            if seq.sample_index == index:
                self.scheduler.finish_sequence(seq, FinishReason.STOP, stop_string)
                return

    def _grace_expired(self) -> bool:
        since = self.unavailable_since
        return since is not None and time.monotonic() - since > self.config.serving.executor_grace_seconds

    # ---- the loop --------------------------------------------------------------------------------

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        """The loop ends only by cancellation; if an error ended it, say so everywhere.

        Nothing would step the requests any more: each ends with INTERNAL, health reads NOT_SERVING so
        that an orchestrator replaces this scheduler, and new requests are refused.
        """
        if task.cancelled() or task.exception() is None:
            return
        err = task.exception()
        self._stopped_by = err
        log.critical("the engine loop stopped on an unexpected error; failing every live request",
                     exc_info=err)
        self._set_serving(False)
        if self.scheduler is not None:
            self.scheduler.fail_requests(list(self.scheduler.groups), RequestErrorKind.INTERNAL,
                                         f"the scheduler's engine stopped on an unexpected error: {err!r}")
            self._dispatch(self._take_pending())

    async def _run(self) -> None:
        """Iterate while requests are live or a step is in flight; sleep when idle; recover when a
        rank fails."""
        assert self.scheduler is not None
        scheduler = self.scheduler
        while True:
            if self._hung is not None and self._hung.done():
                await self._recover(self._hung.exception() or ExecutorHungError("hung"))
                continue
            if not scheduler.num_steps_in_flight:
                if not scheduler.has_unfinished:
                    self._dispatch(self._take_pending())
                    self._record_stats()
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                started = time.perf_counter()
                plan = scheduler.schedule()
                if plan.is_empty:
                    self._dispatch(self._take_pending())
                    await asyncio.sleep(0)
                    continue
            else:
                plan, started = None, 0.0
            try:
                if plan is not None:
                    await self._send(plan, started, ahead=False)
                await self._step()
            except (grpc.RpcError, ExecutorStepError, ExecutorHungError) as err:
                await self._recover(err)

    async def _send(self, plan: StepPlan, started: float, ahead: bool) -> None:
        """Send a plan to every rank; `started` is when scheduling it began, `ahead` whether it was
        made while the step before it ran."""
        assert self.scheduler is not None
        schedule_seconds = time.perf_counter() - started
        batch = self.scheduler.stats()         # before results retire finished requests
        message = plan_to_proto(plan)
        await asyncio.gather(*(link.send(message) for link in self.links))
        self._sent.append(_SentStep(plan, started, schedule_seconds, time.perf_counter(), batch))
        self.metrics.record_plan(ahead)

    async def _step(self) -> None:
        """Plan ahead when allowed, hand out the last reports, then take the oldest step's results."""
        assert self.scheduler is not None
        if self.config.serving.async_scheduling:
            started = time.perf_counter()
            ahead = self.scheduler.schedule_ahead()
            if ahead is not None:
                await self._send(ahead, started, ahead=True)
        self._dispatch(self._take_pending())          # overlaps with the ranks' compute
        results = await self._receive_results()
        received = time.perf_counter()
        for rank, other in enumerate(results[1:], start=1):
            if other.error:
                raise ExecutorStepError(f"rank {rank}, step {other.step_id}: {other.error}")
        # Every rank samples the same tokens; rank 0's error, if any, is raised by the decoder.
        result = result_from_proto(results[0])
        self._pending = self.scheduler.process_result(result)
        sent = self._sent.popleft()
        self._record_step(sent, result, received)

    async def _receive_results(self) -> list[pb.StepResult]:
        """Every rank's result of the oldest step in flight.

        Raises a rank's RpcError as soon as one fails, the probe's ExecutorHungError as soon as it finds
        a rank hung, and ExecutorHungError naming the late ranks when they have not all answered within
        executor_step_timeout_seconds.
        """
        timeout = self.config.serving.executor_step_timeout_seconds
        reads = [asyncio.ensure_future(link.receive()) for link in self.links]
        hung = self._hung
        pending: set[asyncio.Future[Any]] = set(reads)
        deadline = time.monotonic() + timeout
        try:
            while pending and (left := deadline - time.monotonic()) > 0:
                waited = pending if hung is None else pending | {hung}
                done, _ = await asyncio.wait(waited, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if hung is not None and hung.done():        # the probe found a rank hung meanwhile
                    raise hung.exception()  # type: ignore[misc]
                pending -= done
                for read in done:
                    if read.exception() is not None:
                        raise read.exception()  # type: ignore[misc]
        finally:
            for read in pending:
                read.cancel()
        if pending:
            ranks = ", ".join(str(link.rank) for link, read in zip(self.links, reads, strict=True)
                              if read in pending)
            raise ExecutorHungError(f"executor rank(s) {ranks} sent no result for step "
                                    f"{self._sent[0].plan.step_id} within {timeout:g} s "
                                    "(executor_step_timeout_seconds)")
        return [read.result() for read in reads]

    async def _probe_liveness(self) -> None:
        """While serving, check every rank's health each second; a rank that has not answered SERVING
        for executor_health_timeout_seconds is hung, and the loop recovers from it.

        The step timeout catches a rank that wedges mid-step; this probe catches a stopped or frozen
        process at once, also while the engine is idle, before any request finds out.
        """
        timeout = self.config.serving.executor_health_timeout_seconds
        last_serving = {link.rank: time.monotonic() for link in self.links}
        while True:
            await asyncio.sleep(LIVENESS_PROBE_INTERVAL_SECONDS)
            hung = self._hung
            if not self.serving or hung is None or hung.done():
                last_serving = dict.fromkeys(last_serving, time.monotonic())
                continue
            for link in self.links:
                if await link.is_serving(timeout=timeout):
                    last_serving[link.rank] = time.monotonic()
                    continue
                silent = time.monotonic() - last_serving[link.rank]
                if silent >= timeout and self.serving and hung is self._hung:
                    hung.set_exception(ExecutorHungError(
                        f"executor rank {link.rank} at {link.address} has not answered its health check "
                        f"with SERVING for {silent:.1f} s (executor_health_timeout_seconds {timeout:g})"))
                    self._wake.set()
                    break

    def _record_step(self, sent: _SentStep, result: StepResult, received: float) -> None:
        """Metrics of one answered step.

        Its iteration runs from when scheduling it began, or from the previous result when that came
        later (a plan made ahead waits behind the step before it), to the end of processing its result.
        """
        assert self.scheduler is not None
        plan = sent.plan
        self.last_step = StepTiming(sent.schedule_seconds, received - sent.sent, result.forward_seconds,
                                    result.swap_seconds)
        prompt_tokens = sum(w.num_tokens for w in plan.sequences if w.num_samples == 0 or w.num_tokens > 1)
        generated = sum(w.num_samples for w in plan.sequences)
        now = time.perf_counter()
        iteration_seconds = now - max(sent.started, self._last_result)
        self._last_result = now
        self.metrics.record_step(iteration_seconds, sent.schedule_seconds, received - sent.sent,
                                 prompt_tokens, generated)
        self.metrics.record_iteration(sent.batch,
                                      iteration_seconds - result.forward_seconds - result.swap_seconds,
                                      _roofline_ratio(result))
        self._record_stats()
        self._throughput.add(prompt_tokens, generated, iteration_seconds, self.scheduler)

    def _take_pending(self) -> list[RequestOutput]:
        assert self.scheduler is not None
        pending, self._pending = self._pending, []
        return pending + self.scheduler.pop_outputs()

    def _record_stats(self) -> None:
        if self.scheduler is not None:
            self.metrics.record_stats(self.scheduler.stats())

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand reports to their streams; stop strings may end sequences and produce more reports."""
        while outputs:
            for output in outputs:
                stream = self.streams.get(output.request_id)
                if stream is None:
                    continue
                stream.apply(output)
                self._record_latencies(stream)
                if stream.finished:
                    del self.streams[output.request_id]
                    self._record_finished(stream, output)
            outputs = self.scheduler.pop_outputs() if self.scheduler is not None else []

    def _record_latencies(self, stream: RequestStream) -> None:
        first_token, inter_token = stream.take_latencies()
        if first_token is not None:
            self.metrics.record_first_token(first_token)
        for latency in inter_token:
            self.metrics.record_inter_token(latency)

    def _record_finished(self, stream: RequestStream, output: RequestOutput) -> None:
        ended = sorted((c.index, c.finish_reason) for c in output.outputs if c.finish_reason is not None)
        if output.error is not None:
            reason = "error"
        elif any(r is FinishReason.ABORTED for _, r in ended):
            reason = "aborted"
        else:       # several outputs may end differently: count the request once, by its lowest index
            reason = ended[0][1].value if ended else "length"
        now = time.monotonic()
        self.metrics.record_request_finished(reason, now - stream.arrival_time, output.queue_seconds)
        first = stream.first_token_time
        log_request_ended(RequestSummary(
            stream.request_id, reason, output.num_prompt_tokens or len(stream.prompt_token_ids),
            output.num_generated_tokens, None if first is None else first - stream.arrival_time,
            now - stream.arrival_time, output.num_preemptions))

    # ---- recovery --------------------------------------------------------------------------------

    async def _recover(self, err: BaseException) -> None:
        """A rank failed: keep the requests, reconnect, and recompute them once every rank serves."""
        assert self.scheduler is not None
        self._hung = asyncio.get_running_loop().create_future()
        log.error("executor failure: %s; live requests wait up to %.0f s for the executors to come back",
                  _describe_error(err), self.config.serving.executor_grace_seconds)
        if isinstance(err, ExecutorStepError):
            message = f"an executor failed on a step of this request: {err}"
            self.scheduler.fail_requests(self.scheduler.in_flight_request_ids(), RequestErrorKind.INTERNAL,
                                         message)
        requeued = self.scheduler.requeue_after_executor_loss()
        self._sent.clear()
        self._dispatch(self._take_pending())
        self._set_serving(False)
        for link in self.links:
            link.close_stream()
        log.info("%d request(s) requeued for recomputation", requeued)
        while True:
            try:
                await self._handshake(time.monotonic() + RECONNECT_INTERVAL_SECONDS * 4, first=False)
                log.info("executors are back: serving again")
                return
            except (grpc.RpcError, UnavailableError) as retry_err:
                log.debug("executors not back yet: %s", _describe_error(retry_err))
            if self._grace_expired() and self.scheduler.has_unfinished:
                self.scheduler.fail_requests(list(self.scheduler.groups), RequestErrorKind.UNAVAILABLE,
                                             "no executor served within the grace period of "
                                             f"{self.config.serving.executor_grace_seconds:.0f} s; "
                                             "retry later")
                self._dispatch(self._take_pending())
            await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)


class _ThroughputLog:
    """Logs throughput and queue state every STATS_LOG_INTERVAL_SECONDS while requests run."""

    def __init__(self) -> None:
        self._since = time.monotonic()
        self._prompt_tokens = 0
        self._generated = 0

    def add(self, prompt_tokens: int, generated: int, step_seconds: float, scheduler: Scheduler) -> None:
        if not self._prompt_tokens and not self._generated:     # a new window: idle time does not count
            self._since = time.monotonic() - step_seconds
        self._prompt_tokens += prompt_tokens
        self._generated += generated
        elapsed = time.monotonic() - self._since
        if elapsed < STATS_LOG_INTERVAL_SECONDS:
            return
        stats = scheduler.stats()
        log.info("prompt %.1f tok/s, generation %.1f tok/s; running %d, waiting %d, swapped %d; "
                 "GPU KV %.1f%%, CPU KV %.1f%%; preemptions %d swap / %d recompute",
                 self._prompt_tokens / elapsed, self._generated / elapsed, stats.num_running,
                 stats.num_waiting, stats.num_swapped, 100 * stats.gpu_usage, 100 * stats.cpu_usage,
                 stats.num_preemptions_swap, stats.num_preemptions_recompute)
        self._since, self._prompt_tokens, self._generated = time.monotonic(), 0, 0


def _roofline_ratio(result: StepResult) -> float | None:
    """Roofline time over forward time of a decode-only step; None for other steps."""
    if result.roofline_seconds <= 0 or result.forward_seconds <= 0:
        return None
    return result.roofline_seconds / result.forward_seconds


def _check_fits(prompt_len: int, max_tokens: int, max_model_len: int) -> None:
    """Refuse a request whose prompt plus max_tokens exceeds the model (as vLLM's frontend does)."""
    if 0 < prompt_len < max_model_len and prompt_len + max_tokens > max_model_len:
        raise InvalidArgumentError("max_tokens", f"the prompt has {prompt_len} tokens and this model takes "
                                   f"{max_model_len} in all, so max_tokens can be at most "
                                   f"{max_model_len - prompt_len}, got {max_tokens}")


def _describe_error(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
        details = err.details() if hasattr(err, "details") else ""
        return f"{err.code().name}: {details}"
    return str(err)
