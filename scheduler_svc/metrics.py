"""The scheduler process's Prometheus metrics: queues, KV cache, step timing, tokens and request latency.

The engine calls SchedulerMetrics' `record_*` / `set_*` methods; `pagedserve.metrics_http` serves
the registry. Names follow Prometheus conventions: prefix `pagedserve_`, base units (seconds, ratios in
[0, 1]), counters ending in `_total`. Torch-free, like the rest of the scheduler.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from scheduler_svc.sequence import FinishReason
from scheduler_svc.stats import SchedulerStats

# No `_created` series: no dashboard reads them, and each counter and histogram would add one per label set.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated

# Bucket upper bounds in seconds. Dense where serving latencies usually sit, sparse in the tails, and
# no more than ~20 per histogram: every bucket is a time series per label set.
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 300.0,
               450.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                 120.0, 300.0, 600.0)

PREEMPTION_MODES = ("swap", "recompute")
# When a step's plan was made: while the step before it ran (async scheduling), or after its result.
PLANNING_WHEN = ("ahead", "after_result")
FINISH_REASONS = tuple(reason.value for reason in FinishReason)
# The gRPC status codes the frontend refuses requests with (grpc.StatusCode names).
REJECTION_CODES = ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNAUTHENTICATED")


class SchedulerMetrics:
    """The scheduler's metrics, in a CollectorRegistry of their own (`self.registry`).

    Every series carries the label `model_name` (the served model name, else the model directory's
    name: pagedserve.model_label), as vLLM's do, so that one dashboard filters a fleet by model.

    Gauges (the latest snapshot):
      pagedserve_requests_running         requests with sequences on the GPU
      pagedserve_requests_waiting         requests queued for admission (or for recomputation)
      pagedserve_requests_swapped         requests swapped out to CPU memory
      pagedserve_gpu_kv_usage_ratio       GPU KV blocks in use / GPU KV blocks
      pagedserve_cpu_kv_usage_ratio       CPU swap blocks in use / CPU swap blocks
      pagedserve_kv_utilization_ratio     token slots holding tokens / token slots of allocated GPU blocks
      pagedserve_executors_ready          executor ranks connected and ready
      pagedserve_executors                executor ranks configured
      pagedserve_gpu_kv_blocks            GPU KV blocks per executor (from InitCache)
      pagedserve_cpu_kv_blocks            CPU swap blocks per executor
      pagedserve_kv_block_size_tokens     tokens per KV block
    Counters:
      pagedserve_preemptions_total{mode="swap"|"recompute"}
      pagedserve_steps_planned_total{when="ahead"|"after_result"}   plans sent to the executors: made
                                              while the step before ran (async scheduling), or after
                                              its result (async off, or the scheduler declined)
      pagedserve_prompt_tokens_total          prompt tokens computed (recomputed ones included)
      pagedserve_prefix_cache_queries_total   prompt tokens looked up in the prefix cache at admission
      pagedserve_prefix_cache_hits_total      of those, tokens found cached (hit rate: hits / queries)
      pagedserve_generation_tokens_total      tokens generated
      pagedserve_requests_finished_total{finish_reason="length"|"stop"|"eos"|"aborted"|"error"}
      pagedserve_requests_rejected_total{code="INVALID_ARGUMENT"|"RESOURCE_EXHAUSTED"|"UNAVAILABLE"|
                                              "UNAUTHENTICATED"}
    Histograms (seconds):
      pagedserve_step_duration_seconds        one whole engine iteration
      pagedserve_schedule_duration_seconds    `schedule()` + `process_result()` within an iteration
      pagedserve_executor_wait_seconds        from sending the plan to having every rank's result
      pagedserve_time_to_first_token_seconds  request arrival to its first token
      pagedserve_inter_token_latency_seconds  between consecutive tokens of a sequence
      pagedserve_e2e_request_latency_seconds  request arrival to finish
      pagedserve_request_queue_time_seconds   request arrival to first scheduled
      pagedserve_step_control_plane_seconds   an iteration's time not spent in the executors' forward pass
                                              or swaps: scheduling, plan and result coding, gRPC,
                                              detokenization and streaming (when not overlapped)
    Per-iteration histograms (their _sum / _count is the mean over iterations, as benchmarks report):
      pagedserve_step_batched_requests        requests running in the iteration's batch
      pagedserve_step_kv_utilization_ratio    KV utilization during the iteration
      pagedserve_step_kv_sharing_saved_ratio  1 - GPU blocks used / block-table entries (saved by sharing)
      pagedserve_decode_roofline_ratio        decode-only iterations: memory-roofline time / forward time

    The three step-phase durations are separate histograms rather than one with a `phase` label: the
    whole step contains the other two, so summing over a `phase` label would double-count, and
    separate names keep each one's meaning in its help text.

    Label values are pre-created at zero, so `rate()` and `increase()` see a series from the first
    scrape; an unknown finish reason or rejection code raises ValueError rather than adding a series.
    """

    def __init__(self, registry: CollectorRegistry | None = None, model_name: str = "") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self._last_preemptions = dict.fromkeys(PREEMPTION_MODES, 0)
        self._last_prefix_cache = {"queries": 0, "hits": 0}
        self._add_queue_and_cache_metrics()
        self._add_step_metrics()
        self._add_request_metrics()

    def _add(self, kind: Any, name: str, documentation: str, **kwargs: Any) -> Any:
        """A metric labelled `model_name` (this scheduler's model), returned as its one child series."""
        return kind(name, documentation, ["model_name"], registry=self.registry, **kwargs).labels(
            model_name=self.model_name)

    def _add_labelled(self, kind: Any, name: str, documentation: str, label: str,
                      values: tuple[str, ...]) -> dict[str, Any]:
        """A metric labelled `model_name` and `label`: its child per value, each created at zero."""
        metric = kind(name, documentation, ["model_name", label], registry=self.registry)
        return {value: metric.labels(model_name=self.model_name, **{label: value}) for value in values}

    def _add_queue_and_cache_metrics(self) -> None:
        self.requests_running = self._add(Gauge, "pagedserve_requests_running",
                                          "Requests with sequences on the GPU.")
        self.requests_waiting = self._add(Gauge, "pagedserve_requests_waiting",
                                          "Requests waiting for admission or recomputation.")
        self.requests_swapped = self._add(Gauge, "pagedserve_requests_swapped",
                                          "Requests swapped out to CPU memory.")
        self.gpu_kv_usage = self._add(Gauge, "pagedserve_gpu_kv_usage_ratio",
                                      "Fraction of GPU KV blocks in use.")
        self.cpu_kv_usage = self._add(Gauge, "pagedserve_cpu_kv_usage_ratio",
                                      "Fraction of CPU swap blocks in use.")
        self.kv_utilization = self._add(
            Gauge, "pagedserve_kv_utilization_ratio",
            "Token slots holding tokens / token slots of allocated GPU KV blocks (0 when none is allocated).")
        self.preemptions = self._add_labelled(Counter, "pagedserve_preemptions_total",
                                              "Requests preempted, by preemption mode.", "mode",
                                              PREEMPTION_MODES)
        self.prefix_cache_queries = self._add(Counter, "pagedserve_prefix_cache_queries_total",
                                              "Prompt tokens looked up in the prefix cache at admission.")
        self.prefix_cache_hits = self._add(Counter, "pagedserve_prefix_cache_hits_total",
                                           "Prompt tokens found in the prefix cache (not computed again).")
        self.steps_planned = self._add_labelled(
            Counter, "pagedserve_steps_planned_total", "Plans sent to the executors, by when they were made: "
            "while the step before ran (async scheduling) or after its result.", "when", PLANNING_WHEN)
        self.executors_ready = self._add(Gauge, "pagedserve_executors_ready",
                                         "Executor ranks connected and ready.")
        self.executors = self._add(Gauge, "pagedserve_executors", "Executor ranks configured.")
        self.gpu_kv_blocks = self._add(Gauge, "pagedserve_gpu_kv_blocks", "GPU KV blocks per executor rank.")
        self.cpu_kv_blocks = self._add(Gauge, "pagedserve_cpu_kv_blocks",
                                       "CPU swap blocks per executor rank.")
        self.kv_block_size = self._add(Gauge, "pagedserve_kv_block_size_tokens", "Tokens per KV block.")

    def _add_step_metrics(self) -> None:
        self.step_duration = self._add(Histogram, "pagedserve_step_duration_seconds",
                                       "Duration of one whole engine iteration.", buckets=STEP_BUCKETS)
        self.schedule_duration = self._add(Histogram, "pagedserve_schedule_duration_seconds",
                                           "Time per iteration spent scheduling and processing results.",
                                           buckets=STEP_BUCKETS)
        self.executor_wait = self._add(Histogram, "pagedserve_executor_wait_seconds",
                                       "Time per iteration from sending the plan to every rank's result.",
                                       buckets=STEP_BUCKETS)
        self.control_plane = self._add(Histogram, "pagedserve_step_control_plane_seconds",
                                       "Time per iteration outside the executors' forward pass and swaps.",
                                       buckets=STEP_BUCKETS)
        self.batched_requests = self._add(Histogram, "pagedserve_step_batched_requests",
                                          "Requests running in an iteration's batch.", buckets=BATCH_BUCKETS)
        self.step_kv_utilization = self._add(Histogram, "pagedserve_step_kv_utilization_ratio",
                                             "KV utilization (token slots holding tokens / token slots "
                                             "allocated) during an iteration.", buckets=RATIO_BUCKETS)
        self.step_kv_sharing_saved = self._add(Histogram, "pagedserve_step_kv_sharing_saved_ratio",
                                               "Fraction of GPU KV blocks that copy-on-write sharing saves "
                                               "during an iteration.", buckets=RATIO_BUCKETS)
        self.decode_roofline = self._add(Histogram, "pagedserve_decode_roofline_ratio",
                                         "Decode-only iterations: memory-roofline time over forward time.",
                                         buckets=RATIO_BUCKETS)
        self.prompt_tokens = self._add(Counter, "pagedserve_prompt_tokens_total",
                                       "Prompt tokens computed, recomputation included.")
        self.generation_tokens = self._add(Counter, "pagedserve_generation_tokens_total", "Tokens generated.")

    def _add_request_metrics(self) -> None:
        self.time_to_first_token = self._add(Histogram, "pagedserve_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first token.",
                                             buckets=TTFT_BUCKETS)
        self.inter_token_latency = self._add(Histogram, "pagedserve_inter_token_latency_seconds",
                                             "Time between consecutive tokens of a sequence.",
                                             buckets=ITL_BUCKETS)
        self.e2e_latency = self._add(Histogram, "pagedserve_e2e_request_latency_seconds",
                                     "Time from a request's arrival to its finish.", buckets=E2E_BUCKETS)
        self.queue_time = self._add(Histogram, "pagedserve_request_queue_time_seconds",
                                    "Time from a request's arrival until it was first scheduled.",
                                    buckets=QUEUE_BUCKETS)
        self.requests_finished = self._add_labelled(Counter, "pagedserve_requests_finished_total",
                                                    "Requests finished, by reason.", "finish_reason",
                                                    FINISH_REASONS)
        self.requests_rejected = self._add_labelled(Counter, "pagedserve_requests_rejected_total",
                                                    "Requests refused before queueing, by gRPC status code.",
                                                    "code", REJECTION_CODES)

    def record_stats(self, stats: SchedulerStats) -> None:
        """Set the queue and KV gauges from a snapshot; advance preemptions by the change since the last.

        The snapshot's preemption counts are cumulative. A count lower than the last one means a new
        Scheduler started counting from zero, so all of it is new.
        """
        self.requests_running.set(stats.num_running)
        self.requests_waiting.set(stats.num_waiting)
        self.requests_swapped.set(stats.num_swapped)
        self.gpu_kv_usage.set(stats.gpu_usage)
        self.cpu_kv_usage.set(stats.cpu_usage)
        self.kv_utilization.set(stats.kv_utilization)
        for mode, count in (("swap", stats.num_preemptions_swap),
                            ("recompute", stats.num_preemptions_recompute)):
            last = self._last_preemptions[mode]
            self.preemptions[mode].inc(count - last if count >= last else count)
            self._last_preemptions[mode] = count
        for name, counter, count in (
                ("queries", self.prefix_cache_queries, stats.prefix_cache_queried_tokens),
                ("hits", self.prefix_cache_hits, stats.prefix_cache_hit_tokens)):
            last = self._last_prefix_cache[name]
            counter.inc(count - last if count >= last else count)
            self._last_prefix_cache[name] = count

    def record_step(self, step_seconds: float, schedule_seconds: float, executor_seconds: float,
                    num_prompt_tokens: int, num_generation_tokens: int) -> None:
        """One engine iteration: its phase durations and the prompt and generated tokens it computed."""
        self.step_duration.observe(step_seconds)
        self.schedule_duration.observe(schedule_seconds)
        self.executor_wait.observe(executor_seconds)
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_generation_tokens)

    def record_plan(self, ahead: bool) -> None:
        """A plan went to the executors: made ahead of its step's predecessor's result, or after it."""
        self.steps_planned["ahead" if ahead else "after_result"].inc()

    def record_iteration(self, stats: SchedulerStats, control_plane_seconds: float,
                         roofline_ratio: float | None) -> None:
        """One iteration: its batch and KV state (`stats` as scheduled), control-plane time and, for a
        decode-only iteration, its roofline ratio."""
        self.batched_requests.observe(stats.num_running)
        if stats.gpu_blocks_used:      # a step that holds no block (swaps only) has no utilization
            self.step_kv_utilization.observe(stats.kv_utilization)
        self.step_kv_sharing_saved.observe(stats.kv_sharing_saved)
        self.control_plane.observe(max(control_plane_seconds, 0.0))
        if roofline_ratio is not None:
            self.decode_roofline.observe(roofline_ratio)

    def record_first_token(self, seconds: float) -> None:
        """A request's time to first token, from its arrival."""
        self.time_to_first_token.observe(seconds)

    def record_inter_token(self, seconds: float) -> None:
        """The time between a sequence's previous token and this one."""
        self.inter_token_latency.observe(seconds)

    def record_request_finished(self, finish_reason: str, e2e_seconds: float,
                                queue_seconds: float | None) -> None:
        """A finished request (`finish_reason` is a FinishReason value).

        `queue_seconds` is None for a request that never got scheduled (aborted or failed while
        waiting): it has no queue time to observe.
        """
        if finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason: must be one of {', '.join(FINISH_REASONS)}, "
                             f"got {finish_reason!r}")
        self.requests_finished[finish_reason].inc()
        self.e2e_latency.observe(e2e_seconds)
        if queue_seconds is not None:
            self.queue_time.observe(queue_seconds)

    def record_request_rejected(self, code: str) -> None:
        """A request refused before it was queued; `code` is a grpc.StatusCode name."""
        if code not in REJECTION_CODES:
            raise ValueError(f"code: must be one of {', '.join(REJECTION_CODES)}, got {code!r}")
        self.requests_rejected[code].inc()

    def set_executors(self, ready: int, total: int) -> None:
        """How many executor ranks are connected and ready, of how many configured."""
        self.executors_ready.set(ready)
        self.executors.set(total)

    def set_cache_info(self, num_gpu_blocks: int, num_cpu_blocks: int, block_size: int) -> None:
        """The KV cache the executors allocated (blocks per rank) and the block size in tokens.

        Plain gauges rather than an info metric, so queries can do arithmetic with them (capacity in
        tokens is `pagedserve_gpu_kv_blocks * pagedserve_kv_block_size_tokens`).
        """
        self.gpu_kv_blocks.set(num_gpu_blocks)
        self.cpu_kv_blocks.set(num_cpu_blocks)
        self.kv_block_size.set(block_size)
