"""Run the scheduler over a workload against the simulated executor and summarise what it did.

Offline (all requests queued at once), as in the paper's memory comparison (Fig. 2, 13): how many
requests run together, how full the KV blocks are, how often groups are preempted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from executor_svc.simulator import SimulatedExecutor
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class SimulatedRequest:
    """A request to queue: its prompt token ids and sampling parameters."""

    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class SimulationReport:
    """What one simulated run did; the per-step means are over steps with a forward batch."""

    reservation: str
    num_requests: int
    num_failed: int
    steps: int
    generated_tokens: int
    mean_batched_requests: float
    mean_batched_seqs: float
    mean_kv_utilization: float
    mean_gpu_usage: float
    preemptions_swap: int
    preemptions_recompute: int
    blocks_swapped: int
    blocks_copied: int
    median_schedule_ms: float
    wall_seconds: float


def simulate(config: SchedulerConfig, requests: Sequence[SimulatedRequest], num_gpu_blocks: int,
             num_cpu_blocks: int, max_model_len: int, vocab_size: int = 32000,
             on_step: Callable[[int, int], None] | None = None, check_integrity: bool = False,
             max_steps: int = 10_000_000) -> SimulationReport:
    """Queue every request, then step until all end. `on_step(step, finished)` reports progress."""
    scheduler = Scheduler(config, num_gpu_blocks, num_cpu_blocks, max_model_len, eos_token_ids=(),
                          vocab_size=vocab_size, seed=0)
    executor = SimulatedExecutor(num_gpu_blocks, num_cpu_blocks, config.block_size, vocab_size=vocab_size,
                                 verify=check_integrity, poison_swapped_out=not config.enable_prefix_caching)
    for i, request in enumerate(requests):
        scheduler.add_request(f"sim-{i}", request.prompt_token_ids, request.params)
    start = time.perf_counter()
    failed = generated = steps = 0
    batched_requests, batched_seqs, utilization, usage, schedule_times = [], [], [], [], []
    while scheduler.has_unfinished and steps < max_steps:
        t0 = time.perf_counter()
        plan = scheduler.schedule()
        schedule_times.append(time.perf_counter() - t0)
        outputs = scheduler.pop_outputs()
        if not plan.is_empty:
            stats = scheduler.stats()
            if plan.sequences:
                batched_requests.append(stats.num_running)
                batched_seqs.append(len(plan.sequences))
                utilization.append(stats.kv_utilization)
                usage.append(stats.gpu_usage)
            outputs += scheduler.process_result(executor.execute(plan))
        if check_integrity:
            scheduler.check_integrity()
        for out in outputs:
            generated += sum(len(c.token_ids) for c in out.outputs)
            failed += out.error is not None
        steps += 1
        if on_step is not None:
            on_step(steps, scheduler.num_finished)
    stats = scheduler.stats()
    return SimulationReport(
        reservation=config.reservation.value, num_requests=len(requests), num_failed=failed, steps=steps,
        generated_tokens=generated, mean_batched_requests=_mean(batched_requests),
        mean_batched_seqs=_mean(batched_seqs), mean_kv_utilization=_mean(utilization),
        mean_gpu_usage=_mean(usage), preemptions_swap=stats.num_preemptions_swap,
        preemptions_recompute=stats.num_preemptions_recompute, blocks_swapped=executor.blocks_swapped,
        blocks_copied=executor.blocks_copied,
        median_schedule_ms=statistics.median(schedule_times) * 1e3 if schedule_times else 0.0,
        wall_seconds=time.perf_counter() - start)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0
