"""Start `pagedserve-executor` on the GPU with a Llama-2-7B-shaped dummy model and serve through it.

Reports the KV capacity the executor finds after profiling (blocks and tokens), then drives a few
requests through the real gRPC Execute stream with the scheduler and reports their throughput.
Writes JSON to the path given (default stdout only).

    python benchmarks/device/executor_gpu_start.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The repository and its generated API package (protos/pagedserve), for runs without an install.
SOURCE_PATHS = [str(REPO), str(REPO / "protos")]
sys.path[:0] = SOURCE_PATHS

import torch  # noqa: E402
import transformers  # noqa: E402

from scheduler_svc.config import SchedulerConfig  # noqa: E402
from scheduler_svc.executor_client import ExecutorClient  # noqa: E402
from scheduler_svc.sampling_params import SamplingParams  # noqa: E402
from scheduler_svc.scheduler import Scheduler  # noqa: E402

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096}


def start_executor(model_dir: Path) -> tuple[subprocess.Popen, str]:
    """The executor process and its address, once it listens."""
    path = os.pathsep.join(filter(None, [*SOURCE_PATHS, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    proc = subprocess.Popen([sys.executable, "-m", "executor_svc", "--model", str(model_dir), "--load-format",
                             "dummy", "--device", "cuda", "--dtype", "bfloat16", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        print(line, end="", file=sys.stderr)
        match = re.search(r"listening on (\S+:\d+)", line)
        if match:
            return proc, match.group(1)
    raise RuntimeError(f"executor exited with {proc.wait()}")


def main() -> int:
    """Start, profile, serve a few requests, report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    block_size, max_batched, max_seqs = 16, 8192, 256
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.LlamaConfig(**LLAMA2_7B, bos_token_id=1, eos_token_id=2)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(tmp)
        t0 = time.perf_counter()
        proc, address = start_executor(Path(tmp))
        start_seconds = time.perf_counter() - t0
        try:
            client = ExecutorClient(address, timeout=600)
            described = client.describe()
            cache = client.init_cache(block_size, 0.9, 4 * 2**30, max_batched + max_seqs)
            tokens = cache.num_gpu_blocks * block_size
            print(f"KV capacity: {cache.num_gpu_blocks} GPU blocks ({tokens} tokens), "
                  f"{cache.num_cpu_blocks} CPU blocks, {cache.block_bytes} bytes per block, "
                  f"profiled in {cache.profile_seconds:.1f}s", flush=True)
            scheduler = Scheduler(SchedulerConfig(block_size=block_size, max_num_batched_tokens=max_batched),
                                  cache.num_gpu_blocks, cache.num_cpu_blocks, described.max_model_len, seed=0)
            for i in range(args.num_requests):
                prompt = [3 + (i * 131 + j * 7) % 31990 for j in range(args.prompt_len)]
                params = SamplingParams(max_tokens=args.output_len, ignore_eos=True)
                scheduler.add_request(f"r{i}", prompt, params)
            generated, steps, forward = 0, 0, 0.0
            t0 = time.perf_counter()
            while scheduler.has_unfinished:
                plan = scheduler.schedule()
                result = client.step(plan)
                forward += result.forward_seconds
                steps += 1
                for out in scheduler.process_result(result):
                    generated += sum(len(c.token_ids) for c in out.outputs)
            wall = time.perf_counter() - t0
            client.close()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    report = {"device": described.device, "device_name": torch.cuda.get_device_name(),
              "dtype": described.dtype, "architecture": described.architecture,
              "num_layers": described.num_layers, "startup_seconds": start_seconds,
              "block_size": block_size, "num_gpu_blocks": cache.num_gpu_blocks,
              "kv_capacity_tokens": cache.num_gpu_blocks * block_size, "num_cpu_blocks": cache.num_cpu_blocks,
              "block_bytes": cache.block_bytes, "profile_seconds": cache.profile_seconds,
              "requests": args.num_requests, "prompt_len": args.prompt_len, "output_len": args.output_len,
              "output_tokens": generated, "steps": steps, "wall_seconds": wall,
              "executor_forward_seconds": forward, "output_tokens_per_second": generated / wall,
              "attention": "torch reference"}
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
