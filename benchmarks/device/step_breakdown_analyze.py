#!/usr/bin/env python3
"""Per-step GPU timelines of PagedServe and vLLM from their torch.profiler traces (issue 18).

Reads the Chrome traces that `step_breakdown.py` (PagedServe's executor) and `vllm_profile.py` (vLLM's
worker) write, or the slim `.npz` copies this script makes of them, and splits every engine step into:

- attention: the attention kernels (PagedServe's paged decode kernel and FlashAttention-2 prefill;
  vLLM's FlashAttention 3), and separately the KV-cache write and PagedServe's prefill K/V gather;
- gemm: cuBLAS / CUTLASS matrix products (the lm_head included);
- norm_rotary_act: RMSNorm, residual add, rotary, SiLU-and-mul, and Triton (Inductor) fusions of them;
- sampling: every kernel launched inside the sampler's range (`ps:sample`, vLLM's
  `gpu_model_runner: sample`);
- other: everything else (embedding, index and copy kernels, memcpy, memset);
- idle: the step's period on the GPU (from its first kernel to the next step's first kernel) minus the
  union of its kernels' intervals: the time the GPU waits on host work serial with it.

A kernel belongs to the step during whose host range it was launched: the step ranges are PagedServe's
`ps_step_<id>` (one executor step, plan decode to result encode) and vLLM's
`execute_context_<n>(<tokens>)_generation_<n>(<tokens>)`; a kernel launched between two step ranges
(vLLM's sampling, which runs after execute_model) belongs to the earlier one.

    python3 benchmarks/device/step_breakdown_analyze.py \
        --pagedserve ps/pagedserve_trace.json --pagedserve-steps ps/pagedserve_steps.json \
        --vllm vllm/vllm_trace.json --out step_breakdown.json [--slim-dir DIR] [--excerpt-dir DIR]

The slim copies re-analyse anywhere (no GPU), e.g. into the committed summary and per-step tables:

    python3 benchmarks/device/step_breakdown_analyze.py --pagedserve pagedserve_slim.npz \
        --pagedserve-steps pagedserve_steps.json --vllm vllm_slim.npz --no-steps \
        --out step_breakdown_h200.json --steps-csv steps.csv.gz --host-csv host.csv.gz
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CATEGORIES = ("attention", "kv_cache_write", "prefill_kv_gather", "gemm", "norm_rotary_act", "sampling",
              "other")
GPU_KINDS = {"kernel": 0, "gpu_memcpy": 1, "gpu_memset": 2}
VLLM_STEP = re.compile(r"^execute_context_(\d+)\((\d+)\)_generation_(\d+)\((\d+)\)$")
PS_STEP = re.compile(r"^ps_step_(\d+)$")
SAMPLE_RANGES = ("ps:sample", "gpu_model_runner: sample")
GATHER_RANGES = ("ps:kv_gather",)
LOGITS_RANGES = ("ps:logits",)
DECODE_BUCKETS = ((1, 64), (64, 128), (128, 256), (256, 384), (384, 513))

ATTENTION = ("paged_attention", "flash", "fmha", "attn", "attention")
KV_WRITE = ("reshape_and_cache", "concat_and_cache", "cache_kernel")
GEMM = ("nvjet", "gemm", "cutlass", "xmma", "cublas", "matmul", "splitk", "_mm_", "sm90_")
NORM_ROTARY_ACT = ("rms_norm", "rmsnorm", "layer_norm", "layernorm", "rotary", "silu", "act_and_mul",
                   "gelu", "triton_")


@dataclass
class Events:
    """One trace reduced to what the breakdown needs (times in microseconds)."""

    names: list[str]
    gpu_name: np.ndarray        # [G] int32 index into names
    gpu_kind: np.ndarray        # [G] int8: 0 kernel, 1 memcpy, 2 memset
    gpu_ts: np.ndarray          # [G] float64
    gpu_dur: np.ndarray         # [G] float64
    launch_ts: np.ndarray       # [G] float64: its launching runtime call, or gpu_ts where none was found
    ranges: list[tuple[str, float, float]] = field(default_factory=list)   # user annotations (name, ts, dur)
    counts: dict[str, int] = field(default_factory=dict)
    graph_launch_ts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # cudaGraphLaunch calls


def load_json_trace(path: Path) -> tuple[Events, list[dict[str, Any]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    raw = trace["traceEvents"] if isinstance(trace, dict) else trace
    names: dict[str, int] = {}
    gname, gkind, gts, gdur, gcorr = [], [], [], [], []
    launches: dict[int, float] = {}
    graph_launches = []
    ranges = []
    counts: dict[str, int] = {}
    for e in raw:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        counts[cat] = counts.get(cat, 0) + 1
        if cat in GPU_KINDS:
            name = e.get("name", "")
            gname.append(names.setdefault(name, len(names)))
            gkind.append(GPU_KINDS[cat])
            gts.append(float(e["ts"]))
            gdur.append(float(e.get("dur", 0.0)))
            gcorr.append(int((e.get("args") or {}).get("correlation", -1)))
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launches[int(corr)] = float(e["ts"])
            if e.get("name", "").startswith("cudaGraphLaunch"):
                graph_launches.append(float(e["ts"]))
        elif cat == "user_annotation":
            ranges.append((e.get("name", ""), float(e["ts"]), float(e.get("dur", 0.0))))
    gts_a = np.asarray(gts, dtype=np.float64)
    launch = np.array([launches.get(c, t) for c, t in zip(gcorr, gts, strict=True)], dtype=np.float64)
    counts["gpu_events_without_launch"] = int(sum(1 for c in gcorr if c not in launches))
    events = Events(list(names), np.asarray(gname, dtype=np.int32), np.asarray(gkind, dtype=np.int8), gts_a,
                    np.asarray(gdur, dtype=np.float64), launch, sorted(ranges, key=lambda r: r[1]), counts,
                    np.sort(np.asarray(graph_launches, dtype=np.float64)))
    return events, raw


def save_slim(events: Events, path: Path) -> None:
    """The reduced trace, compressed (re-analysable with this script): GPU events sorted by start, as
    integer nanoseconds (start deltas, launch lags, durations)."""
    order = np.argsort(events.gpu_ts, kind="stable")
    base = float(events.gpu_ts[order[0]]) if len(order) else 0.0
    ts_ns = np.round((events.gpu_ts[order] - base) * 1e3).astype(np.int64)
    launch_ns = np.round((events.launch_ts[order] - base) * 1e3).astype(np.int64)
    np.savez_compressed(
        path, names=np.array(events.names), gpu_name=events.gpu_name[order].astype(np.int32),
        gpu_kind=events.gpu_kind[order], gpu_ts_delta_ns=np.diff(ts_ns, prepend=0),
        launch_lag_ns=ts_ns - launch_ns, gpu_dur_ns=np.round(events.gpu_dur[order] * 1e3).astype(np.int64),
        range_names=np.array([r[0] for r in events.ranges]),
        range_ts_ns=np.array([round((r[1] - base) * 1e3) for r in events.ranges], dtype=np.int64),
        range_dur_ns=np.array([round(r[2] * 1e3) for r in events.ranges], dtype=np.int64),
        counts=np.array(json.dumps(events.counts)),
        graph_launch_ns=np.round((events.graph_launch_ts - base) * 1e3).astype(np.int64))


def load_slim(path: Path) -> Events:
    z = np.load(path)
    ranges = [(str(n), t / 1e3, d / 1e3) for n, t, d in zip(z["range_names"], z["range_ts_ns"],
                                                             z["range_dur_ns"], strict=True)]
    ts_ns = np.cumsum(z["gpu_ts_delta_ns"])
    return Events([str(n) for n in z["names"]], z["gpu_name"], z["gpu_kind"], ts_ns / 1e3,
                  z["gpu_dur_ns"] / 1e3, (ts_ns - z["launch_lag_ns"]) / 1e3, ranges,
                  json.loads(str(z["counts"])), z["graph_launch_ns"] / 1e3)


def load(path: Path) -> tuple[Events, list[dict[str, Any]] | None]:
    if path.suffix == ".npz":
        return load_slim(path), None
    return load_json_trace(path)


def name_category(name: str, kind: int) -> str:
    if kind != 0:
        return "other"
    n = name.lower()
    if any(k in n for k in KV_WRITE):
        return "kv_cache_write"
    if any(k in n for k in ATTENTION):
        return "attention"
    if any(k in n for k in GEMM):
        return "gemm"
    if any(k in n for k in NORM_ROTARY_ACT):
        return "norm_rotary_act"
    return "other"


class RangeIndex:
    """Which of a set of non-nested host ranges holds a time."""

    def __init__(self, ranges: list[tuple[str, float, float]], names: tuple[str, ...]) -> None:
        chosen = sorted((ts, ts + dur) for n, ts, dur in ranges if n in names)
        self.starts = [s for s, _ in chosen]
        self.ends = [e for _, e in chosen]

    def holds(self, t: float) -> bool:
        i = bisect.bisect_right(self.starts, t) - 1
        return i >= 0 and t <= self.ends[i]


def union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    if len(starts) == 0:
        return 0.0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    run_end = np.maximum.accumulate(e)
    gaps = np.maximum(s[1:] - run_end[:-1], 0.0)
    return float(run_end[-1] - s[0] - gaps.sum())


def steps_of(events: Events, system: str, composition: dict[int, dict[str, Any]] | None) -> list[dict]:
    """The step ranges, in order, with what each step computed."""
    steps = []
    for name, ts, dur in events.ranges:
        if system == "vllm":
            m = VLLM_STEP.match(name)
            if not m:
                continue
            ctx_reqs, ctx_tokens, gen_reqs, gen_tokens = map(int, m.groups())
            steps.append({"name": name, "host_ts": ts, "host_ms": dur / 1e3, "seqs": ctx_reqs + gen_reqs,
                          "prompt_seqs": ctx_reqs, "prompt_tokens": ctx_tokens, "decode_seqs": gen_reqs,
                          "tokens": ctx_tokens + gen_tokens})
        else:
            m = PS_STEP.match(name)
            if not m:
                continue
            step_id = int(m.group(1))
            c = (composition or {}).get(step_id, {})
            seqs, prompt_seqs = c.get("seqs", 0), c.get("prompt_seqs", 0)
            steps.append({"name": name, "step_id": step_id, "host_ts": ts, "host_ms": dur / 1e3, "seqs": seqs,
                          "prompt_seqs": prompt_seqs, "prompt_tokens": c.get("prompt_tokens", 0),
                          "decode_seqs": seqs - prompt_seqs, "tokens": c.get("tokens", 0),
                          "graph": bool(c.get("graph", False)),
                          "host_phases_ms": {k[:-2]: v * 1e3 for k, v in c.items()
                                             if k.endswith("_s") and isinstance(v, float)}})
    steps.sort(key=lambda s: s["host_ts"])
    for s in steps:
        s["kind"] = ("decode" if s["prompt_tokens"] == 0 else
                     "prefill" if s["decode_seqs"] == 0 else "mixed")
    return steps


def analyze(events: Events, system: str, composition: dict[int, dict[str, Any]] | None = None) -> dict:
    steps = steps_of(events, system, composition)
    if not steps:
        raise SystemExit(f"{system}: no step ranges in the trace")
    starts = [s["host_ts"] for s in steps]
    sample_idx = RangeIndex(events.ranges, SAMPLE_RANGES)
    sampling_rule = "kernels launched inside a sampler range (" + ", ".join(SAMPLE_RANGES) + ")"
    if system == "vllm" and not sample_idx.starts:
        # vLLM names its sampler's range only with VLLM_CUSTOM_SCOPES_FOR_PROFILING=1. Without it, the
        # sampler's launches are the ones between one execute_model range's end and the next step's
        # start: sample_tokens() runs after execute_model() returns (logits, hence the lm_head, are
        # computed inside it), and the next step's input preparation runs inside the next range.
        gaps = [("gap", s["host_ts"] + s["host_ms"] * 1e3, b["host_ts"] - s["host_ts"] - s["host_ms"] * 1e3)
                for s, b in itertools.pairwise(steps)]
        sample_idx = RangeIndex([g for g in gaps if g[2] > 0], ("gap",))
        sampling_rule = ("kernels launched between an execute_model range's end and the next step's start "
                         "(vLLM's sample_tokens)")
    gather_idx = RangeIndex(events.ranges, GATHER_RANGES)
    logits_idx = RangeIndex(events.ranges, LOGITS_RANGES)
    name_cat = [[name_category(n, k) for k in range(3)] for n in events.names]
    num_gpu = len(events.gpu_ts)
    step_of = np.searchsorted(np.asarray(starts), events.launch_ts, side="right") - 1
    cats = np.empty(num_gpu, dtype=object)
    lm_head = np.zeros(num_gpu, dtype=bool)
    for i in range(num_gpu):
        t = events.launch_ts[i]
        if sample_idx.holds(t):
            cats[i] = "sampling"
        elif gather_idx.holds(t):
            cats[i] = "prefill_kv_gather"
        else:
            cats[i] = name_cat[events.gpu_name[i]][events.gpu_kind[i]]
            lm_head[i] = cats[i] == "gemm" and logits_idx.holds(t)
    ends = events.gpu_ts + events.gpu_dur
    graphs_of = np.bincount(np.searchsorted(np.asarray(starts), events.graph_launch_ts, side="right") - 1 + 1,
                            minlength=len(steps) + 1)[1:]
    kernel_names: dict[str, dict[str, float]] = {c: {} for c in CATEGORIES}
    for j, s in enumerate(steps):
        sel = np.nonzero(step_of == j)[0]
        s["gpu_events"] = len(sel)
        s["graph_launches"] = int(graphs_of[j])
        s["first_gpu_ts"] = float(events.gpu_ts[sel].min()) if len(sel) else None
        s["last_gpu_end"] = float(ends[sel].max()) if len(sel) else None
        s["busy_ms"] = union_length(events.gpu_ts[sel], ends[sel]) / 1e3
        s["cat_ms"] = {c: 0.0 for c in CATEGORIES}
        for i in sel:
            c = cats[i]
            s["cat_ms"][c] += events.gpu_dur[i] / 1e3
            name = events.names[events.gpu_name[i]]
            kernel_names[c][name] = kernel_names[c].get(name, 0.0) + events.gpu_dur[i] / 1e3
        s["lm_head_ms"] = float(events.gpu_dur[sel][lm_head[sel]].sum()) / 1e3
        s["attention_kernels"] = {}
        for i in sel:
            if cats[i] == "attention":
                short = _short(events.names[events.gpu_name[i]])
                kernels = s["attention_kernels"]
                kernels[short] = kernels.get(short, 0.0) + events.gpu_dur[i] / 1e3
    live = [s for s in steps if s["first_gpu_ts"] is not None]
    for a, b in itertools.pairwise(live):
        a["period_ms"] = (b["first_gpu_ts"] - a["first_gpu_ts"]) / 1e3
    if live:
        live[-1]["period_ms"] = (live[-1]["last_gpu_end"] - live[-1]["first_gpu_ts"]) / 1e3
    for s in steps:
        s.setdefault("period_ms", 0.0)
        s["idle_ms"] = max(s["period_ms"] - s["busy_ms"], 0.0)
        s["sum_kernel_ms"] = sum(s["cat_ms"].values())
    top = {c: sorted(((round(v, 3), _short(k)) for k, v in d.items()), reverse=True)[:8]
           for c, d in kernel_names.items()}
    return {"system": system, "steps": live, "summary": summarize(live), "top_kernels_ms": top,
            "sampling_rule": sampling_rule,
            "trace_counts": events.counts,
            "unassigned_gpu_events": int((step_of < 0).sum())}


def _short(name: str, width: int = 110) -> str:
    return name if len(name) <= width else name[:width] + "..."


def aggregate(steps: list[dict]) -> dict:
    """Totals and per-step means of a set of steps."""
    n = len(steps)
    if not n:
        return {"steps": 0}
    keys = ("period_ms", "busy_ms", "idle_ms", "host_ms", "lm_head_ms")
    total = {k: sum(s[k] for s in steps) for k in keys}
    cat = {c: sum(s["cat_ms"][c] for s in steps) for c in CATEGORIES}
    return {"steps": n, "seqs_mean": sum(s["seqs"] for s in steps) / n,
            "prompt_tokens": sum(s["prompt_tokens"] for s in steps),
            "decode_tokens": sum(s["decode_seqs"] for s in steps),
            "graph_launches_per_step": sum(s.get("graph_launches", 0) for s in steps) / n,
            "steps_with_graph_launch": sum(1 for s in steps if s.get("graph_launches", 0)) / n,
            "gpu_events_per_step": sum(s.get("gpu_events", 0) for s in steps) / n,
            "total_ms": {**total, **cat},
            "per_step_ms": {k: v / n for k, v in {**total, **cat}.items()}}


def summarize(steps: list[dict]) -> dict:
    out = {"all": aggregate(steps)}
    for kind in ("decode", "mixed", "prefill"):
        out[kind] = aggregate([s for s in steps if s["kind"] == kind])
    for lo, hi in DECODE_BUCKETS:
        for kind in ("decode", "mixed"):
            out[f"{kind}_{lo}_{hi - 1}"] = aggregate([s for s in steps
                                                      if s["kind"] == kind and lo <= s["seqs"] < hi])
    out["decode_256_512"] = aggregate([s for s in steps if s["kind"] == "decode" and 256 <= s["seqs"] <= 512])
    out["mixed_256_512"] = aggregate([s for s in steps if s["kind"] == "mixed" and 256 <= s["seqs"] <= 512])
    wall = out["all"]["total_ms"]["period_ms"] if steps else 0.0
    out["wall_share"] = {k: (out[k]["total_ms"]["period_ms"] / wall if wall and out[k]["steps"] else 0.0)
                         for k in ("decode", "mixed", "prefill")}
    return out


def ps_composition(path: Path | None) -> dict[int, dict[str, Any]]:
    """The profiled stream's step records of pagedserve_steps.json, by step id."""
    if path is None or not path.exists():
        return {}
    steps = json.loads(path.read_text())["steps"]
    return {s["step_id"]: s for s in steps if s.get("profiled")}


