"""Tensor-parallel serving on one host's GPUs (issue 7, the paper's §4.6): the same Llama-2-13B-shaped
dummy model and ShareGPT-like trace served at each tensor-parallel size, one JSON per size and one
comparison table, through `pagedserve bench` (which starts the scheduler and one executor per rank).

    python benchmarks/device/tensor_parallel.py --out results/ --tp 2,1 --num-requests 500
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from benchmarks.device.serving_suite import LLAMA2_13B, write_model_config  # noqa: E402
from clients import bench_report  # noqa: E402


def bench_command(tp: int, model_dir: Path, options: argparse.Namespace, json_path: Path) -> list[str]:
    """The `pagedserve bench` command line for one tensor-parallel size."""
    load_format = "auto" if options.model else "dummy"
    return [sys.executable, "-m", "clients.cli", "bench", "--executors", str(tp), "--model", str(model_dir),
            "--load-format", load_format, "--device", options.device, "--dtype", options.dtype,
            "--max-model-len", str(options.max_model_len),
            "--max-num-seqs", str(options.max_num_seqs), "--cuda-graph-max-batch", str(options.max_num_seqs),
            "--gpu-memory-utilization", str(options.gpu_memory_utilization), "--trace", "sharegpt",
            "--num-requests", str(options.num_requests), "--warmup-requests", "8", "--no-progress",
            "--label", f"pagedserve TP={tp}", "--json", str(json_path)]


def comparison(results: list[dict], title: str) -> str:
    """The markdown table of every size, and each size's output throughput relative to TP=1."""
    lines = [f"# {title}", "", bench_report.markdown(results), ""]
    by_label = {r["system"]: r["runs"][0]["client"]["output_tokens_per_s"] for r in results}
    base = by_label.get("pagedserve TP=1")
    if base:
        for label, rate in by_label.items():
            lines.append(f"- {label}: {rate:,.0f} output tok/s, {rate / base:.2f}x TP=1")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run each size in turn (logs under --out), then write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("tp-out"))
    parser.add_argument("--tp", default="2,1", help="tensor-parallel sizes, comma-separated")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--model", type=Path, default=None,
                        help="a model directory with weights (default: Llama-2-13B shape, dummy weights)")
    parser.add_argument("--device", default="auto", help="auto: rank r on GPU r")
    parser.add_argument("--dtype", default="bfloat16")
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    model_dir = options.model or write_model_config(Path(tempfile.mkdtemp(prefix="llama2-13b-shape-")),
                                                    LLAMA2_13B)
    title = f"{model_dir.name}, {options.dtype}, ShareGPT-like x{options.num_requests}"
    results, status = [], 0
    for tp in (int(t) for t in options.tp.split(",")):
        json_path = options.out / f"tp{tp}.json"
        with (options.out / f"tp{tp}.log").open("w") as log:
            code = subprocess.call(bench_command(tp, model_dir, options, json_path), stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO)
        print(f"TP={tp}: exit {code}", flush=True)
        status |= code
        if json_path.exists():
            results.extend(bench_report.load_results([json_path]))
            (options.out / "tensor_parallel.md").write_text(comparison(results, title))
    print((options.out / "tensor_parallel.md").read_text() if results else "no results")
    return status


if __name__ == "__main__":
    sys.exit(main())
