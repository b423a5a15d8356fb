"""SchedulerMetrics: values from real scheduler stats, preemption deltas, HTTP exposition, promtool lint."""

from __future__ import annotations

import urllib.request
from collections import Counter

import pytest
from prometheus_client import generate_latest
from sim_harness import Harness

from pagedserve.metrics_http import metrics_url, start_metrics_server
from scheduler_svc.metrics import (
    E2E_BUCKETS,
    FINISH_REASONS,
    ITL_BUCKETS,
    REJECTION_CODES,
    STEP_BUCKETS,
    TTFT_BUCKETS,
    SchedulerMetrics,
)
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.stats import SchedulerStats
from tests.prometheus_server import promtool_check_metrics


def stats(**changes: float) -> SchedulerStats:
    """A snapshot with plausible values; keyword arguments override fields."""
    values: dict = dict(num_running=3, num_waiting=5, num_swapped=1, num_running_seqs=4, gpu_blocks_used=30,
                        gpu_blocks_total=40, cpu_blocks_used=8, cpu_blocks_total=64, num_preemptions_swap=0,
                        num_preemptions_recompute=0, kv_utilization=0.95, num_finished=2)
    values.update(changes)
    return SchedulerStats(**values)


def value(metrics: SchedulerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": metrics.model_name, **labels})


def test_record_stats_sets_the_queue_and_kv_gauges():
    metrics = SchedulerMetrics()
    metrics.record_stats(stats())
    assert value(metrics, "pagedserve_requests_running") == 3
    assert value(metrics, "pagedserve_requests_waiting") == 5
    assert value(metrics, "pagedserve_requests_swapped") == 1
    assert value(metrics, "pagedserve_gpu_kv_usage_ratio") == pytest.approx(0.75)
    assert value(metrics, "pagedserve_cpu_kv_usage_ratio") == pytest.approx(0.125)
    assert value(metrics, "pagedserve_kv_utilization_ratio") == pytest.approx(0.95)
    metrics.record_stats(stats(num_running=0, gpu_blocks_used=0, cpu_blocks_total=0, cpu_blocks_used=0))
    assert value(metrics, "pagedserve_requests_running") == 0
    assert value(metrics, "pagedserve_gpu_kv_usage_ratio") == 0.0
    assert value(metrics, "pagedserve_cpu_kv_usage_ratio") == 0.0          # no swap space at all


def test_preemptions_advance_by_the_change_in_the_cumulative_counts():
    metrics = SchedulerMetrics()

    def preemptions() -> tuple[float | None, float | None]:
        return (value(metrics, "pagedserve_preemptions_total", mode="swap"),
                value(metrics, "pagedserve_preemptions_total", mode="recompute"))

    assert preemptions() == (0, 0)                      # both series exist before any preemption
    for swap, recompute, expected in [(2, 1, (2, 1)), (2, 1, (2, 1)), (5, 1, (5, 1)), (5, 4, (5, 4)),
                                      (1, 0, (6, 4)),     # a new Scheduler counts from zero again
                                      (3, 2, (8, 6))]:
        metrics.record_stats(stats(num_preemptions_swap=swap, num_preemptions_recompute=recompute))
        assert preemptions() == expected


def test_prefix_cache_counters_follow_the_scheduler():
    harness = Harness(num_gpu_blocks=32, num_cpu_blocks=0, block_size=4, enable_prefix_caching=True)
    metrics = SchedulerMetrics()
    shared = list(range(10, 26))                                          # four full blocks
    for i in range(3):
        harness.scheduler.add_request(f"r{i}", [*shared, 40 + i], SamplingParams(max_tokens=3))
        harness.run()
        metrics.record_stats(harness.scheduler.stats())
    assert value(metrics, "pagedserve_prefix_cache_queries_total") == 3 * 17
    assert value(metrics, "pagedserve_prefix_cache_hits_total") == 2 * 16     # the 2nd and 3rd hit


def test_metrics_follow_a_real_scheduler_under_preemption():
    harness = Harness(num_gpu_blocks=24, num_cpu_blocks=64, block_size=4)
    for i in range(8):          # parallel sampling groups are swapped, single sequences recomputed
        params = SamplingParams(n=2, max_tokens=20, seed=i) if i % 2 else SamplingParams(max_tokens=24,
                                                                                         seed=i)
        harness.scheduler.add_request(f"r{i}", [3 + (i * 7 + j) % 90 for j in range(6 + i)], params)
    metrics = SchedulerMetrics()
    peak_usage = 0.0
    while harness.scheduler.has_unfinished:
        harness.step()
        snapshot = harness.scheduler.stats()
        metrics.record_stats(snapshot)
        assert value(metrics, "pagedserve_requests_waiting") == snapshot.num_waiting
        peak_usage = max(peak_usage, value(metrics, "pagedserve_gpu_kv_usage_ratio") or 0.0)
    final = harness.scheduler.stats()
    assert final.num_preemptions_swap > 0 and final.num_preemptions_recompute > 0
    assert value(metrics, "pagedserve_preemptions_total", mode="swap") == final.num_preemptions_swap
    assert value(metrics, "pagedserve_preemptions_total", mode="recompute") == final.num_preemptions_recompute
    assert 0.5 < peak_usage <= 1.0
    assert value(metrics, "pagedserve_requests_running") == 0
    reasons = Counter(done.finish_reasons[0] for done in harness.done.values())    # the first sample's
    for reason, count in reasons.items():
        for _ in range(count):
            metrics.record_request_finished(reason, e2e_seconds=1.0, queue_seconds=0.1)
    recorded = {r: value(metrics, "pagedserve_requests_finished_total", finish_reason=r) for r in reasons}
    assert recorded == reasons
    assert sum(reasons.values()) == 8


def test_record_step_observes_each_phase_and_counts_tokens():
    metrics = SchedulerMetrics()
    metrics.record_step(0.012, 0.0008, 0.011, num_prompt_tokens=512, num_generation_tokens=31)
    metrics.record_step(0.004, 0.0004, 0.0035, num_prompt_tokens=0, num_generation_tokens=32)
    assert value(metrics, "pagedserve_step_duration_seconds_count") == 2
    assert value(metrics, "pagedserve_step_duration_seconds_sum") == pytest.approx(0.016)
    assert value(metrics, "pagedserve_step_duration_seconds_bucket", le="0.005") == 1
    assert value(metrics, "pagedserve_schedule_duration_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "pagedserve_executor_wait_seconds_sum") == pytest.approx(0.0145)
    assert value(metrics, "pagedserve_prompt_tokens_total") == 512
    assert value(metrics, "pagedserve_generation_tokens_total") == 63


def test_plans_are_counted_by_when_they_were_made():
    metrics = SchedulerMetrics()
    assert value(metrics, "pagedserve_steps_planned_total", when="ahead") == 0     # series exist at zero
    metrics.record_plan(ahead=False)
    for _ in range(3):
        metrics.record_plan(ahead=True)
    assert value(metrics, "pagedserve_steps_planned_total", when="after_result") == 1
    assert value(metrics, "pagedserve_steps_planned_total", when="ahead") == 3


def test_token_latencies_and_finished_requests():
    metrics = SchedulerMetrics()
    metrics.record_first_token(0.15)
    metrics.record_inter_token(0.02)
    metrics.record_inter_token(0.03)
    metrics.record_request_finished("eos", e2e_seconds=3.5, queue_seconds=0.2)
    metrics.record_request_finished("aborted", e2e_seconds=0.5, queue_seconds=None)   # never scheduled
    assert value(metrics, "pagedserve_time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(metrics, "pagedserve_time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(metrics, "pagedserve_inter_token_latency_seconds_count") == 2
    assert value(metrics, "pagedserve_e2e_request_latency_seconds_count") == 2
    assert value(metrics, "pagedserve_request_queue_time_seconds_count") == 1
    finished = [value(metrics, "pagedserve_requests_finished_total", finish_reason=r) for r in FINISH_REASONS]
    assert finished == [0, 0, 1, 1, 0]          # length, stop, eos, aborted, error
    with pytest.raises(ValueError, match="finish_reason"):
        metrics.record_request_finished("cancelled", 1.0, None)


def test_rejections_executors_and_cache_info():
    metrics = SchedulerMetrics()
    metrics.record_request_rejected("RESOURCE_EXHAUSTED")
    metrics.record_request_rejected("RESOURCE_EXHAUSTED")
    metrics.record_request_rejected("INVALID_ARGUMENT")
    assert {c: value(metrics, "pagedserve_requests_rejected_total", code=c) for c in REJECTION_CODES} == {
        "INVALID_ARGUMENT": 1, "RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 0, "UNAUTHENTICATED": 0}
    with pytest.raises(ValueError, match="code"):
        metrics.record_request_rejected("NOT_FOUND")
    metrics.set_executors(ready=1, total=2)
    metrics.set_cache_info(num_gpu_blocks=13028, num_cpu_blocks=512, block_size=16)
    assert (value(metrics, "pagedserve_executors_ready"), value(metrics, "pagedserve_executors")) == (1, 2)
    assert value(metrics, "pagedserve_gpu_kv_blocks") == 13028
    assert value(metrics, "pagedserve_cpu_kv_blocks") == 512
    assert value(metrics, "pagedserve_kv_block_size_tokens") == 16


def test_buckets_span_serving_latencies():
    for buckets, low, high in [(TTFT_BUCKETS, 0.001, 60.0), (ITL_BUCKETS, 0.0005, 5.0),
                               (STEP_BUCKETS, 0.0005, 10.0), (E2E_BUCKETS, 0.1, 600.0)]:
        assert list(buckets) == sorted(set(buckets))
        assert (buckets[0], buckets[-1]) == (low, high)


def test_each_instance_has_its_own_registry():
    first, second = SchedulerMetrics(), SchedulerMetrics()      # would clash in the global registry
    first.record_request_rejected("UNAVAILABLE")
    assert value(second, "pagedserve_requests_rejected_total", code="UNAVAILABLE") == 0


def test_the_exposition_passes_promtool():
    metrics = SchedulerMetrics()
    metrics.record_stats(stats(num_preemptions_swap=2))
    metrics.record_step(0.01, 0.001, 0.009, 100, 10)
    metrics.record_first_token(0.1)
    metrics.record_inter_token(0.01)
    metrics.record_request_finished("length", 2.0, 0.05)
    metrics.record_request_rejected("UNAUTHENTICATED")
    metrics.set_executors(2, 2)
    metrics.set_cache_info(100, 50, 16)
    status, problems = promtool_check_metrics(generate_latest(metrics.registry))
    assert (status, problems) == (0, "")


def test_the_metrics_server_serves_the_registry_on_an_ephemeral_port():
    metrics = SchedulerMetrics(model_name="m")
    metrics.set_executors(3, 4)
    port = start_metrics_server(metrics.registry, "127.0.0.1", 0)
    assert port > 0
    with urllib.request.urlopen(metrics_url("127.0.0.1", port), timeout=10) as response:
        body = response.read().decode()
    assert 'pagedserve_executors_ready{model_name="m"} 3.0' in body.splitlines()
    assert "_created" not in body       # creation-time series double the page for no dashboard's use


def test_metrics_url_brackets_ipv6_hosts():
    assert metrics_url("127.0.0.1", 9100) == "http://127.0.0.1:9100/metrics"
    assert metrics_url("::1", 9100) == "http://[::1]:9100/metrics"


def test_every_series_carries_the_model_name():
    """As vLLM's metrics do: a dashboard or alert selects one model's series with model_name."""
    metrics = SchedulerMetrics(model_name="llama-7b")
    metrics.record_stats(stats())
    metrics.record_request_finished("stop", e2e_seconds=1.0, queue_seconds=0.1)
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    assert samples and all(s.labels.get("model_name") == "llama-7b" for s in samples)
    assert value(metrics, "pagedserve_requests_finished_total", finish_reason="stop") == 1


def test_an_iteration_without_gpu_blocks_observes_no_kv_utilization():
    """Its utilization (0: nothing held) is no measure of waste; the mean covers iterations that hold KV."""
    metrics = SchedulerMetrics()
    metrics.record_iteration(stats(gpu_blocks_used=0, kv_utilization=0.0), 0.001, None)
    metrics.record_iteration(stats(kv_utilization=0.9), 0.001, None)
    assert value(metrics, "pagedserve_step_kv_utilization_ratio_count") == 1
    assert value(metrics, "pagedserve_step_kv_utilization_ratio_sum") == pytest.approx(0.9)
    assert value(metrics, "pagedserve_step_batched_requests_count") == 2
