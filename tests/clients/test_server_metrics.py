"""Server statistics of a run from two renders of the scheduler's real Prometheus registry."""

from __future__ import annotations

import math

import pytest
from prometheus_client import generate_latest

from clients.server_metrics import ServerStats, parse_samples, scrape
from pagedserve.metrics_http import metrics_url, start_metrics_server
from scheduler_svc.metrics import SchedulerMetrics
from scheduler_svc.stats import SchedulerStats

PAGE = """\
# HELP up_things A gauge.
# TYPE up_things gauge
up_things 3.5
# HELP hits_total A counter.
# TYPE hits_total counter
hits_total{zone="b",code="200"} 7.0
hits_total{code="500",zone="a"} 1.0
# HELP wait_seconds A histogram.
# TYPE wait_seconds histogram
wait_seconds_bucket{le="1.0"} 2.0
wait_seconds_bucket{le="+Inf"} 3.0
wait_seconds_count 3.0
wait_seconds_sum 4.25
"""


def render(metrics: SchedulerMetrics) -> dict[str, float]:
    return parse_samples(generate_latest(metrics.registry).decode())


def stats(swap: int = 0, recompute: int = 0, running: int = 1, kv: float = 0.5,
          sharing_saved: float = 0.0) -> SchedulerStats:
    """A snapshot with the given cumulative preemptions, batch size, KV utilization and sharing savings."""
    return SchedulerStats(num_running=running, num_waiting=0, num_swapped=0, num_running_seqs=running,
                          gpu_blocks_used=1, gpu_blocks_total=10, cpu_blocks_used=0, cpu_blocks_total=10,
                          num_preemptions_swap=swap, num_preemptions_recompute=recompute,
                          kv_utilization=kv, num_finished=0, kv_sharing_saved=sharing_saved)


def iteration(metrics: SchedulerMetrics, step: float, batched: int, kv: float, control: float,
              roofline: float | None, sharing_saved: float = 0.0) -> None:
    """One engine iteration as the engine records it."""
    metrics.record_step(step, step / 4, step / 2, num_prompt_tokens=3, num_generation_tokens=batched)
    metrics.record_iteration(stats(running=batched, kv=kv, sharing_saved=sharing_saved), control, roofline)


def test_parse_samples_keys_names_with_sorted_labels():
    samples = parse_samples(PAGE)
    assert samples["up_things"] == 3.5
    assert samples['hits_total{code="200",zone="b"}'] == 7.0
    assert samples['hits_total{code="500",zone="a"}'] == 1.0
    assert samples['wait_seconds_bucket{le="+Inf"}'] == 3.0
    assert samples["wait_seconds_count"] == 3.0
    assert samples["wait_seconds_sum"] == 4.25


def test_between_gives_the_means_of_the_iterations_recorded_between_two_renders():
    metrics = SchedulerMetrics(model_name="llama-7b")   # the names read the same whatever the model
    metrics.set_cache_info(num_gpu_blocks=512, num_cpu_blocks=256, block_size=16)
    iteration(metrics, 0.5, 100, 0.1, 0.4, 0.9, 0.9)    # before the run: must not count
    iteration(metrics, 0.5, 100, 0.1, 0.4, None, 0.9)
    metrics.record_stats(stats(swap=3, recompute=1))
    before = render(metrics)
    iteration(metrics, 0.25, 2, 0.5, 0.125, None, 0.0)  # prefill: no roofline ratio
    iteration(metrics, 0.5, 4, 0.75, 0.0625, 0.6, 0.25)
    iteration(metrics, 0.75, 9, 1.0, 0.0625, 0.8, 0.5)
    metrics.record_stats(stats(swap=5, recompute=4))
    after = render(metrics)

    s = ServerStats.between(before, after)
    assert s.iterations == 3
    assert s.mean_batched_requests == pytest.approx(5.0)
    assert s.mean_kv_utilization == pytest.approx(0.75)
    assert s.mean_kv_sharing_saved == pytest.approx(0.25)
    assert s.control_plane_fraction == pytest.approx(0.25 / 1.5)
    assert s.mean_iteration_ms == pytest.approx(500.0)
    assert s.decode_steps == 2
    assert s.mean_decode_roofline == pytest.approx(0.7)
    assert (s.preemptions_swap, s.preemptions_recompute) == (2, 3)
    assert (s.gpu_kv_blocks, s.block_size) == (512, 16)


def test_between_an_empty_before_gives_everything_since_start():
    metrics = SchedulerMetrics()
    iteration(metrics, 0.5, 3, 0.25, 0.25, None)
    iteration(metrics, 1.5, 5, 0.75, 0.25, None)
    metrics.record_stats(stats(swap=0, recompute=2))
    s = ServerStats.between({}, render(metrics))
    assert (s.iterations, s.decode_steps, s.preemptions_recompute, s.preemptions_swap) == (2, 0, 2, 0)
    assert s.mean_batched_requests == pytest.approx(4.0)
    assert s.mean_kv_utilization == pytest.approx(0.5)
    assert s.control_plane_fraction == pytest.approx(0.25)
    assert s.mean_iteration_ms == pytest.approx(1000.0)
    assert math.isnan(s.mean_decode_roofline)


def test_between_two_identical_renders_has_no_iterations_and_nan_means():
    metrics = SchedulerMetrics()
    iteration(metrics, 0.5, 3, 0.25, 0.25, 0.5)
    page = render(metrics)
    s = ServerStats.between(page, page)
    assert (s.iterations, s.decode_steps, s.preemptions_swap, s.preemptions_recompute) == (0, 0, 0, 0)
    for mean in (s.mean_batched_requests, s.mean_kv_utilization, s.mean_kv_sharing_saved,
                 s.control_plane_fraction, s.mean_iteration_ms, s.mean_decode_roofline):
        assert math.isnan(mean)


def test_scrape_reads_a_served_registry_over_http():
    metrics = SchedulerMetrics()
    metrics.set_executors(ready=2, total=3)
    iteration(metrics, 0.5, 6, 0.5, 0.125, None)
    port = start_metrics_server(metrics.registry, "127.0.0.1", 0)
    samples = scrape(metrics_url("127.0.0.1", port))
    assert samples["pagedserve_executors_ready"] == 2.0
    assert samples["pagedserve_step_batched_requests_sum"] == 6.0
    assert samples['pagedserve_preemptions_total{mode="swap"}'] == 0.0
    assert samples == render(metrics)
