"""ExecutorMetrics from real plans and results, promtool lint, and /metrics of a real executor process.

(Named apart from tests/scheduler_svc/test_metrics.py: pytest's default import mode needs unique test
module basenames in directories without __init__.py.)
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from executor_svc.config import ExecutorConfig
from executor_svc.metrics import ExecutorMetrics
from pagedserve.contract.plan import (
    Sample,
    SequenceResult,
    SequenceStart,
    SequenceWork,
    StepPlan,
    StepResult,
)
from pagedserve.contract.plan_codec import ExecutorStepError
from pagedserve.errors import InvalidArgumentError
from pagedserve.model_label import model_label
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.executor_client import ExecutorClient
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from tests.prometheus_server import promtool_check_metrics

BLOCK = 4


def work(seq_id: int, num_tokens: int, first: bool = False) -> SequenceWork:
    start = SequenceStart(request_id=f"r{seq_id}", num_prompt_tokens=num_tokens, seed=0, sample_index=0)
    return SequenceWork(seq_id, list(range(3, 3 + num_tokens)), 0, 0, [seq_id], 1, 0,
                        start if first else None)


def result_for(plan: StepPlan, forward_seconds: float, swap_seconds: float = 0.0) -> StepResult:
    sequences = tuple(SequenceResult(w.seq_id, (Sample(5, -0.5),)) for w in plan.sequences)
    return StepResult(plan.step_id, sequences, forward_seconds=forward_seconds, swap_seconds=swap_seconds)


def value(metrics: ExecutorMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": metrics.model_name, "rank": "0", **labels})


def test_a_step_records_its_forward_time_tokens_and_block_movements():
    metrics = ExecutorMetrics()
    plan = StepPlan(step_id=1, swap_out=[(1, 0), (2, 1)], swap_in=[(5, 7)], copy=[(3, 4)],
                    sequences=[work(1, 10, first=True), work(2, 1)])
    metrics.record_step(plan, result_for(plan, forward_seconds=0.02, swap_seconds=0.003))
    assert value(metrics, "pagedserve_executor_steps_total") == 1
    assert value(metrics, "pagedserve_executor_step_errors_total") == 0
    assert value(metrics, "pagedserve_executor_tokens_total") == 11
    assert value(metrics, "pagedserve_executor_forward_seconds_sum") == pytest.approx(0.02)
    assert value(metrics, "pagedserve_executor_forward_seconds_bucket", le="0.025") == 1
    assert value(metrics, "pagedserve_executor_forward_seconds_bucket", le="0.01") == 0
    assert value(metrics, "pagedserve_executor_swap_seconds_count") == 1
    assert value(metrics, "pagedserve_executor_swap_seconds_sum") == pytest.approx(0.003)
    assert value(metrics, "pagedserve_executor_blocks_swapped_total", direction="out") == 2
    assert value(metrics, "pagedserve_executor_blocks_swapped_total", direction="in") == 1
    assert value(metrics, "pagedserve_executor_blocks_copied_total") == 1


def test_steps_without_blocks_or_batch_observe_no_timing():
    metrics = ExecutorMetrics()
    decode = StepPlan(step_id=1, sequences=[work(1, 1)])
    metrics.record_step(decode, result_for(decode, forward_seconds=0.001))
    forget = StepPlan(step_id=2, forget_seq_ids=[1])
    metrics.record_step(forget, result_for(forget, forward_seconds=0.0))
    assert value(metrics, "pagedserve_executor_steps_total") == 2
    assert value(metrics, "pagedserve_executor_forward_seconds_count") == 1      # only the decode step
    assert value(metrics, "pagedserve_executor_swap_seconds_count") == 0          # no block moved
    assert value(metrics, "pagedserve_executor_blocks_swapped_total", direction="out") == 0


def test_errors_count_as_steps_and_the_cache_is_a_gauge():
    metrics = ExecutorMetrics()
    metrics.record_step_error()
    assert value(metrics, "pagedserve_executor_steps_total") == 1
    assert value(metrics, "pagedserve_executor_step_errors_total") == 1
    assert value(metrics, "pagedserve_executor_tokens_total") == 0
    metrics.record_cache(num_gpu_blocks=13028, num_cpu_blocks=512)
    metrics.record_cache(num_gpu_blocks=100, num_cpu_blocks=50)          # InitCache again resizes
    assert value(metrics, "pagedserve_executor_gpu_kv_blocks") == 100
    assert value(metrics, "pagedserve_executor_cpu_kv_blocks") == 50


def test_every_series_carries_the_rank_and_the_model_name():
    metrics = ExecutorMetrics(rank=3, model_name="llama-7b")
    metrics.record_step_error()
    labels = {"model_name": "llama-7b", "rank": "3"}
    assert metrics.registry.get_sample_value("pagedserve_executor_steps_total", labels) == 1
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    assert all(s.labels["model_name"] == "llama-7b" and s.labels["rank"] == "3" for s in samples)
    assert not any(s.name.endswith("_created") for s in samples)
    other = ExecutorMetrics(rank=3, model_name="llama-7b")     # a registry of its own: no duplicate error
    assert other.registry.get_sample_value("pagedserve_executor_steps_total", labels) == 0


def test_the_exposition_passes_promtool():
    metrics = ExecutorMetrics()
    plan = StepPlan(step_id=1, swap_out=[(1, 0)], copy=[(3, 4)], sequences=[work(1, 4, first=True)])
    metrics.record_step(plan, result_for(plan, 0.01, 0.001))
    metrics.record_step_error()
    metrics.record_cache(10, 5)
    assert promtool_check_metrics(generate_latest(metrics.registry)) == (0, "")


def test_metrics_port_is_validated_and_read_from_the_environment():
    simulated = {"PAGEDSERVE_EXECUTOR_BACKEND": "simulated"}
    assert ExecutorConfig.from_sources(None, simulated).metrics_port == 0
    for port in ("-1", "9464", "65535"):
        environ = {**simulated, "PAGEDSERVE_EXECUTOR_METRICS_PORT": port}
        assert ExecutorConfig.from_sources(None, environ).metrics_port == int(port)
    for bad in ("-2", "65536", "http"):
        with pytest.raises(InvalidArgumentError) as err:
            ExecutorConfig.from_sources(None, {**simulated, "PAGEDSERVE_EXECUTOR_METRICS_PORT": bad})
        assert err.value.field == "metrics_port"


def scrape(address: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an executor's /metrics page, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_real_executor_serves_its_steps_at_metrics(start_executor):
    executor = start_executor("--backend", "simulated", "--simulated-kv-tokens", "96",
                              "--simulated-vocab-size", "100", "--max-model-len", "128")
    assert executor.metrics_address is not None and executor.metrics_address.startswith("127.0.0.1:")
    client = ExecutorClient(executor.address)
    cache = client.init_cache(BLOCK, 1.0, 64 * BLOCK * 8)
    scheduler = Scheduler(SchedulerConfig(block_size=BLOCK, max_num_batched_tokens=128, watermark=0.0),
                          cache.num_gpu_blocks, cache.num_cpu_blocks, 128, eos_token_ids=[2], vocab_size=100,
                          seed=1)
    for i in range(8):          # a tight pool: parallel-sampling groups get swapped out and back in
        params = SamplingParams(n=2 if i % 2 else 1, max_tokens=16, seed=i)
        scheduler.add_request(f"r{i}", [3 + (i * 7 + j) % 90 for j in range(6 + i)], params)
    plans = []
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        scheduler.pop_outputs()
        if not plan.is_empty:
            plans.append(plan)
            scheduler.process_result(client.step(plan))
    with pytest.raises(ExecutorStepError):              # an unknown sequence: the step fails
        client.step(StepPlan(step_id=10_000, sequences=[work(999, 2)]))
    client.close()
    assert scheduler.stats().num_preemptions_swap > 0

    samples = scrape(executor.metrics_address)
    rank = ("rank", "0")
    model = ("model_name", model_label("", ""))        # the embedded model's name, as the scheduler's

    def sample(name: str, *labels: tuple[str, str]) -> float:
        return samples[(name, frozenset([rank, model, *labels]))]

    assert sample("pagedserve_executor_steps_total") == len(plans) + 1
    assert sample("pagedserve_executor_step_errors_total") == 1
    assert sample("pagedserve_executor_tokens_total") == sum(p.num_batched_tokens for p in plans)
    assert sample("pagedserve_executor_forward_seconds_count") == sum(1 for p in plans if p.sequences)
    assert sample("pagedserve_executor_blocks_swapped_total", ("direction", "out")) == sum(
        len(p.swap_out) for p in plans) > 0
    assert sample("pagedserve_executor_blocks_swapped_total", ("direction", "in")) == sum(
        len(p.swap_in) for p in plans)
    assert sample("pagedserve_executor_blocks_copied_total") == sum(len(p.copy) for p in plans)
    assert sample("pagedserve_executor_gpu_kv_blocks") == cache.num_gpu_blocks
    assert sample("pagedserve_executor_cpu_kv_blocks") == cache.num_cpu_blocks


def test_metrics_port_minus_one_serves_no_metrics(start_executor):
    executor = start_executor("--backend", "simulated", "--metrics-port", "-1")
    assert executor.metrics_address is None
    client = ExecutorClient(executor.address)
    client.wait_ready(10)                                # the executor itself still serves
    client.close()
