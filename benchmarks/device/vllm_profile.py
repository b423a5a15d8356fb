#!/usr/bin/env python3
"""vLLM's side of the step breakdown (issue 18): the suite's main workload through vLLM's offline
`LLM.generate`, once without and once under vLLM's own worker profiler (torch.profiler, CPU + CUDA).

vLLM is a measuring peer only: this script imports it at run time on the device machine, from the
site the peer harness installs (../shared/peers/vllm, copied to .peer/scripts by its prepare.sh), and
reuses that harness's workload and model builders (`vllm_offline.py`), so the requests, the model
shape and the warm-up are exactly the harness's. Nothing of vLLM is in this repository.

    source .peer/scripts/env.sh && PYTHONPATH=/tmp/vsite python3 benchmarks/device/vllm_profile.py \
        --out $OUT/vllm --num-requests 1000 --max-num-seqs 512

The profiler runs in vLLM's engine-core process (its worker) over the whole profiled generate() call:
every engine iteration is a range named `execute_context_<prefill requests>(<prefill tokens>)_
generation_<decode requests>(<decode tokens>)` (vLLM's own annotation), and sampling a range
`gpu_model_runner: sample`. Writes --out/vllm_profile.json (config, runs) and the Chrome trace
--out/vllm_trace.json; `step_breakdown_analyze.py` reads the trace.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path


def log(*args) -> None:
    print("[vllm_profile]", *args, file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, default=Path("."))
    p.add_argument("--harness", type=Path, default=Path(".peer/scripts"),
                   help="where the peer harness's vllm_offline.py is")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ".") / "vllm")
    p.add_argument("--trace", default="sharegpt")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--sampling", default="random", choices=["greedy", "random"],
                   help="random: temperature 1.0 (PagedServe's suite samples at temperature 1.0)")
    p.add_argument("--runs", default="plain,profiled", help="comma list, in order: plain and/or profiled")
    p.add_argument("--profile-dir", type=Path, default=Path("/tmp/vllm-profile"))
    args = p.parse_args()
    project = args.project.resolve()
    sys.path[:0] = [str(args.harness.resolve()), str(project), str(project / "protos")]
    import vllm_offline as harness  # the peer harness

    constants = harness.suite_constants(project)
    shape = constants["LLAMA2_7B"]
    vocab = shape["vocab_size"]
    requests = harness.build_requests(project, args.trace, args.num_requests, args.seed, vocab,
                                      args.max_model_len)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.profile_dir, ignore_errors=True)
    args.profile_dir.mkdir(parents=True)

    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from clients.traces import prompt_token_ids

    model_dir = harness.write_model_config(Path("/tmp/vllm-peer-model"), project, shape,
                                           constants.get("TOKENIZER_FILES", ()))
    profiler_config = {"profiler": "torch", "torch_profiler_dir": str(args.profile_dir),
                       "torch_profiler_with_stack": False, "torch_profiler_use_gzip": False,
                       "torch_profiler_dump_cuda_time_total": False, "ignore_frontend": True}
    t0 = time.perf_counter()
    llm = LLM(model=str(model_dir), load_format="dummy", dtype="bfloat16", max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              enable_prefix_caching=False, skip_tokenizer_init=True, seed=args.seed,
              profiler_config=profiler_config)
    init_s = time.perf_counter() - t0
    config = harness.engine_config(llm)
    log(f"LLM init {init_s:.1f} s; config {json.dumps(config)}")

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                              temperature=0.0 if args.sampling == "greedy" else 1.0, detokenize=False)

    warm = [TokensPrompt(prompt_token_ids=prompt_token_ids(i, 16, vocab, args.seed + 1)) for i in range(8)]
    llm.generate(warm, [params(8) for _ in warm], use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=t) for t, _ in requests]
    report = {"system": "vllm", "vllm_version": vllm.__version__, "torch": torch.__version__,
              "device": harness.device_name(), "init_s": init_s, "config": config,
              "profiler_config": profiler_config, "sampling": args.sampling,
              "workload": {"trace": args.trace, "num_requests": len(requests), "seed": args.seed,
                           "prompt_tokens": sum(len(t) for t, _ in requests),
                           "output_tokens": sum(o for _, o in requests)}, "runs": []}
    for run in [r.strip() for r in args.runs.split(",") if r.strip()]:
        sps = [params(o) for _, o in requests]
        if run == "profiled":
            llm.start_profile()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        wall = time.perf_counter() - t0
        entry = {"run": run, "wall_s": wall}
        if run == "profiled":
            t1 = time.perf_counter()
            llm.stop_profile()                  # the worker writes its trace before this returns
            entry["stop_profile_s"] = time.perf_counter() - t1
            traces = sorted(glob.glob(str(args.profile_dir / "**" / "*.json*"), recursive=True),
                            key=os.path.getsize)
            entry["trace_files"] = traces
            if traces:
                shutil.move(traces[-1], args.out / "vllm_trace.json")
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        entry.update(output_tokens=sum(lengths), output_tokens_per_s=sum(lengths) / wall,
                     every_length_exact=lengths == [o for _, o in requests])
        report["runs"].append(entry)
        log(json.dumps(entry))
        (args.out / "vllm_profile.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
