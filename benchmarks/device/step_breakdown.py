"""PagedServe's side of the step breakdown (issue 18): the suite's main workload, served through gRPC,
once under torch.profiler and once without it, on one executor that times every step.

The executor is `benchmarks/device/step_profile_executor.py` (the unchanged executor with per-step
timing and a profiler window); everything else is `serving_suite.py`'s main phase: Llama-2-7B shape,
bf16 dummy weights, 1,000 ShareGPT-like requests, max_num_seqs 512, block 16, CUDA graphs up to 512,
whole prompts of up to 8,192 tokens a step, async scheduling.

    python3 benchmarks/device/step_breakdown.py --out $OUT/ps --num-requests 1000

Writes to --out: serving_suite.json (both runs' bench reports), pagedserve_trace.json (the profiled
run's Chrome trace, from its first step to its last), pagedserve_steps.json (host timing of every step
of both runs). `step_breakdown_analyze.py` reads the trace and the step log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(REPO / "protos")]


def load_suite():
    """benchmarks/device/serving_suite.py as a module (benchmarks is no package)."""
    spec = importlib.util.spec_from_file_location("serving_suite", HERE / "serving_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serving_suite"] = module
    spec.loader.exec_module(module)
    return module


def wait_for(path: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return {"error": f"{path.name} did not appear within {timeout:.0f} s"}
        time.sleep(0.5)
    time.sleep(0.2)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("step-breakdown-out"))
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--cuda-graph-max-batch", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--runs", default="profiled,plain",
                        help="comma list, in order: profiled (torch.profiler on) and/or plain")
    parser.add_argument("--export-timeout-s", type=float, default=300.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama, not the 7B shape (smoke test)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    os.environ["STEP_BREAKDOWN_DIR"] = str(out)          # the executor inherits it
    for name in ("profile.start", "profile.stop", "profile.done", "steps.dump", "steps.dumped"):
        (out / name).unlink(missing_ok=True)

    suite_mod = load_suite()
    from clients.stack import LocalStack, ServiceSpec, config_environment, free_port
    from executor_svc.config import ENV_PREFIX as EXECUTOR_ENV_PREFIX
    from executor_svc.config import ExecutorConfig

    class ProfiledSuite(suite_mod.Suite):
        def start_executor(self) -> None:
            """As Suite.start_executor, with the timing executor."""
            config = ExecutorConfig(model=str(self.o.model_dir), load_format=self.o.load_format,
                                    device=self.o.device, dtype=self.o.dtype, port=free_port("127.0.0.1"),
                                    metrics_port=-1, max_model_len=self.o.max_model_len,
                                    cuda_graph_max_batch=self.o.cuda_graph_max_batch)
            spec = ServiceSpec("executor-0", (sys.executable, str(HERE / "step_profile_executor.py")),
                               config_environment(config, EXECUTOR_ENV_PREFIX))
            self.executor = LocalStack([spec], restart_executors=False)
            self.executor.start()
            self.executor_address = self.executor.wait_listening("executor-0",
                                                                 timeout=suite_mod.READY_TIMEOUT_S)

    shape = suite_mod.LLAMA2_7B
    if args.tiny:
        shape = {**shape, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4}
    model_dir = suite_mod.write_model_config(Path(tempfile.mkdtemp(prefix="llama-shape-")), shape)
    options = suite_mod.SuiteOptions(
        model_dir=model_dir, load_format="dummy", device=args.device, dtype=args.dtype,
        max_model_len=args.max_model_len, num_requests=args.num_requests, ablation_requests=0,
        peer_continuous_requests=0, peer_static_requests=0, static_batch_size=1,
        max_num_seqs=args.max_num_seqs, cuda_graph_max_batch=args.cuda_graph_max_batch, overlap_steps=True,
        sharing_requests=0,
        online_requests=0, online_rates={}, gpu_memory_utilization=0.9, pressure_memory_utilization=0.3,
        out=out)
    suite = ProfiledSuite(options)
    notes: dict = {"runs": []}
    try:
        for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
            started = time.perf_counter()
            if run == "profiled":
                (out / "profile.start").touch()
                result = suite.bench("main-profiled", "pagedserve, torch.profiler on",
                                     [suite.sharegpt(args.num_requests)], max_num_seqs=args.max_num_seqs)
                (out / "profile.stop").touch()
                notes["export"] = wait_for(out / "profile.done", args.export_timeout_s)
            elif run == "plain":
                result = suite.bench("main", "pagedserve", [suite.sharegpt(args.num_requests)],
                                     max_num_seqs=args.max_num_seqs)
            else:
                raise SystemExit(f"unknown run {run!r}")
            first = (result.get("runs") or [{}])[0]
            client, server = first.get("client", {}), first.get("server", {})
            summary = {"output_tokens_per_s": client.get("output_tokens_per_s"),
                       "duration_s": client.get("duration_s"), "output_tokens": client.get("output_tokens"),
                       "iterations": server.get("iterations"),
                       "control_plane_fraction": server.get("control_plane_fraction"),
                       "mean_batched_requests": server.get("mean_batched_requests")}
            notes["runs"].append({"run": run, "seconds": time.perf_counter() - started, **summary})
            print(f"[step_breakdown] {run}: {json.dumps(summary)} in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr, flush=True)
        (out / "steps.dump").touch()
        notes["dump"] = wait_for(out / "steps.dumped", 60.0)
    finally:
        suite.stop_executor()
        suite.save()
        (out / "step_breakdown_driver.json").write_text(json.dumps(notes, indent=1))
    print(json.dumps(notes), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
