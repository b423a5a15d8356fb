"""Generation throughput of the model executor driven by the scheduler, in one process.

Builds a Llama-shaped model from a config (random "dummy" weights, so no checkpoint is needed),
queues fixed-length requests with ignore_eos, and runs scheduler + executor steps until all finish.
Prints output tokens/s, steps/s and the mean batch; `--json` writes the raw figures.

    python benchmarks/executor_throughput.py                       # a tiny model on the CPU
    python benchmarks/executor_throughput.py --preset llama2-7b --device cuda --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import transformers

from clients.loadgen import progress_bar
from clients.tables import markdown_table
from executor_svc.config import ExecutorConfig
from executor_svc.model_backend import ModelBackend
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler

PRESETS = {
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 8, "vocab_size": 4096, "max_position_embeddings": 2048},
    "llama2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "max_position_embeddings": 4096},
}


def write_config(directory: Path, preset: str) -> Path:
    """A model directory holding only config.json (weights are dummy)."""
    config = transformers.LlamaConfig(**PRESETS[preset], bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    return directory


class StepProfiler:
    """Records `steps` decode-only steps with torch.profiler and prints where their time went."""

    def __init__(self, steps: int) -> None:
        self.remaining = steps
        self.profile: torch.profiler.profile | None = None

    def before_step(self, decode_only: bool) -> None:
        """Start recording at the first decode-only step (prefill steps are not the steady state)."""
        if self.profile is None and self.remaining > 0 and decode_only:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def after_step(self) -> None:
        """Stop after the last recorded step and print the CPU and GPU tables."""
        if self.profile is None or self.remaining <= 0:
            return
        self.remaining -= 1
        if self.remaining == 0:
            self.profile.__exit__(None, None, None)
            averages = self.profile.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=30))
            if torch.cuda.is_available():
                print(averages.table(sort_by="self_cuda_time_total", row_limit=30))


def run(args: argparse.Namespace, model_dir: Path) -> dict:
    """Serve the requests; returns the measured figures."""
    executor = ModelBackend(ExecutorConfig(model=str(model_dir), device=args.device, dtype=args.dtype,
                                           load_format="dummy", cpu_kv_cache_bytes=args.cpu_kv_cache_bytes))
    config = SchedulerConfig(block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens)
    cache = executor.init_cache(args.block_size, 0.9, 0, args.max_num_batched_tokens + args.max_num_seqs)
    describe = executor.describe()
    scheduler = Scheduler(config, cache.num_gpu_blocks, 0, describe.max_model_len, seed=0)
    for i in range(args.num_requests):
        prompt = [3 + (i * 131 + j * 7) % (describe.vocab_size - 3) for j in range(args.prompt_len)]
        scheduler.add_request(f"r{i}", prompt, SamplingParams(max_tokens=args.output_len, ignore_eos=True,
                                                              temperature=0.0))
    progress = progress_bar("generate", args.num_requests)
    batch_sizes, step_seconds, generated, rooflines = [], [], 0, []
    profiler = StepProfiler(args.profile_steps)
    start = time.perf_counter()
    while scheduler.has_unfinished:
        plan = scheduler.schedule()
        if plan.is_empty:
            break
        decode_only = all(len(w.token_ids) == 1 for w in plan.sequences)
        profiler.before_step(decode_only)
        t0 = time.perf_counter()
        result = executor.execute(plan)
        step_seconds.append(time.perf_counter() - t0)
        profiler.after_step()
        batch_sizes.append(len(plan.sequences))
        if result.roofline_seconds > 0:
            rooflines.append(result.roofline_seconds / result.forward_seconds)
        for out in scheduler.process_result(result):
            generated += sum(len(c.token_ids) for c in out.outputs)
        progress.update(scheduler.num_finished - progress.n)
    wall = time.perf_counter() - start
    progress.close()
    return {"output_tokens": generated, "wall_seconds": wall, "output_tokens_per_second": generated / wall,
            "steps": len(step_seconds), "mean_batch": statistics.fmean(batch_sizes),
            "median_step_ms": statistics.median(step_seconds) * 1e3,
            # The slowest step (a full prefill step, usually): what executor_step_timeout_seconds must exceed.
            "max_step_ms": max(step_seconds) * 1e3,
            "mean_decode_roofline": statistics.fmean(rooflines) if rooflines else None,
            "num_gpu_blocks": cache.num_gpu_blocks,
            "device": str(executor.device), "dtype": str(executor.dtype).removeprefix("torch."),
            "device_name": (torch.cuda.get_device_name(executor.device) if executor.device.type == "cuda"
                            else platform.processor() or platform.machine())}


def main() -> int:
    """Parse flags, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--cpu-kv-cache-bytes", type=int, default=2**30)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many decode-only steps with torch.profiler and print the tables")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args, write_config(Path(tmp), args.preset))
    print(markdown_table(["preset", "device", "dtype", "requests", "in/out", "output tok/s", "steps",
                          "mean batch", "median step ms", "max step ms"],
                         [[args.preset, figures["device"], figures["dtype"], args.num_requests,
                           f"{args.prompt_len}/{args.output_len}", figures["output_tokens_per_second"],
                           figures["steps"], figures["mean_batch"], figures["median_step_ms"],
                           figures["max_step_ms"]]]))
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmark": "executor_throughput", "args": vars(args) | {
            "json": str(args.json)}, "torch": torch.__version__, "machine": platform.machine(),
            **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
