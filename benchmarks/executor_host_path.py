"""Host time an executor spends on one steady-state decode step outside the model, stage by stage.

Everything here runs on the executor's thread between two forward passes, so it adds to every step
(the GPU idles meanwhile): decoding the plan from the wire, checking it, applying it to the sequence
states and building the step's input tensors, building the sampling rows, the sampler's host-side
work, and encoding the result. Plans come from the real scheduler, planned ahead as async scheduling
plans them (each sequence feeds back its last sample); the model and the GPU are left out. The
sampler runs on CPU logits with a small vocabulary, so its row counts its Python work, not its math.

    python benchmarks/executor_host_path.py [--num-seqs 64,256,512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protos"))

from clients.tables import markdown_table
from executor_svc.runner import ModelRunner, prepare_batch
from executor_svc.sampler import Sampler
from pagedserve.contract.plan import Sample, SequenceResult, StepPlan, StepResult
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto, result_to_proto
from pagedserve.contract.sequence_registry import SequenceRegistry
from pagedserve.gc_policy import settle_heap
from pagedserve.v1 import executor_pb2 as pb
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler

STAGES = ("decode plan", "validate", "prepare batch", "sampling rows", "sampler (host)", "encode result")
SAMPLER_VOCAB = 64          # small: the sampler row measures Python work, not the softmax over 32k


def sampled(plan: StepPlan, token: int = 1234) -> StepResult:
    """What the executor answers: one token for every sequence that samples."""
    return StepResult(plan.step_id, tuple(SequenceResult(w.seq_id, (Sample(token, -0.5),))
                                          for w in plan.sequences if w.num_samples))


class HostPath:
    """A scheduler and an executor's sequence registry kept in step, two decode steps at a time."""

    def __init__(self, num_seqs: int, context: int, block_size: int, steps: int) -> None:
        config = SchedulerConfig(block_size=block_size, max_num_seqs=num_seqs,
                                 max_num_batched_tokens=num_seqs * context)
        length = context + 2 * steps + 8
        self.block_size = block_size
        self.num_gpu_blocks = num_seqs * (length // block_size + 2)
        self.scheduler = Scheduler(config, self.num_gpu_blocks, 0, max_model_len=length + 16)
        for i in range(num_seqs):
            self.scheduler.add_request(f"r{i}", [3 + (i + j) % 30000 for j in range(context)],
                                       SamplingParams(max_tokens=2 * steps + 8, ignore_eos=True, seed=i))
        self.registry = SequenceRegistry()
        self.sampler = Sampler()
        self.device = torch.device("cpu")
        self._answer(self.scheduler.schedule())              # the prompts: not measured

    def _answer(self, plan: StepPlan) -> None:
        """Run a plan on the registry (the executor's side) and hand its result to the scheduler."""
        prepare_batch(self.registry, plan.sequences, self.block_size, self.device)
        self._finish(plan)

    def _finish(self, plan: StepPlan) -> None:
        for work in plan.sequences:
            if work.num_samples:
                self.registry.record_sample(work.seq_id, 1234)
        self.registry.forget(plan.forget_seq_ids)
        self.scheduler.process_result(sampled(plan))

    def step(self) -> dict[str, float]:
        """A step, then the one planned ahead of it, which is measured; seconds per stage."""
        first = self.scheduler.schedule()
        ahead = self.scheduler.schedule_ahead()
        assert ahead is not None and all(w.feeds_last_sample for w in ahead.sequences)
        wire = plan_to_proto(ahead).SerializeToString()
        self._answer(first)
        times: dict[str, float] = {}

        def timed(stage: str, fn: Callable[[], object]) -> object:
            start = time.perf_counter()
            value = fn()
            times[stage] = time.perf_counter() - start
            return value

        plan = timed("decode plan", lambda: plan_from_proto(pb.StepPlan.FromString(wire)))
        timed("validate", lambda: self.registry.validate(plan, self.block_size, self.num_gpu_blocks, 0))
        timed("prepare batch", lambda: prepare_batch(self.registry, plan.sequences, self.block_size,
                                                     self.device))
        rows = timed("sampling rows", lambda: [ModelRunner._sampling_row(self.registry[w.seq_id], 0, 0)
                                               for w in plan.sequences])
        logits = torch.zeros(len(rows), SAMPLER_VOCAB)
        timed("sampler (host)", lambda: self.sampler(logits, rows))
        result = sampled(plan)
        timed("encode result", lambda: result_to_proto(result).SerializeToString())
        self._finish(plan)
        return times


def measure(num_seqs: int, context: int, block_size: int, steps: int) -> dict[str, float]:
    """Median milliseconds per stage over `steps` decode steps."""
    path = HostPath(num_seqs, context, block_size, steps)
    settle_heap()               # as the executor does after InitCache
    samples = [path.step() for _ in range(steps)]
    medians = {stage: statistics.median(s[stage] for s in samples) * 1e3 for stage in STAGES}
    medians["total"] = sum(medians[stage] for stage in STAGES)
    return medians


def main() -> int:
    """Measure each batch size and print a table (and JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", default="64,256,512", help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [int(n) for n in args.num_seqs.split(",") if n.strip()]
    results = {}
    for n in sizes:
        results[n] = measure(n, args.context, args.block_size, args.steps)
        print(f"{n} sequences: {results[n]['total']:.2f} ms", file=sys.stderr, flush=True)
    print(markdown_table(["sequences", *[f"{s} ms" for s in STAGES], "total ms"],
                         [[n, *[r[s] for s in STAGES], r["total"]] for n, r in results.items()]))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "benchmark": "executor_host_path", "python": platform.python_version(),
            "machine": platform.machine(), "args": vars(args) | {"json": str(args.json)},
            "results_ms": {str(n): r for n, r in results.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
