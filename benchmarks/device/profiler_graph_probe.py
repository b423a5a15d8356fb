"""Does torch.profiler see the kernels inside a CUDA graph replay, with the replay's launch as their
correlation? The step breakdown (step_breakdown_analyze.py) relies on it. Prints one JSON line."""

from __future__ import annotations

import json
import tempfile

import torch


def main() -> None:
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        (x @ w).relu()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = (x @ w).relu() * 2.0
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("probe_step"):
            graph.replay()
            z = y.sum()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {e["args"].get("correlation"): e["name"] for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
    print(json.dumps({"kernels": [k["name"][:60] for k in kernels],
                      "launch_of_each": [launches.get(k["args"].get("correlation")) for k in kernels],
                      "annotations": [e["name"] for e in events if e.get("cat") == "user_annotation"],
                      "sum": float(z)}))


if __name__ == "__main__":
    main()
