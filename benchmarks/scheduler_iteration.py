"""Median time of one scheduling iteration: 256 running sequences of ~1000 tokens, block size 16.

Measures `schedule()` (plan the step), `process_result()` (apply a step's samples, stop checks,
reports) and both together, with the executor's result prepared outside the timed region. Run with
`python benchmarks/scheduler_iteration.py [--json out.json]`; pin it to one core with `taskset -c 0`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.tables import markdown_table
from pagedserve.contract.plan import Sample, SequenceResult, StepPlan, StepResult
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler


def decode_result(plan: StepPlan) -> StepResult:
    """What an executor answers: one sampled token per scheduled sequence."""
    return StepResult(plan.step_id, tuple(SequenceResult(w.seq_id, (Sample(1234, -0.5),))
                                          for w in plan.sequences))


def measure(num_seqs: int, context: int, block_size: int, iterations: int) -> dict[str, float]:
    """Median milliseconds of schedule(), process_result() and their sum over steady-state decode."""
    config = SchedulerConfig(block_size=block_size, max_num_seqs=num_seqs,
                             max_num_batched_tokens=num_seqs * context)
    blocks_per_seq = (context + iterations + 2 * block_size) // block_size
    scheduler = Scheduler(config, num_seqs * blocks_per_seq, 0, max_model_len=context + iterations + 16)
    for i in range(num_seqs):
        scheduler.add_request(f"r{i}", [3 + (i + j) % 30000 for j in range(context)],
                              SamplingParams(max_tokens=iterations + 8, ignore_eos=True, seed=i))
    plan = scheduler.schedule()                       # the prompts: not part of the measurement
    scheduler.process_result(decode_result(plan))
    schedule_s, process_s = [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        plan = scheduler.schedule()
        t1 = time.perf_counter()
        result = decode_result(plan)
        t2 = time.perf_counter()
        scheduler.process_result(result)
        t3 = time.perf_counter()
        assert len(plan.sequences) == num_seqs
        schedule_s.append(t1 - t0)
        process_s.append(t3 - t2)
    total = [a + b for a, b in zip(schedule_s, process_s, strict=True)]
    return {"schedule_ms": statistics.median(schedule_s) * 1e3,
            "process_result_ms": statistics.median(process_s) * 1e3,
            "iteration_ms": statistics.median(total) * 1e3}


def main() -> int:
    """Run the measurement and print a table (and JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--context", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="independent runs; the best median counts")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = [measure(args.num_seqs, args.context, args.block_size, args.iterations)
            for _ in range(args.repeats)]
    best = min(runs, key=lambda r: r["iteration_ms"])
    print(markdown_table(["run", "schedule() ms", "process_result() ms", "iteration ms"],
                         [[i + 1, r["schedule_ms"], r["process_result_ms"], r["iteration_ms"]]
                          for i, r in enumerate(runs)]))
    print(f"\nbest median iteration: {best['iteration_ms']:.3f} ms "
          f"(schedule {best['schedule_ms']:.3f} ms + process_result {best['process_result_ms']:.3f} ms) "
          f"for {args.num_seqs} sequences of ~{args.context} tokens, block size {args.block_size}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "benchmark": "scheduler_iteration", "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(), "args": vars(args) | {
                "json": str(args.json)}, "runs": runs, "best": best}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