def ps_host_summary(path: Path | None) -> dict:
    """Host timing of every stream's steps (the unprofiled run's too), by kind and batch."""
    if path is None or not path.exists():
        return {}
    steps = json.loads(path.read_text())["steps"]
    out: dict[str, Any] = {}
    for stream in sorted({s.get("stream", 0) for s in steps}):
        mine = [s for s in steps if s.get("stream", 0) == stream and s.get("seqs")]
        if len(mine) < 50:
            continue                     # the warm-up's scheduler
        for a, b in itertools.pairwise(mine):
            a["cycle_s"] = b["t_start"] - a["t_start"]
        groups: dict[str, list[dict]] = {}
        for s in mine[:-1]:
            kind = ("decode" if not s.get("prompt_tokens") else
                    "mixed" if s["seqs"] > s["prompt_seqs"] else "prefill")
            groups.setdefault(kind, []).append(s)
            if kind == "decode" and 256 <= s["seqs"] <= 512:
                groups.setdefault("decode_256_512", []).append(s)
        keys = ("cycle_s", "host_s", "wait_s", "decode_plan_s", "prepare_s", "graph_run_s", "logits_s",
                "sample_s", "encode_s", "kv_gather_s", "execute_s")
        summary = {}
        for kind, group in groups.items():
            summary[kind] = {"steps": len(group), "seqs_mean": sum(s["seqs"] for s in group) / len(group),
                             "total_cycle_s": sum(s.get("cycle_s", 0.0) for s in group),
                             **{k[:-2] + "_ms": 1e3 * sum((s.get(k) or 0.0) for s in group) / len(group)
                                for k in keys}}
        out[f"stream_{stream}"] = {"profiled": any(s.get("profiled") for s in mine), "steps": len(mine),
                                   "span_s": mine[-1]["t_end"] - mine[0]["t_start"], "by_kind": summary}
    return out


