"""One tree's sampler on a GPU, for an A/B of two trees (issue 18): the draws it makes on fixed batches,
and how long the host is held when the logits sit behind a long GPU job (as behind a forward pass).

    PYTHONPATH=<tree>:<tree>/protos python3 benchmarks/device/sampler_ab_check.py --out draws_<tree>.json
    python3 benchmarks/device/sampler_ab_check.py --compare draws_a.json draws_b.json

The batches: 400 rows of 32,000 random logits at temperature 1 with a seed per row (the main workload's
sampling), the same with greedy, top-k/top-p/min-p, penalties and logprobs mixed in, and rows with NaN,
+inf, all -inf and huge logits. `--compare` exits 1 unless both files hold identical draws.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROWS, VOCAB = 400, 32000


def batches() -> dict[str, tuple[torch.Tensor, list]]:
    """Named (logits [N, V] float32 on the GPU, SamplingRows) batches, the same in every tree."""
    from executor_svc.sampler import SamplingRow

    def row(i: int, **fields: object) -> SamplingRow:
        base = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seed=7919 * i + 1, stream=i % 2,
                    token_index=3 * i, prompt_token_ids=(1, 2, 3, 40), output_token_ids=(40, 41, 41))
        return SamplingRow(**{**base, **fields})  # type: ignore[arg-type]

    generator = torch.Generator().manual_seed(0)
    plain = torch.randn(ROWS, VOCAB, generator=generator) * 3.0
    extreme = plain.clone()
    extreme[1, 5] = math.nan
    extreme[2, [3, 40]] = math.inf
    extreme[3] = -math.inf
    extreme[4] *= 1e37
    extreme[5, 100:] = -math.inf
    extreme[6, 17] = 400.0
    settings = [{}, {"temperature": 0.0}, {"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.1},
                {"repetition_penalty": 1.2, "presence_penalty": 0.3, "frequency_penalty": 0.1},
                {"temperature": 1e-30}, {"num_logprobs": 5}, {"suppressed_token_ids": (0, 1, 2)}]
    mixed = [row(i, **settings[i % len(settings)]) for i in range(ROWS)]
    return {
        "seeded_temperature_1": (plain.cuda(), [row(i) for i in range(ROWS)]),
        "seeded_temperature_1_bf16": (plain.cuda().bfloat16(), [row(i) for i in range(ROWS)]),
        "mixed_settings": (plain.cuda(), mixed),
        "extreme_rows_plain": (extreme.cuda(), [row(i) for i in range(ROWS)]),
        "extreme_rows_mixed": (extreme.cuda(), mixed),
    }


def host_held_ms(sampler, logits: torch.Tensor, rows: list, gpu_ms: float, repeats: int = 20) -> float:
    """Median host ms from queueing a `gpu_ms` GPU job to the sampler's return, minus that job."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    torch.cuda.synchronize()
    cycles = int(1_000_000 * gpu_ms / start.elapsed_time(end))
    held = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        began = time.perf_counter()
        torch.cuda._sleep(cycles)                   # the forward pass the logits wait behind
        sampler(logits, rows)
        held.append((time.perf_counter() - began) * 1e3 - gpu_ms)
    return statistics.median(held)


def run(out: Path) -> None:
    """Draw every batch, time the host, write JSON."""
    from executor_svc.sampler import Sampler

    sampler = Sampler()
    result: dict = {"draws": {}, "timing": {}}
    for name, (logits, rows) in batches().items():
        output = sampler(logits, rows)
        result["draws"][name] = {"token_ids": output.token_ids, "logprobs": output.logprobs,
                                 "top_logprobs": output.top_logprobs}
    logits, rows = batches()["seeded_temperature_1"]
    for gpu_ms in (0.0, 30.0):
        held = host_held_ms(sampler, logits, rows, gpu_ms)
        result["timing"][f"sampler_ms_after_{gpu_ms:.0f}ms_gpu_job"] = held
    out.write_text(json.dumps(result))
    print(json.dumps(result["timing"]))


def compare(a: Path, b: Path) -> int:
    """0 when both files' draws are identical, else 1 (naming the batches that differ)."""
    first, second = json.loads(a.read_text())["draws"], json.loads(b.read_text())["draws"]
    differing = [name for name in first if first[name] != second.get(name)]
    print(json.dumps({"batches": len(first), "identical": not differing, "differing": differing}))
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", type=Path, nargs=2)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
