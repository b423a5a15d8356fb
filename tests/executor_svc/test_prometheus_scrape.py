"""A real Prometheus scrapes a real executor process's /metrics and stores the steps it ran."""

from __future__ import annotations

from scheduler_svc.config import SchedulerConfig
from scheduler_svc.executor_client import ExecutorClient
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from tests.prometheus_server import PrometheusServer, require_prometheus

BLOCK = 4


def run_steps(address: str) -> int:
    """Drive two short requests through the executor to the end; returns the steps sent."""
    client = ExecutorClient(address)
    cache = client.init_cache(BLOCK, 1.0, 0)
    scheduler = Scheduler(SchedulerConfig(block_size=BLOCK), cache.num_gpu_blocks, 0, 64, seed=0)
    scheduler.add_request("a", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    scheduler.add_request("b", [8, 9], SamplingParams(max_tokens=6, ignore_eos=True))
    steps = 0
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        if not plan.is_empty:
            scheduler.process_result(client.step(plan))
            steps += 1
    client.close()
    return steps


def test_prometheus_scrapes_the_executor_steps(start_executor, tmp_path):
    require_prometheus()            # before starting anything: skip (or fail in CI) without the binary
    executor = start_executor("--backend", "simulated", "--simulated-kv-tokens", "256")
    assert executor.metrics_address is not None
    steps = run_steps(executor.address)
    assert steps >= 2
    with PrometheusServer(tmp_path / "prometheus", {"executor": [executor.metrics_address]}) as prometheus:
        (target,) = prometheus.wait_for_targets_up(timeout=60)
        assert target["labels"]["job"] == "executor"
        result = prometheus.query_until("pagedserve_executor_steps_total", lambda r: bool(r), timeout=30)
    (series,) = result
    assert series["metric"]["instance"] == executor.metrics_address
    assert series["metric"]["rank"] == "0"
    assert float(series["value"][1]) == steps