def write_excerpt(raw: list[dict[str, Any]], steps: list[dict], path: Path, picks: int = 3) -> None:
    """A small Chrome trace: a few decode steps at 256+ sequences and a few mixed steps."""
    chosen = []
    for kind in ("decode", "mixed"):
        pool = ([s for s in steps if s["kind"] == kind and s["seqs"] >= 256]
                or [s for s in steps if s["kind"] == kind])
        if pool:
            mid = len(pool) // 2
            chosen += pool[mid:mid + picks]
    windows = [(s["host_ts"] - 50.0, s["first_gpu_ts"] + s["period_ms"] * 1e3 + 50.0) for s in chosen]
    keep = [e for e in raw
            if e.get("ph") == "M" or any(lo <= float(e.get("ts", -1)) <= hi for lo, hi in windows)]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": keep}, f)


def table(results: dict[str, dict]) -> str:
    """Side-by-side markdown: whole run and decode steps at 256-512 sequences, both systems."""
    systems = [s for s in ("pagedserve", "vllm") if s in results]
    rows = []
    header = "| | " + " | ".join(f"{s} whole run (s)" for s in systems) + " | " + \
             " | ".join(f"{s} decode 256-512 (ms/step)" for s in systems) + " |"
    rows.append(header)
    rows.append("|---" * (1 + 2 * len(systems)) + "|")
    lines = [("steps", "steps"), ("mean sequences", "seqs_mean")] + \
            [(c, c) for c in CATEGORIES] + [("GPU busy", "busy_ms"), ("GPU idle", "idle_ms"),
                                            ("wall (GPU timeline)", "period_ms")]
    for label, key in lines:
        cells = []
        for part in ("all", "decode_256_512"):
            for s in systems:
                agg = results[s]["summary"][part]
                if not agg.get("steps"):
                    cells.append("-")
                elif key in ("steps", "seqs_mean"):
                    cells.append(f"{agg[key]:.0f}")
                elif part == "all":
                    cells.append(f"{agg['total_ms'][key] / 1e3:.2f}")
                else:
                    cells.append(f"{agg['per_step_ms'][key]:.2f}")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    for s in systems:
        share = results[s]["summary"]["wall_share"]
        rows.append(f"\n{s}: wall share decode {share['decode']:.1%}, mixed {share['mixed']:.1%}, "
                    f"prefill-only {share['prefill']:.1%}")
    return "\n".join(rows)


STEP_COLUMNS = ("system", "index", "step_id", "kind", "seqs", "prompt_seqs", "prompt_tokens", "decode_seqs",
                "graph_launches", "gpu_events", "period_ms", "busy_ms", "idle_ms", *CATEGORIES, "lm_head_ms",
                "host_ms")
HOST_COLUMNS = ("stream", "profiled", "step_id", "seqs", "prompt_seqs", "prompt_tokens", "tokens",
                "context_tokens", "graph", "cycle_ms", "wait_ms", "host_ms", "decode_plan_ms", "execute_ms",
                "prepare_ms", "graph_run_ms", "logits_ms", "sample_ms", "kv_gather_ms", "encode_ms")


def write_steps_csv(results: dict[str, dict], path: Path) -> None:
    """Every step of both systems, one row each (gzip'd CSV)."""
    import csv
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(STEP_COLUMNS)
        for system in ("pagedserve", "vllm"):
            for i, st in enumerate(results.get(system, {}).get("steps", [])):
                row = {**st, **st["cat_ms"], "system": system, "index": i}
                w.writerow([_cell(row.get(c, "")) for c in STEP_COLUMNS])


def write_host_csv(steps_path: Path, path: Path) -> None:
    """The executor's host timing of every step of every stream (gzip'd CSV)."""
    import csv
    steps = json.loads(steps_path.read_text())["steps"]
    for a, b in itertools.pairwise(steps):
        if a.get("stream") == b.get("stream"):
            a["cycle_s"] = b["t_start"] - a["t_start"]
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(HOST_COLUMNS)
        for st in steps:
            row = {k[:-2] + "_ms": (v * 1e3 if isinstance(v, float) else v) for k, v in st.items()
                   if k.endswith("_s")}
            w.writerow([_cell(row.get(c, st.get(c, ""))) for c in HOST_COLUMNS])


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return ""
    return value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pagedserve", type=Path, help="PagedServe's trace (.json, .json.gz or slim .npz)")
    p.add_argument("--pagedserve-steps", type=Path, help="pagedserve_steps.json (the executor's step log)")
    p.add_argument("--vllm", type=Path, help="vLLM's trace (.json, .json.gz or slim .npz)")
    p.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier --out files to merge in")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slim-dir", type=Path, help="write <system>_slim.npz here")
    p.add_argument("--excerpt-dir", type=Path, help="write <system>_excerpt.json.gz here")
    p.add_argument("--no-steps", action="store_true", help="leave the per-step records out of --out")
    p.add_argument("--steps-csv", type=Path, help="also write every step of both systems here (.csv.gz)")
    p.add_argument("--host-csv", type=Path, help="also write the executor's step log here (.csv.gz)")
    args = p.parse_args()
    results: dict[str, dict] = {}
    for path in args.merge:
        if path.exists():
            results.update(json.loads(path.read_text()))
    for system, path in (("pagedserve", args.pagedserve), ("vllm", args.vllm)):
        if path is None:
            continue
        if not path.exists():
            print(f"[analyze] {system}: no trace at {path}", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        raw = None
        try:
            events, raw = load(path)
            if args.slim_dir is not None and raw is not None:
                args.slim_dir.mkdir(parents=True, exist_ok=True)
                save_slim(events, args.slim_dir / f"{system}_slim.npz")
            composition = ps_composition(args.pagedserve_steps) if system == "pagedserve" else None
            result = analyze(events, system, composition)
            if args.excerpt_dir is not None and raw is not None:
                args.excerpt_dir.mkdir(parents=True, exist_ok=True)
                write_excerpt(raw, result["steps"], args.excerpt_dir / f"{system}_excerpt.json.gz")
        except BaseException as err:                 # the other system's analysis still runs
            import traceback
            traceback.print_exc()
            print(f"[analyze] {system}: failed: {err!r}", file=sys.stderr)
            continue
        del raw
        result["analysis_s"] = time.perf_counter() - t0
        results[system] = result
        print(f"[analyze] {system}: {len(result.get('steps', []))} steps in {result['analysis_s']:.1f} s",
              file=sys.stderr)
    if args.pagedserve_steps is not None:
        results["pagedserve_host"] = ps_host_summary(args.pagedserve_steps)
        if args.host_csv is not None:
            write_host_csv(args.pagedserve_steps, args.host_csv)
    if args.steps_csv is not None:
        write_steps_csv(results, args.steps_csv)
    if args.no_steps:
        for system in ("pagedserve", "vllm"):
            results.get(system, {}).pop("steps", None)
    args.out.write_text(json.dumps(results, indent=1))
    if any(s in results for s in ("pagedserve", "vllm")):
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
