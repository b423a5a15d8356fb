"""Our paged decode kernel against torch SDPA on contiguous K/V, on a CUDA GPU (issue 5).

For every shape it times, in microseconds per call:

- ours: `ops.paged_attention_decode` over shuffled block tables, with the kernel's split-K heuristic
  (auto), never split (partition_mode 0) and always split (1);
- SDPA: `torch.nn.functional.scaled_dot_product_attention` on contiguous K/V [B, Hkv, L, D] of the same
  values, every backend (flash, efficient, cudnn, math) and every way of expressing GQA (enable_gqa,
  the query heads of a group packed into query rows, K/V heads expanded), keeping the fastest;
- gather+SDPA: the paged cache gathered through the block tables into K/V, then SDPA, timed together;

then the achieved bandwidth (K+V bytes read / time) as a fraction of a device-to-device copy's. A
block-size sweep, a split-K table (which partition mode wins where) and a prefill-over-paged-context
comparison of `ops.paged_attention` with `executor_svc.flash_prefill` follow. Raw figures go to JSON,
tables to markdown (and stdout as rows finish), bandwidth curves to a plot.

    PYTHONPATH=$PWD:$PWD/protos python benchmarks/paged_attention_bench.py \\
        --out-json pa.json --out-md pa.md --plot pa.png
    PYTHONPATH=$PWD:$PWD/protos python benchmarks/paged_attention_bench.py --quick
    python benchmarks/paged_attention_bench.py --plan-only          # the cases, no GPU needed
    python benchmarks/paged_attention_bench.py --from-json pa.json --out-md pa.md   # re-render

Timing: each call cycles over independent input sets (block tables into one large cache, queries,
outputs) whose total size is at least --rotate-mib, so L2 does not serve repeated reads; the calls of a
trial are queued behind a GPU sleep and run back to back, so CUDA events time the GPU, not Python;
the figure is the median over trials of the mean time per call.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The repository and its generated API package (protos/pagedserve), for runs without an install.
for _path in (str(REPO / "protos"), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

from clients.tables import markdown_table  # noqa: E402

GIB = 2**30
MIB = 2**20
# Layout name -> (query heads, kv heads).
LAYOUTS: dict[str, tuple[int, int]] = {"mha": (32, 32), "gqa4": (32, 8), "gqa8": (32, 4)}
LAYOUT_LABELS = {"mha": "MHA 32/32", "gqa4": "GQA 4:1 32/8", "gqa8": "GQA 8:1 32/4"}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
OURS_MODES = (("auto", -1), ("nosplit", 0), ("split", 1))
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
BYTES_COUNTED = ("K+V bytes read = batch x context x kv heads x head size x 2 (K and V) x element size; "
                 "query, output and block tables are not counted (query + output add heads / (kv heads x "
                 "context) to that: 6% at GQA 8:1 and context 128, under 1% from context 1024)")

FULL = {"layouts": "mha,gqa4,gqa8", "batches": "1,8,32,64,128,256",
        "contexts": "128,512,1024,2048,4096,8192,16384", "block_sweep": "8,16,32,64,128",
        "block_points": "32x2048,64x4096,128x1024", "prefill_layouts": "mha,gqa4",
        "prefill_contexts": "0,512,2048", "prefill_chunks": "16,128,512,2048", "prefill_batches": "1,4,16"}
QUICK = {"layouts": "mha,gqa8", "batches": "1,32", "contexts": "512,2048", "block_sweep": "16,64",
         "block_points": "32x2048", "prefill_layouts": "mha", "prefill_contexts": "0,512",
         "prefill_chunks": "128", "prefill_batches": "1,4"}


# ---------------------------------------------------------------------------------------------------
# The plan: cases, memory, bytes (pure Python, tested on the CPU).

@dataclass(frozen=True, slots=True)
class DecodeCase:
    """One decode shape: `batch` sequences of `context` tokens (the new one included), one query each."""

    layout: str
    batch: int
    context: int
    block_size: int
    with_sdpa: bool = True      # False: contiguous SDPA is independent of the block size, measured elsewhere

    @property
    def total_len(self) -> int:
        """Tokens of K/V each sequence holds in the cache."""
        return self.context


@dataclass(frozen=True, slots=True)
class PrefillCase:
    """`batch` sequences with `context` cached tokens each computing a new chunk of `chunk` tokens."""

    layout: str
    batch: int
    context: int
    chunk: int
    block_size: int

    @property
    def total_len(self) -> int:
        """Tokens of K/V each sequence holds in the cache (the chunk's own K/V included)."""
        return self.context + self.chunk


def parse_int_list(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    return [int(v) for v in text.split(",") if v.strip()]


def parse_points(text: str) -> list[tuple[int, int]]:
    """'32x2048,64x4096' -> [(32, 2048), (64, 4096)]: (batch, context) points of the block-size sweep."""
    points = []
    for item in filter(None, (v.strip() for v in text.split(","))):
        batch, _, context = item.partition("x")
        points.append((int(batch), int(context)))
    return points


def parse_layouts(text: str) -> list[str]:
    """'mha,gqa8' -> ['mha', 'gqa8'], rejecting unknown names."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layout {unknown}; choose from {', '.join(LAYOUTS)}")
    return names


def kv_read_bytes(batch: int, context: int, num_kv_heads: int, head_size: int, elem_size: int) -> int:
    """K and V bytes one layer's attention reads for `batch` sequences of `context` tokens."""
    return batch * context * num_kv_heads * head_size * 2 * elem_size


def cache_bytes(batch: int, total_len: int, num_kv_heads: int, head_size: int, block_size: int,
                elem_size: int, num_layers: int = 1) -> int:
    """Bytes of the paged cache holding `batch` sequences of `total_len` tokens (whole blocks, all layers)."""
    blocks = batch * -(-total_len // block_size)
    return blocks * num_layers * 2 * num_kv_heads * block_size * head_size * elem_size


def case_cache_bytes(case: DecodeCase | PrefillCase, head_size: int, elem_size: int,
                     num_layers: int = 1) -> int:
    """Bytes of one input set's paged cache for this case."""
    return cache_bytes(case.batch, case.total_len, LAYOUTS[case.layout][1], head_size, case.block_size,
                       elem_size, num_layers)


def decode_grid(layouts: Sequence[str], batches: Sequence[int], contexts: Sequence[int], block_size: int,
                block_points: Sequence[tuple[int, int]], block_sizes: Sequence[int]) -> list[DecodeCase]:
    """The main sweep (every layout x batch x context at `block_size`), then the block-size sweep.

    A block-sweep case already in the main sweep is not repeated; one whose (layout, batch, context)
    is not in the main sweep measures SDPA itself, the others take SDPA from the main sweep.
    """
    cases = [DecodeCase(layout, b, c, block_size)
             for layout, b, c in itertools.product(layouts, batches, contexts)]
    seen = {(x.layout, x.batch, x.context, x.block_size) for x in cases}
    main_keys = {(x.layout, x.batch, x.context) for x in cases}
    for layout, (b, c), bs in itertools.product(layouts, block_points, block_sizes):
        if (layout, b, c, bs) in seen:
            continue
        seen.add((layout, b, c, bs))
        cases.append(DecodeCase(layout, b, c, bs, with_sdpa=(layout, b, c) not in main_keys))
        main_keys.add((layout, b, c))
    return cases


def prefill_grid(layouts: Sequence[str], contexts: Sequence[int], chunks: Sequence[int],
                 batches: Sequence[int], block_size: int) -> list[PrefillCase]:
    """Every layout x cached context x chunk x batch."""
    return [PrefillCase(layout, b, c, q, block_size)
            for layout, c, q, b in itertools.product(layouts, contexts, chunks, batches)]


def split_by_memory(cases: Iterable[DecodeCase | PrefillCase], cap_bytes: int, head_size: int,
                    elem_size: int, num_layers: int = 1) -> tuple[list, list[dict[str, Any]]]:
    """(cases whose cache fits in `cap_bytes`, a description of each case skipped and why)."""
    kept, skipped = [], []
    for case in cases:
        need = case_cache_bytes(case, head_size, elem_size, num_layers)
        if need <= cap_bytes:
            kept.append(case)
        else:
            skipped.append({"kind": type(case).__name__, **case_fields(case), "cache_bytes": need,
                            "reason": f"cache {need / GIB:.1f} GiB > cap {cap_bytes / GIB:.1f} GiB"})
    return kept, skipped


def case_fields(case: DecodeCase | PrefillCase) -> dict[str, Any]:
    """The case as a plain dict (for JSON rows)."""
    return {name: getattr(case, name) for name in case.__slots__}


def rotation_sets(set_bytes: int, target_bytes: int, max_sets: int) -> int:
    """How many independent input sets to cycle through so that together they span `target_bytes`."""
    return max(1, min(max_sets, -(-target_bytes // max(set_bytes, 1))))


def bandwidth_gbs(nbytes: float, micros: float | None) -> float | None:
    """GB/s (1e9 bytes per second) of moving `nbytes` in `micros` microseconds."""
    return None if not micros else nbytes / micros / 1e3


def prefill_flops(case: PrefillCase, num_heads: int, head_size: int) -> float:
    """Multiply-add FLOPs of causal attention (QK^T and PV) for the chunk's queries over their keys.

    Query j of the chunk sees context + j + 1 keys, so each sequence has
    chunk * context + chunk * (chunk + 1) / 2 (query, key) pairs, each 2 x 2 x head_size FLOPs per head.
    """
    pairs = case.chunk * case.context + case.chunk * (case.chunk + 1) / 2
    return 4.0 * head_size * num_heads * case.batch * pairs


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing."""
    return numerator / denominator if numerator and denominator else None


# ---------------------------------------------------------------------------------------------------
# Summaries of measured rows (pure Python, tested on the CPU).

def faster_mode_table(rows: Iterable[dict[str, Any]], tie: float = 0.03) -> list[dict[str, Any]]:
    """For every decode row timed in both partition modes: which mode is faster, and by how much.

    `split_speedup` = non-split time / split time (> 1: splitting pays); within `tie` of 1 counts as a
    tie. `auto_ok` says whether the heuristic (auto) ran within `tie` of the faster mode. `kv_work` =
    batch x kv heads, the unsplit grid size the kernel's heuristic compares with the SM count.
    """
    table = []
    for row in rows:
        nosplit, split = row.get("ours_nosplit_us"), row.get("ours_split_us")
        if not nosplit or not split:
            continue
        speedup = nosplit / split
        faster = "tie" if abs(speedup - 1) <= tie else ("split" if speedup > 1 else "nosplit")
        auto = row.get("ours_auto_us")
        table.append({"layout": row["layout"], "batch": row["batch"], "context": row["context"],
                      "block_size": row["block_size"], "kv_work": row["batch"] * LAYOUTS[row["layout"]][1],
                      "nosplit_us": nosplit, "split_us": split, "auto_us": auto,
                      "split_speedup": speedup, "faster": faster,
                      "auto_ok": None if not auto else auto <= min(nosplit, split) * (1 + tie)})
    return table


def split_threshold(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layout, block size, batch): the smallest context from which splitting never loses.

    `from_context` is None when the longest context measured still prefers not splitting.
    """
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for entry in table:
        groups.setdefault((entry["layout"], entry["block_size"], entry["batch"]), []).append(entry)
    out = []
    for (layout, block, batch), entries in groups.items():
        entries.sort(key=lambda e: e["context"])
        start = None
        for entry in reversed(entries):
            if entry["faster"] == "nosplit":
                break
            start = entry["context"]
        out.append({"layout": layout, "block_size": block, "batch": batch,
                    "kv_work": entries[0]["kv_work"], "from_context": start})
    return sorted(out, key=lambda t: (list(LAYOUTS).index(t["layout"]), t["block_size"], t["batch"]))


def split_k_matrix(table: Sequence[dict[str, Any]], layout: str,
                   block_size: int) -> tuple[list[str], list[list[object]]]:
    """A batch x context grid of `split_speedup` with the winner ('S' split, 'N' non-split, '=' tie)."""
    entries = [e for e in table if e["layout"] == layout and e["block_size"] == block_size]
    batches = sorted({e["batch"] for e in entries})
    contexts = sorted({e["context"] for e in entries})
    cell = {(e["batch"], e["context"]): e for e in entries}
    mark = {"split": "S", "nosplit": "N", "tie": "="}
    headers = ["batch", *(f"ctx {c}" for c in contexts)]
    rows: list[list[object]] = []
    for b in batches:
        rows.append([b, *(f"{cell[b, c]['split_speedup']:.2f} {mark[cell[b, c]['faster']]}"
                          if (b, c) in cell else "-" for c in contexts)])
    return headers, rows


def sdpa_order(row: dict[str, Any]) -> list[tuple[str, str]]:
    """The (backend, form) pairs a row timed SDPA with, fastest first."""
    timed = sorted(row.get("sdpa_all_us", {}).items(), key=lambda item: item[1])
    return [(name.split("/")[0], name.split("/")[1]) for name, _ in timed]


def sdpa_lookup(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, int, int], tuple[float, str]]:
    """(layout, batch, context) -> (fastest SDPA µs, its backend) over the rows that timed SDPA."""
    found = {}
    for row in rows:
        if row.get("sdpa_us"):
            found[(row["layout"], row["batch"], row["context"])] = (row["sdpa_us"], row["sdpa_backend"])
    return found


def decode_target_summary(rows: Sequence[dict[str, Any]], block_size: int = 16, min_batch: int = 32,
                          min_context: int = 1024, goal: float = 0.9) -> dict[str, Any]:
    """Ours (auto mode) speed relative to contiguous SDPA over batch >= min_batch and context >= min_context.

    speed ratio = SDPA µs / ours µs (1.0: as fast; the target is >= goal). `best_mode_*` use the faster
    of the two forced partition modes instead of auto (what a perfect heuristic would reach).
    """
    sdpa = sdpa_lookup(rows)
    ratios, best, worst = [], [], None
    for row in rows:
        if row["block_size"] != block_size or row["batch"] < min_batch or row["context"] < min_context:
            continue
        ref = sdpa.get((row["layout"], row["batch"], row["context"]))
        value = ratio(ref[0] if ref else None, row.get("ours_auto_us"))
        if value is None:
            continue
        ratios.append(value)
        modes = [t for t in (row.get("ours_nosplit_us"), row.get("ours_split_us")) if t]
        if modes:
            best.append(ref[0] / min(modes))
        if worst is None or value < worst["ratio"]:
            worst = {"layout": row["layout"], "batch": row["batch"], "context": row["context"],
                     "ratio": value}
    return {"block_size": block_size, "min_batch": min_batch, "min_context": min_context, "goal": goal,
            "count": len(ratios), "min": min(ratios, default=None),
            "median": statistics.median(ratios) if ratios else None,
            "below_goal": sum(r < goal for r in ratios), "worst": worst,
            "best_mode_min": min(best, default=None),
            "best_mode_median": statistics.median(best) if best else None,
            "met": bool(ratios) and min(ratios) >= goal}


def block_size_summary(rows: Sequence[dict[str, Any]], small: int = 16, large: int = 64,
                       limit: float = 1.10) -> dict[str, Any]:
    """Ours (auto) at block `small` against block `large` at the same (layout, batch, context).

    slowdown = time(small) / time(large); the target is <= `limit` everywhere.
    """
    times = {(r["layout"], r["batch"], r["context"], r["block_size"]): r.get("ours_auto_us") for r in rows}
    points = []
    for (layout, batch, context, block), t_small in times.items():
        t_large = times.get((layout, batch, context, large))
        if block != small or not t_small or not t_large:
            continue
        points.append({"layout": layout, "batch": batch, "context": context, "slowdown": t_small / t_large})
    slowdowns = [p["slowdown"] for p in points]
    return {"small": small, "large": large, "limit": limit, "points": points,
            "max": max(slowdowns, default=None),
            "median": statistics.median(slowdowns) if slowdowns else None,
            "met": bool(points) and max(slowdowns) <= limit}


def anchor_summary(rows: Sequence[dict[str, Any]], copy_gbs: float,
                   min_bytes: int = 256 * MIB) -> dict[str, Any]:
    """Median and max fraction of copy bandwidth of ours, SDPA and gather+SDPA over large shapes.

    Only rows reading at least `min_bytes` count: smaller ones measure latency more than bandwidth.
    """
    out: dict[str, Any] = {"min_bytes": min_bytes}
    for name, key in (("ours", "ours_auto_us"), ("sdpa", "sdpa_us"), ("gather_sdpa", "gather_sdpa_us")):
        fractions = [r["kv_bytes"] / r[key] / 1e3 / copy_gbs for r in rows
                     if r["kv_bytes"] >= min_bytes and r.get(key)]
        out[name] = {"count": len(fractions), "median": statistics.median(fractions) if fractions else None,
                     "max": max(fractions, default=None)}
    return out


def prefill_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How often ours beats the library kernel (with its gather) over the prefill rows timed by both."""
    both = [r for r in rows if r.get("ours_us") and r.get("library_us")]
    speedups = [r["library_us"] / r["ours_us"] for r in both]
    return {"count": len(both), "ours_faster": sum(s > 1 for s in speedups),
            "median_speedup": statistics.median(speedups) if speedups else None,
            "min_speedup": min(speedups, default=None), "max_speedup": max(speedups, default=None)}


# ---------------------------------------------------------------------------------------------------
# Markdown (pure Python, tested on the CPU).

class Fixed(float):
    """A float that markdown_table prints with `digits` decimals (it stays numeric: right-aligned)."""

    digits: int = 1

    def __new__(cls, value: float, digits: int = 1) -> Fixed:
        obj = super().__new__(cls, value)
        obj.digits = digits
        return obj

    def __format__(self, spec: str) -> str:
        return f"{float(self):.{self.digits}f}"


def _num(value: float | None, digits: int = 1) -> object:
    """A number for a table cell with `digits` decimals, or '-' when missing."""
    return "-" if value is None else Fixed(value, digits)


def _fraction(nbytes: int, micros: float | None, copy_gbs: float) -> object:
    gbs = bandwidth_gbs(nbytes, micros)
    return "-" if gbs is None else Fixed(gbs / copy_gbs, 3)


def decode_table(rows: Sequence[dict[str, Any]], copy_gbs: float) -> str:
    """The decode sweep: times, SDPA backend, speed ratio and bandwidth of each row."""
    sdpa = sdpa_lookup(rows)
    headers = ["kv layout", "batch", "ctx", "block", "ours µs", "non-split µs", "split µs", "SDPA µs",
               "SDPA backend", "gather+SDPA µs", "ours/SDPA speed", "ours GB/s", "ours x copy",
               "SDPA x copy", "gather x copy"]
    table = []
    for row in rows:
        ref_us, backend = sdpa.get((row["layout"], row["batch"], row["context"]), (None, "-"))
        table.append([LAYOUT_LABELS[row["layout"]], row["batch"], row["context"], row["block_size"],
                      _num(row.get("ours_auto_us")), _num(row.get("ours_nosplit_us")),
                      _num(row.get("ours_split_us")), _num(ref_us), backend,
                      _num(row.get("gather_sdpa_us")), _num(ratio(ref_us, row.get("ours_auto_us")), 3),
                      _num(bandwidth_gbs(row["kv_bytes"], row.get("ours_auto_us")), 0),
                      _fraction(row["kv_bytes"], row.get("ours_auto_us"), copy_gbs),
                      _fraction(row["kv_bytes"], ref_us, copy_gbs),
                      _fraction(row["kv_bytes"], row.get("gather_sdpa_us"), copy_gbs)])
    return markdown_table(headers, table)


def block_table(rows: Sequence[dict[str, Any]], copy_gbs: float, large: int = 64) -> str:
    """The block-size sweep: ours at each block size, relative to block `large` at the same shape."""
    times = {(r["layout"], r["batch"], r["context"], r["block_size"]): r.get("ours_auto_us") for r in rows}
    headers = ["kv layout", "batch", "ctx", "block", "ours µs", "non-split µs", "split µs", "gather+SDPA µs",
               f"time / block {large}", "ours GB/s", "ours x copy"]
    table = []
    for row in sorted(rows, key=lambda r: (list(LAYOUTS).index(r["layout"]), r["batch"], r["context"],
                                           r["block_size"])):
        t_large = times.get((row["layout"], row["batch"], row["context"], large))
        table.append([LAYOUT_LABELS[row["layout"]], row["batch"], row["context"], row["block_size"],
                      _num(row.get("ours_auto_us")), _num(row.get("ours_nosplit_us")),
                      _num(row.get("ours_split_us")), _num(row.get("gather_sdpa_us")),
                      _num(ratio(row.get("ours_auto_us"), t_large), 3),
                      _num(bandwidth_gbs(row["kv_bytes"], row.get("ours_auto_us")), 0),
                      _fraction(row["kv_bytes"], row.get("ours_auto_us"), copy_gbs)])
    return markdown_table(headers, table)


def prefill_table(rows: Sequence[dict[str, Any]]) -> str:
    """Prefill over a paged context: our kernel against the library kernel fed by a paged gather."""
    headers = ["kv layout", "batch", "cached ctx", "chunk", "ours µs", "library µs (with gather)", "faster",
               "library / ours", "ours TFLOP/s", "library TFLOP/s", "max abs diff"]
    table = []
    for row in rows:
        ours, lib = row.get("ours_us"), row.get("library_us")
        faster = "-" if not ours or not lib else ("ours" if ours <= lib else "library")
        table.append([LAYOUT_LABELS[row["layout"]], row["batch"], row["context"], row["chunk"], _num(ours),
                      _num(lib), faster, _num(ratio(lib, ours), 3),
                      _num(ratio(row["flops"] / 1e6, ours), 1), _num(ratio(row["flops"] / 1e6, lib), 1),
                      _num(row.get("max_abs_diff"), 4)])
    return markdown_table(headers, table)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(summary: dict[str, Any], count: int) -> str:
    if not count:
        return "**no shapes measured**"
    return "**met**" if summary["met"] else "**not met**"


def targets_markdown(report: dict[str, Any]) -> list[str]:
    """The issue's targets and the H200 anchors, one bullet each."""
    lines = []
    target = report.get("targets", {}).get("decode_vs_sdpa")
    if target:
        worst = target["worst"]
        where = (f" (worst: {LAYOUT_LABELS[worst['layout']]}, batch {worst['batch']}, ctx {worst['context']})"
                 if worst else "")
        lines.append(f"- Paged decode >= {target['goal']}x contiguous SDPA at batch >= {target['min_batch']} "
                     f"and context >= {target['min_context']} (block {target['block_size']}, auto mode): "
                     f"{_verdict(target, target['count'])}; speed ratio min {_fmt(target['min'])}, "
                     f"median {_fmt(target['median'])} over {target['count']} shapes, "
                     f"{target['below_goal']} below {target['goal']}{where}; with the faster forced mode "
                     f"min {_fmt(target['best_mode_min'])}, median {_fmt(target['best_mode_median'])}.")
    blocks = report.get("targets", {}).get("block_size")
    if blocks:
        lines.append(f"- Block {blocks['small']} within {round((blocks['limit'] - 1) * 100)}% of block "
                     f"{blocks['large']}: {_verdict(blocks, len(blocks['points']))}; time ratio "
                     f"max {_fmt(blocks['max'])}, median {_fmt(blocks['median'])} over "
                     f"{len(blocks['points'])} shapes.")
    anchors = report.get("targets", {}).get("anchors")
    if anchors:
        parts = [f"{name} median {_fmt(anchors[key]['median'])} / max {_fmt(anchors[key]['max'])}"
                 for name, key in (("ours", "ours"), ("SDPA", "sdpa"), ("gather+SDPA", "gather_sdpa"))]
        lines.append(f"- Fraction of copy bandwidth over shapes reading >= "
                     f"{anchors['min_bytes'] // MIB} MiB: "
                     + "; ".join(parts) + " (H200 anchors: SDPA 0.90-1.05, gather+SDPA 0.30).")
    prefill = report.get("targets", {}).get("prefill")
    if prefill and prefill["count"]:
        lines.append(f"- Prefill: ours faster in {prefill['ours_faster']} of {prefill['count']} shapes; "
                     f"library time / ours median {_fmt(prefill['median_speedup'])} "
                     f"(min {_fmt(prefill['min_speedup'])}, max {_fmt(prefill['max_speedup'])}).")
    return lines


def problems_markdown(report: dict[str, Any]) -> list[str]:
    """Errors and output mismatches recorded in the rows, one bullet each."""
    lines = []
    for section in ("decode", "prefill"):
        for row in report.get(section, []):
            chunk = f"chunk {row['chunk']} " if section == "prefill" else ""
            where = (f"{section} {LAYOUT_LABELS[row['layout']]} batch {row['batch']} ctx {row['context']} "
                     f"{chunk}block {row['block_size']}")
            for name, message in row.get("errors", {}).items():
                lines.append(f"- {where}: {name}: {message}")
            for name in row.get("mismatch", []):
                lines.append(f"- {where}: {name}: output differs from the reference beyond tolerance")
    return lines


def sdpa_unavailable_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many decode rows each SDPA backend/form could not run in, most frequent first."""
    counts: dict[str, int] = {}
    for row in rows:
        for name in row.get("sdpa_unavailable", {}):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def render_markdown(report: dict[str, Any]) -> str:
    """The whole markdown report from the JSON report."""
    config = report["config"]
    copy_gbs = report["copy_bandwidth_gbs"]
    decode = report.get("decode", [])
    main_rows = [r for r in decode if r["block_size"] == config["block_size"]]
    points = {tuple(p) for p in config["block_points"]}
    block_rows = [r for r in decode if (r["batch"], r["context"]) in points]
    out = [f"# Paged attention kernel benchmark: {report['device']['name']}", "",
           f"- Date: {report['date']}",
           f"- Device: {report['device']['name']} ({report['device']['sms']} SMs, "
           f"{report['device']['memory_gib']:.0f} GiB), torch {report['torch']} (CUDA {report['cuda']})",
           f"- Command: `{report['command']}`",
           f"- Copy bandwidth: {copy_gbs / 1e3:.2f} TB/s (read + write bytes of a "
           f"{config['copy_mib']} MiB device-to-device copy / time); `x copy` = achieved GB/s / this",
           f"- Shapes: {config['dtype']}, head size {config['head_size']}, 32 query heads; one layer of a "
           f"{config['num_layers']}-layer cache [blocks, layers, 2, Hkv, block, D]; shuffled block tables, "
           "random K/V; every sequence of a shape has the same context",
           f"- Bytes: {BYTES_COUNTED}",
           f"- Timing: median of {config['trials']} trials of back-to-back calls cycling over input sets "
           f"spanning >= {config['rotate_mib']} MiB (so L2 does not serve repeated reads); µs per call",
           "- SDPA: the fastest of every backend and GQA form that runs; backend/native = enable_gqa, "
           "/packed = a group's query heads as query rows of its kv head, /expanded = K/V heads repeated "
           "(not timed); gather+SDPA times the block-table gather too",
           "", "## Targets", "", *targets_markdown(report)]
    if main_rows:
        out += ["", f"## Decode (block {config['block_size']})", "", decode_table(main_rows, copy_gbs)]
    if block_rows:
        out += ["", "## Block size", "", block_table(block_rows, copy_gbs)]
    table = report.get("split_k", {}).get("modes", [])
    if table:
        out += ["", "## Split-K: non-split time / split time",
                "", "S: split faster, N: non-split faster, =: within 3%.",
                "kv work = batch x kv heads (the unsplit grid the heuristic compares with 3 x SMs).", ""]
        for layout in LAYOUTS:
            for block in sorted({e["block_size"] for e in table if e["layout"] == layout}):
                headers, rows = split_k_matrix(table, layout, block)
                out += [f"{LAYOUT_LABELS[layout]}, block {block}:", "", markdown_table(headers, rows), ""]
        thresholds = report["split_k"]["thresholds"]
        out += ["Context from which splitting never loses (`-`: not within the contexts measured):", "",
                markdown_table(["kv layout", "block", "batch", "kv work", "split from ctx"],
                               [[LAYOUT_LABELS[t["layout"]], t["block_size"], t["batch"], t["kv_work"],
                                 "-" if t["from_context"] is None else t["from_context"]]
                                for t in thresholds]), ""]
        misses = [e for e in table if e["auto_ok"] is False]
        out.append(f"The heuristic (auto) ran within 3% of the faster mode in "
                   f"{sum(1 for e in table if e['auto_ok'])} of {len(table)} shapes"
                   + (": misses at " + ", ".join(f"{e['layout']} b{e['batch']} ctx{e['context']} "
                                                 f"bs{e['block_size']}" for e in misses) if misses else "."))
    if report.get("prefill"):
        out += ["", "## Prefill over a paged context (block 16, auto mode)", "",
                "Library = `executor_svc.flash_prefill.paged_flash_attention`, its paged gather included; "
                "TFLOP/s counts causal QK^T and PV multiply-adds.", "", prefill_table(report["prefill"])]
    for note in report.get("notes", []):
        out += ["", f"Note: {note}"]
    if report.get("skipped"):
        out += ["", f"Skipped by the memory cap ({len(report['skipped'])}): "
                + ", ".join(f"{s['layout']} b{s['batch']} ctx{s['context']}"
                            + (f"+{s['chunk']}" if "chunk" in s else "") for s in report["skipped"])]
    unavailable = sdpa_unavailable_counts(decode)
    if unavailable:
        out += ["", "SDPA variants that did not run (shapes): "
                + ", ".join(f"{name} ({count})" for name, count in unavailable.items())
                + "; the reasons are in the JSON rows' `sdpa_unavailable`."]
    problems = problems_markdown(report)
    if problems:
        out += ["", "## Errors and mismatches", "", *problems]
    return "\n".join(out) + "\n"


def summarize(report: dict[str, Any], small: int = 16, large: int = 64) -> None:
    """Fill report['targets'] and report['split_k'] from the measured rows."""
    decode = report.get("decode", [])
    modes = faster_mode_table(decode)
    report["split_k"] = {"modes": modes, "thresholds": split_threshold(modes)}
    report["targets"] = {"decode_vs_sdpa": decode_target_summary(decode, report["config"]["block_size"]),
                         "block_size": block_size_summary(decode, small, large),
                         "anchors": anchor_summary(decode, report["copy_bandwidth_gbs"]),
                         "prefill": prefill_summary(report.get("prefill", []))}


def write_plot(report: dict[str, Any], path: Path) -> str | None:
    """Bandwidth against context, ours (solid) and SDPA (dashed) per batch, one panel per layout.

    Returns why no plot was written, or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    block = report["config"]["block_size"]
    rows = [r for r in report.get("decode", []) if r["block_size"] == block]
    layouts = [name for name in LAYOUTS if any(r["layout"] == name for r in rows)]
    if not layouts:
        return "no decode rows"
    sdpa = sdpa_lookup(report["decode"])
    fig, axes = plt.subplots(1, len(layouts), figsize=(5.5 * len(layouts), 4.5), sharey=True, squeeze=False)
    copy_tbs = report["copy_bandwidth_gbs"] / 1e3
    for ax, layout in zip(axes[0], layouts, strict=True):
        batches = sorted({r["batch"] for r in rows if r["layout"] == layout})
        for i, batch in enumerate(batches):
            mine = sorted((r for r in rows if r["layout"] == layout and r["batch"] == batch),
                          key=lambda r: r["context"])
            colour = f"C{i % 10}"
            xs = [r["context"] for r in mine]
            ours = [(bandwidth_gbs(r["kv_bytes"], r.get("ours_auto_us")) or math.nan) / 1e3 for r in mine]
            ref = [(bandwidth_gbs(r["kv_bytes"], sdpa.get((layout, batch, r["context"]), (None,))[0])
                    or math.nan) / 1e3 for r in mine]
            ax.plot(xs, ours, "-o", color=colour, label=f"ours b={batch}", markersize=3)
            ax.plot(xs, ref, "--", color=colour, label=f"SDPA b={batch}", alpha=0.7)
        ax.axhline(copy_tbs, color="black", linewidth=0.8, linestyle=":", label="copy")
        ax.set_xscale("log", base=2)
        contexts = sorted({r["context"] for r in rows if r["layout"] == layout})
        ax.set_xticks(contexts, [f"{c // 1024}k" if c >= 1024 else str(c) for c in contexts])
        ax.set_title(f"{LAYOUT_LABELS[layout]}, block {block}")
        ax.set_xlabel("context (tokens)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("K+V read bandwidth (TB/s)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"Paged decode vs contiguous SDPA, {report['device']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------
# Timing (CUDA).

class Timer:
    """GPU microseconds per call of callables run back to back, cycling over independent input sets.

    Each trial queues `calls` calls behind a GPU sleep that lasts longer than the CPU takes to queue
    them, so the GPU runs them without gaps and the events around them time the GPU alone.
    """

    def __init__(self, trials: int, trial_ms: float, max_calls: int) -> None:
        self.trials = trials
        self.trial_ms = trial_ms
        self.max_calls = max_calls
        self.cycles_per_us = self._calibrate_sleep()

    @staticmethod
    def _calibrate_sleep() -> float | None:
        """GPU clock cycles per microsecond of torch.cuda._sleep, or None where it is missing."""
        sleep = getattr(torch.cuda, "_sleep", None)
        if sleep is None:
            return None
        sleep(1000)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        start.record()
        sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / (start.elapsed_time(end) * 1e3)

    def _loop(self, call: Callable[[], object], calls: int, sleep_us: float) -> tuple[float, float]:
        """(GPU µs per call, CPU µs per call to queue it) of one trial."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if self.cycles_per_us:
            torch.cuda._sleep(int(sleep_us * self.cycles_per_us))
        start.record()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        cpu = time.perf_counter() - t0
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / calls, cpu * 1e6 / calls

    def measure(self, fns: Sequence[Callable[[], object]]) -> float:
        """Median over trials of the mean GPU µs per call.

        `fns` are the same operation on different input sets; the calls cycle through them.
        """
        nxt = itertools.cycle(fns).__next__

        def call() -> None:
            nxt()()

        for _ in range(min(len(fns), 2)):        # first use: lazy init, autotuning, allocator growth
            call()
        torch.cuda.synchronize()
        estimate, cpu = self._loop(call, 3, 1000.0)
        calls = max(1, min(self.max_calls, math.ceil(self.trial_ms * 1e3 / max(estimate, 1.0))))
        # The GPU drains the queue while the CPU fills it: the sleep need only cover the difference.
        sleep_us = 1.5 * calls * max(cpu - estimate, 0.0) + 50.0
        self._loop(call, calls, sleep_us)
        return statistics.median(self._loop(call, calls, sleep_us)[0] for _ in range(self.trials))


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """GB/s of a device-to-device copy: (read + write bytes) / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    micros = timer.measure([functools.partial(dst.copy_, src)])
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / micros / 1e3


# ---------------------------------------------------------------------------------------------------
# Inputs and the contenders (CUDA).

@dataclass
class Settings:
    """What every case shares."""

    dtype: torch.dtype
    head_size: int
    num_layers: int
    layer: int
    rotate_bytes: int
    max_sets: int
    math_max_bytes: int
    cap_bytes: int
    tolerance: float
    timer: Timer
    skip_gather: bool = False
    device: str = "cuda"
    sdpa_backends: tuple[str, ...] = SDPA_BACKENDS

    @property
    def elem_size(self) -> int:
        """Bytes per cache element."""
        return torch.finfo(self.dtype).bits // 8


def paged_inputs(settings: Settings, num_seqs: int, total_len: int, num_kv_heads: int,
                 block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random cache and one shuffled, non-contiguous block table per sequence, no block shared.

    returns kv_cache [num_seqs * nb, num_layers, 2, Hkv, B, D] and block_tables [num_seqs, nb] int32
    """
    blocks_per_seq = -(-total_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    kv_cache = torch.empty(num_blocks, settings.num_layers, 2, num_kv_heads, block_size, settings.head_size,
                           dtype=settings.dtype, device=settings.device).normal_()
    perm = torch.randperm(num_blocks, device=settings.device)
    return kv_cache, perm.to(torch.int32).view(num_seqs, blocks_per_seq)


def contiguous_kv(kv_cache: torch.Tensor, layer: int, tables: torch.Tensor, context: int,
                  chunk_bytes: int = 512 * MIB) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V the block tables point at, copied to contiguous [N, Hkv, context, D] tensors.

    kv_cache: [num_blocks, num_layers, 2, Hkv, B, D]; tables: [N, nb] int32. Copies a few sequences at
    a time so the transient gather stays under `chunk_bytes`.
    """
    num_kv_heads, head_size = kv_cache.shape[3], kv_cache.shape[5]
    num_seqs, blocks_per_seq = tables.shape
    k = torch.empty(num_seqs, num_kv_heads, context, head_size, dtype=kv_cache.dtype, device=kv_cache.device)
    v = torch.empty_like(k)
    seq_bytes = blocks_per_seq * kv_cache[0, 0].numel() * kv_cache.element_size()
    step = max(1, chunk_bytes // max(seq_bytes, 1))
    for lo in range(0, num_seqs, step):
        hi = min(num_seqs, lo + step)
        kv = kv_cache[tables[lo:hi].long(), layer]               # [n, nb, 2, Hkv, B, D]
        kv = kv.permute(2, 0, 3, 1, 4, 5).flatten(3, 4)           # [2, n, Hkv, nb * B, D]
        k[lo:hi] = kv[0, :, :, :context]
        v[lo:hi] = kv[1, :, :, :context]
    return k, v


def gather_kv(layer_kv: torch.Tensor, table: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive paged gather: one index kernel, then views. returns k, v: [n, Hkv, context, D] (strided).

    layer_kv: kv_cache[:, layer].permute(1, 2, 0, 3, 4), [2, Hkv, num_blocks, B, D]; table: [n, nb] int64
    """
    kv = layer_kv[:, :, table]                                    # [2, Hkv, n, nb, B, D]
    kv = kv.permute(0, 2, 1, 3, 4, 5).flatten(3, 4)[:, :, :, :context]   # [2, n, Hkv, L, D]
    return kv[0], kv[1]


def sdpa_forms(num_heads: int, num_kv_heads: int) -> list[str]:
    """The ways of giving SDPA grouped K/V: native (enable_gqa), packed and expanded for GQA."""
    return ["native"] if num_heads == num_kv_heads else ["native", "packed", "expanded"]


def sdpa_decode(form: str, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                scale: float) -> torch.Tensor:
    """Decode attention through SDPA. query: [n, H, D]; k, v: [n, Hkv, L, D] ([n, H, L, D] if expanded).

    returns [n, H, D]
    """
    n, num_heads, head_size = query.shape
    num_kv_heads = k.shape[1]
    functional = torch.nn.functional
    if form == "packed":       # query heads h = kv * group + j become query rows j of kv head kv
        out = functional.scaled_dot_product_attention(
            query.view(n, num_kv_heads, num_heads // num_kv_heads, head_size), k, v, scale=scale)
    else:
        out = functional.scaled_dot_product_attention(query.unsqueeze(2), k, v, scale=scale,
                                                      enable_gqa=num_heads != num_kv_heads)
    return out.reshape(n, num_heads, head_size)


def sdpa_backend(name: str) -> Any:
    """The torch.nn.attention.SDPBackend of a backend name."""
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}"


def _try_once(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor | None, str | None]:
    """(fn's output, None), or (None, why it failed), with backend-selection warnings silenced."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return out, None
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return None, _short(exc)
    except Exception as exc:        # a contender that cannot run this shape: recorded, the run goes on
        return None, _short(exc)


def _compare(out: torch.Tensor, ref: torch.Tensor, tolerance: float) -> tuple[float, bool]:
    """(max |out - ref|, whether every element is within tolerance * (1 + |ref|)); NaN never is."""
    diff = (out.float() - ref.float()).abs()
    close = bool((diff <= tolerance * (1 + ref.float().abs())).all())
    return float(diff.max()), close


def _record_diffs(row: dict[str, Any], outputs: dict[str, torch.Tensor], reference: str | None,
                  tolerance: float) -> None:
    """Max |difference| of every output from `reference`'s, flagging those beyond `tolerance`."""
    if reference is None or reference not in outputs:
        return
    for name, out in outputs.items():
        if name != reference:
            row["max_abs_diff"][name], close = _compare(out, outputs[reference], tolerance)
            if not close:
                row["mismatch"].append(name)


def _set_slices(num_sets: int, batch: int) -> list[slice]:
    return [slice(i * batch, (i + 1) * batch) for i in range(num_sets)]


def time_sdpa(settings: Settings, row: dict[str, Any], outputs: dict[str, torch.Tensor],
              query: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, case: DecodeCase,
              sets: list[slice], scale: float) -> list[tuple[float, str, str]]:
    """Time SDPA on contiguous K/V in every backend and form; returns [(µs, backend, form)] fastest first.

    query: [N, H, D]; tables: [N, nb] int32 (N = sets x batch). Fills row['sdpa_*'].
    """
    num_heads, num_kv_heads = LAYOUTS[case.layout]
    group = num_heads // num_kv_heads
    k, v = contiguous_kv(kv_cache, settings.layer, tables, case.context)    # [N, Hkv, L, D]
    kv_total = 2 * k.numel() * k.element_size()
    timings: list[tuple[float, str, str]] = []
    for form in sdpa_forms(num_heads, num_kv_heads):
        if form == "expanded":
            if kv_total * group > settings.cap_bytes:
                row["sdpa_unavailable"]["*/expanded"] = "skipped: expanded K/V exceed the memory cap"
                continue
            k_use, v_use = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        else:
            k_use, v_use = k, v
        for backend in settings.sdpa_backends:
            name = f"{backend}/{form}"
            if backend == "math" and kv_total * (group if form == "native" else 1) > settings.math_max_bytes:
                continue
            fns = [functools.partial(sdpa_decode, form, query[s], k_use[s], v_use[s], scale) for s in sets]
            with sdpa_kernel_ctx(backend):
                out, error = _try_once(fns[0])
                if error:
                    row["sdpa_unavailable"][name] = error
                    continue
                micros = settings.timer.measure(fns)
            row["sdpa_all_us"][name] = micros
            outputs[f"sdpa {name}"] = out
            timings.append((micros, backend, form))
            del fns
        del k_use, v_use
    del k, v
    timings.sort()
    if timings:
        micros, backend, form = timings[0]
        row["sdpa_us"], row["sdpa_backend"] = micros, f"{backend}/{form}"
        outputs["sdpa"] = outputs.pop(f"sdpa {backend}/{form}")    # the reference the others must match
    else:
        row["errors"]["sdpa"] = "no SDPA backend ran (see sdpa_unavailable)"
    return timings


def sdpa_kernel_ctx(backend: str) -> Any:
    """A context manager restricting SDPA to one backend."""
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([sdpa_backend(backend)])


def time_gather_sdpa(settings: Settings, row: dict[str, Any], outputs: dict[str, torch.Tensor],
                     query: torch.Tensor, kv_cache: torch.Tensor, tables: torch.Tensor, case: DecodeCase,
                     sets: list[slice], scale: float, order: Sequence[tuple[str, str]]) -> None:
    """Time the naive gather-then-SDPA with the fastest SDPA backend that accepts gathered K/V.

    `order`: (backend, form) pairs to try, fastest first; without it every backend in every form.
    """
    layer_kv = kv_cache[:, settings.layer].permute(1, 2, 0, 3, 4)    # [2, Hkv, num_blocks, B, D]
    long_tables = tables.long()                                       # [N, nb]

    def gathered(form: str, s: slice) -> torch.Tensor:
        k, v = gather_kv(layer_kv, long_tables[s], case.context)
        return sdpa_decode(form, query[s], k, v, scale)

    num_heads, num_kv_heads = LAYOUTS[case.layout]
    candidates = ([(b, f) for b, f in order if f != "expanded"]
                  or [(b, f) for f in sdpa_forms(num_heads, num_kv_heads) if f != "expanded"
                      for b in settings.sdpa_backends])
    for backend, form in candidates:
        fns = [functools.partial(gathered, form, s) for s in sets]
        with sdpa_kernel_ctx(backend):
            out, error = _try_once(fns[0])
            if error:
                row["sdpa_unavailable"][f"gather+sdpa {backend}/{form}"] = error
                continue
            row["gather_sdpa_us"] = settings.timer.measure(fns)
        row["gather_sdpa_backend"] = f"{backend}/{form}"
        outputs["gather+sdpa"] = out
        return
    row["errors"]["gather+sdpa"] = "no SDPA backend ran on the gathered K/V (see sdpa_unavailable)"


def kernel_supports(ops: Any, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether ops accepts the shape (attention_supported, or decode_supported in older trees)."""
    check = getattr(ops, "attention_supported", None) or getattr(ops, "decode_supported", None)
    return check is None or bool(check(query, kv_cache))


def decode_row(case: DecodeCase, settings: Settings, num_sets: int) -> dict[str, Any]:
    """The JSON row of a decode case before measuring."""
    num_heads, num_kv_heads = LAYOUTS[case.layout]
    return {**case_fields(case), "num_heads": num_heads, "num_kv_heads": num_kv_heads,
            "head_size": settings.head_size, "dtype": str(settings.dtype).removeprefix("torch."),
            "kv_bytes": kv_read_bytes(case.batch, case.context, num_kv_heads, settings.head_size,
                                      settings.elem_size),
            "sets": num_sets, "ours_auto_us": None, "ours_nosplit_us": None, "ours_split_us": None,
            "sdpa_us": None, "sdpa_backend": None, "sdpa_all_us": {}, "gather_sdpa_us": None,
            "gather_sdpa_backend": None, "max_abs_diff": {}, "mismatch": [], "errors": {},
            "sdpa_unavailable": {}}


def run_decode_case(case: DecodeCase, settings: Settings,
                    sdpa_order: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """Time ours (three modes), SDPA on contiguous K/V and gather+SDPA for one decode shape.

    `sdpa_order`: (backend, form) pairs fastest first, from the row of the same shape that timed SDPA;
    gather+SDPA uses the first that runs when this case does not time SDPA itself.
    """
    from executor_svc import ops

    num_heads, num_kv_heads = LAYOUTS[case.layout]
    set_bytes = case_cache_bytes(case, settings.head_size, settings.elem_size, settings.num_layers)
    num_sets = rotation_sets(set_bytes, settings.rotate_bytes, settings.max_sets)
    row = decode_row(case, settings, num_sets)
    sets = _set_slices(num_sets, case.batch)
    kv_cache, tables = paged_inputs(settings, num_sets * case.batch, case.context, num_kv_heads,
                                    case.block_size)
    query = torch.empty(num_sets * case.batch, num_heads, settings.head_size, dtype=settings.dtype,
                        device=settings.device).normal_()              # [N, H, D]
    out = torch.empty_like(query)                                      # [N, H, D]
    seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32, device=settings.device)   # [batch]
    scale = settings.head_size**-0.5
    outputs: dict[str, torch.Tensor] = {}
    if not kernel_supports(ops, query, kv_cache):
        row["errors"]["ours"] = "ops.attention_supported() is False for this shape"
    else:
        for name, mode in OURS_MODES:
            fns = [functools.partial(ops.paged_attention_decode, out[s], query[s], kv_cache, settings.layer,
                                     tables[s], seq_lens, scale, case.context, mode) for s in sets]
            result, error = _try_once(fns[0])
            if error:
                row["errors"][f"ours {name}"] = error
                continue
            outputs[f"ours {name}"] = result.clone()
            row[f"ours_{name}_us"] = settings.timer.measure(fns)
    order = list(sdpa_order)
    if case.with_sdpa:
        order = [(b, f) for _, b, f in time_sdpa(settings, row, outputs, query, kv_cache, tables, case, sets,
                                                 scale)]
    if not settings.skip_gather:
        time_gather_sdpa(settings, row, outputs, query, kv_cache, tables, case, sets, scale, order)
    reference = "sdpa" if "sdpa" in outputs else ("gather+sdpa" if "gather+sdpa" in outputs else None)
    _record_diffs(row, outputs, reference, settings.tolerance)
    return row


# ---------------------------------------------------------------------------------------------------
# Prefill (CUDA).

def load_flash_prefill() -> tuple[Any, str | None]:
    """(executor_svc.flash_prefill, None) when usable, else (None, why not)."""
    try:
        from executor_svc import flash_prefill
    except ImportError as exc:
        return None, f"executor_svc.flash_prefill is not importable ({_short(exc)})"
    try:
        if not flash_prefill.flash_available("cuda"):
            return None, "flash_prefill.flash_available('cuda') is False"
    except Exception as exc:
        return None, f"flash_prefill.flash_available() raised {_short(exc)}"
    return flash_prefill, None


def run_prefill_case(case: PrefillCase, settings: Settings, flash: Any) -> dict[str, Any]:
    """Time ops.paged_attention against flash_prefill.paged_flash_attention (gather included)."""
    from executor_svc import ops
    from executor_svc.attention import AttentionMetadata

    num_heads, num_kv_heads = LAYOUTS[case.layout]
    tokens = case.batch * case.chunk
    set_bytes = (case_cache_bytes(case, settings.head_size, settings.elem_size, settings.num_layers)
                 + 2 * tokens * num_heads * settings.head_size * settings.elem_size)
    num_sets = rotation_sets(set_bytes, settings.rotate_bytes, min(settings.max_sets, 32))
    row: dict[str, Any] = {**case_fields(case), "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                           "head_size": settings.head_size, "sets": num_sets,
                           "flops": prefill_flops(case, num_heads, settings.head_size),
                           "ours_us": None, "library_us": None, "max_abs_diff": None, "mismatch": [],
                           "errors": {}}
    kv_cache, tables = paged_inputs(settings, num_sets * case.batch, case.total_len, num_kv_heads,
                                    case.block_size)
    query = torch.empty(num_sets, tokens, num_heads, settings.head_size, dtype=settings.dtype,
                        device=settings.device).normal_()               # [sets, T, H, D]
    out = torch.empty_like(query)
    scale = settings.head_size**-0.5
    metas = [AttentionMetadata.build([case.context] * case.batch, [case.chunk] * case.batch,
                                     tables[s].tolist(), case.block_size, settings.device)
             for s in _set_slices(num_sets, case.batch)]
    outputs: dict[str, torch.Tensor] = {}
    if not hasattr(ops, "paged_attention"):
        row["errors"]["ours"] = "ops.paged_attention does not exist yet"
    elif not kernel_supports(ops, query[0], kv_cache):
        row["errors"]["ours"] = "ops.attention_supported() is False for this shape"
    else:
        seq_lens = metas[0].seq_lens.to(torch.int32)                  # [batch], the same for every set
        starts = metas[0].query_start_loc.to(torch.int32)             # [batch + 1]
        fns = [functools.partial(ops.paged_attention, out[i], query[i], kv_cache, settings.layer,
                                 metas[i].block_tables, seq_lens, starts, scale, case.total_len, case.chunk,
                                 -1)
               for i in range(num_sets)]
        result, error = _try_once(fns[0])
        if error:
            row["errors"]["ours"] = error
        else:
            outputs["ours"] = result.clone()
            row["ours_us"] = settings.timer.measure(fns)
    if flash is not None:
        fns = [functools.partial(flash.paged_flash_attention, query[i], kv_cache, settings.layer, metas[i],
                                 scale)
               for i in range(num_sets)]
        result, error = _try_once(fns[0])
        if error:
            row["errors"]["library"] = error
        else:
            outputs["library"] = result
            row["library_us"] = settings.timer.measure(fns)
    if "ours" in outputs and "library" in outputs:
        row["max_abs_diff"], close = _compare(outputs["ours"], outputs["library"], settings.tolerance)
        if not close:
            row["mismatch"].append("ours vs library")
    return row


# ---------------------------------------------------------------------------------------------------
# The run.

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line flags; list flags take comma-separated values (defaults: the full run)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset for a smoke run (< 1 min)")
    parser.add_argument("--layouts", help=f"decode layouts, of {', '.join(LAYOUTS)} (default all)")
    parser.add_argument("--batches", help=f"decode batch sizes (default {FULL['batches']})")
    parser.add_argument("--contexts", help=f"decode contexts (default {FULL['contexts']})")
    parser.add_argument("--block-size", type=int, default=16, help="block size of the main decode sweep")
    parser.add_argument("--block-sweep", help=f"block sizes of the block sweep "
                                              f"(default {FULL['block_sweep']})")
    parser.add_argument("--block-points", help=f"batchxcontext points of the block sweep "
                                               f"(default {FULL['block_points']})")
    parser.add_argument("--prefill-layouts", help=f"prefill layouts (default {FULL['prefill_layouts']})")
    parser.add_argument("--prefill-contexts", help=f"cached contexts (default {FULL['prefill_contexts']})")
    parser.add_argument("--prefill-chunks", help=f"new-token chunks (default {FULL['prefill_chunks']})")
    parser.add_argument("--prefill-batches", help=f"prefill batch sizes (default {FULL['prefill_batches']})")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-block-sweep", action="store_true")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--skip-gather", action="store_true", help="do not time gather+SDPA")
    parser.add_argument("--sdpa-backends", default=",".join(SDPA_BACKENDS),
                        help="SDPA backends to try, of flash, efficient, cudnn, math")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=1,
                        help="layers in the cache (the middle one is read)")
    parser.add_argument("--mem-cap-gib", type=float, default=40.0,
                        help="largest paged cache of a case; the contiguous copy needs as much again "
                             "(lowered to 45%% of free GPU memory where that is less)")
    parser.add_argument("--rotate-mib", type=int, default=256, help="input sets cycled per shape span this")
    parser.add_argument("--max-sets", type=int, default=512)
    parser.add_argument("--trials", type=int, help="timed trials per measurement (default 7, quick 5)")
    parser.add_argument("--trial-ms", type=float, default=1.0, help="GPU time a trial aims for")
    parser.add_argument("--max-calls", type=int, default=100, help="most calls in one trial")
    parser.add_argument("--copy-mib", type=int, default=2048, help="size of the copy-bandwidth buffer")
    parser.add_argument("--math-max-mib", type=int, default=1024,
                        help="skip the math SDPA backend on K/V larger than this (it is never the fastest)")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="outputs must agree within tolerance * (1 + |reference|)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--out-md", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--plan-only", action="store_true", help="list the cases and exit (no GPU needed)")
    parser.add_argument("--from-json", type=Path, help="re-render --out-md/--plot from an earlier --out-json")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for name, default in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.trials is None:
        args.trials = 5 if args.quick else 7
    return args


@dataclass
class Plan:
    """The cases of a run, and the ones left out by the memory cap."""

    decode: list[DecodeCase]
    prefill: list[PrefillCase]
    skipped: list[dict[str, Any]]


def build_plan(args: argparse.Namespace, cap_bytes: int) -> Plan:
    """The decode and prefill cases the flags select that fit under `cap_bytes`."""
    elem_size = torch.finfo(DTYPES[args.dtype]).bits // 8
    decode: list = []
    if not args.skip_decode:
        decode = decode_grid(parse_layouts(args.layouts), parse_int_list(args.batches),
                             parse_int_list(args.contexts), args.block_size,
                             [] if args.skip_block_sweep else parse_points(args.block_points),
                             parse_int_list(args.block_sweep))
    prefill: list = []
    if not args.skip_prefill:
        prefill = prefill_grid(parse_layouts(args.prefill_layouts), parse_int_list(args.prefill_contexts),
                               parse_int_list(args.prefill_chunks), parse_int_list(args.prefill_batches), 16)
    decode, skipped = split_by_memory(decode, cap_bytes, args.head_size, elem_size, args.num_layers)
    prefill, skipped_prefill = split_by_memory(prefill, cap_bytes, args.head_size, elem_size, args.num_layers)
    return Plan(decode, prefill, skipped + skipped_prefill)


def describe_plan(plan: Plan, args: argparse.Namespace) -> str:
    """What a run will measure, for --plan-only and the start of a run."""
    elem_size = torch.finfo(DTYPES[args.dtype]).bits // 8
    total = sum(kv_read_bytes(c.batch, c.context, LAYOUTS[c.layout][1], args.head_size, elem_size)
                for c in plan.decode)
    lines = [f"decode cases: {len(plan.decode)} ({sum(c.with_sdpa for c in plan.decode)} with SDPA), "
             f"{total / 1e9:.0f} GB of K/V read per pass over them",
             f"prefill cases: {len(plan.prefill)}", f"skipped by the memory cap: {len(plan.skipped)}"]
    lines += [f"  {s['kind']} {s['layout']} batch {s['batch']} ctx {s['context']}: {s['reason']}"
              for s in plan.skipped]
    return "\n".join(lines)


def cuda_problem() -> str | None:
    """Why the benchmark cannot run here, or None (builds or loads our kernels)."""
    if not torch.cuda.is_available():
        return ("needs a CUDA GPU: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}); --plan-only lists the cases without one")
    from executor_svc import ops

    print("building or loading the CUDA kernels (about a minute on a fresh machine)", flush=True)
    if not ops.kernels_available():
        return "the PagedServe CUDA kernels did not build (see the log above); nothing to benchmark"
    return None


def device_info() -> dict[str, Any]:
    """Name, SM count, memory and L2 size of the current GPU."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / GIB,
            "l2_mib": getattr(props, "L2_cache_size", 0) / MIB, "capability": f"{props.major}.{props.minor}"}


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def decode_line(row: dict[str, Any], sdpa: dict[tuple[str, int, int], tuple[float, str]],
                copy_gbs: float) -> str:
    """One progress line of a finished decode row."""
    ref = sdpa.get((row["layout"], row["batch"], row["context"]))
    speed = ratio(ref[0] if ref else None, row["ours_auto_us"])
    gbs = bandwidth_gbs(row["kv_bytes"], row["ours_auto_us"])
    flags = (" MISMATCH " + ",".join(row["mismatch"])) if row["mismatch"] else ""
    return (f"{LAYOUT_LABELS[row['layout']]:<13} b={row['batch']:<4} ctx={row['context']:<6} "
            f"bs={row['block_size']:<4} ours {_us(row['ours_auto_us'])} µs "
            f"(nosplit {_us(row['ours_nosplit_us'])}, split {_us(row['ours_split_us'])}) | "
            f"SDPA {_us(ref[0] if ref else None)} ({ref[1] if ref else '-'}) | "
            f"gather {_us(row['gather_sdpa_us'])} | speed {_fmt(speed)} | "
            f"{_fmt(gbs and gbs / copy_gbs)} x copy{flags}")


def prefill_line(row: dict[str, Any]) -> str:
    """One progress line of a finished prefill row."""
    flags = " MISMATCH" if row["mismatch"] else ""
    return (f"{LAYOUT_LABELS[row['layout']]:<13} b={row['batch']:<3} ctx={row['context']:<5} "
            f"chunk={row['chunk']:<5} ours {_us(row['ours_us'])} µs | library {_us(row['library_us'])} µs | "
            f"library/ours {_fmt(ratio(row['library_us'], row['ours_us']))}{flags}")


def write_outputs(report: dict[str, Any], args: argparse.Namespace, plot: bool = True) -> None:
    """Summaries, then JSON, markdown and (with `plot`) the plot where asked for."""
    summarize(report)
    if args.out_json:
        args.out_json.write_text(json.dumps(report, indent=1) + "\n")
    if args.out_md:
        args.out_md.write_text(render_markdown(report))
    if args.plot and plot:
        reason = write_plot(report, args.plot)
        if reason:
            print(f"no plot: {reason}", file=sys.stderr)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure everything the flags select; returns the report (also written as it goes)."""
    torch.manual_seed(args.seed)
    free, _ = torch.cuda.mem_get_info()
    cap = min(int(args.mem_cap_gib * GIB), int(0.45 * free))
    plan = build_plan(args, cap)
    print(describe_plan(plan, args), flush=True)
    timer = Timer(args.trials, args.trial_ms, args.max_calls)
    settings = Settings(dtype=DTYPES[args.dtype], head_size=args.head_size, num_layers=args.num_layers,
                        layer=args.num_layers // 2, rotate_bytes=args.rotate_mib * MIB,
                        max_sets=args.max_sets,
                        math_max_bytes=args.math_max_mib * MIB, cap_bytes=cap, tolerance=args.tolerance,
                        timer=timer, skip_gather=args.skip_gather,
                        sdpa_backends=tuple(b for b in args.sdpa_backends.split(",") if b))
    report: dict[str, Any] = {
        "benchmark": "paged_attention",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]), "device": device_info(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "bytes_counted": BYTES_COUNTED,
        "config": {"dtype": args.dtype, "head_size": args.head_size, "num_layers": args.num_layers,
                   "block_size": args.block_size, "block_points": parse_points(args.block_points),
                   "block_sweep": parse_int_list(args.block_sweep), "trials": args.trials,
                   "trial_ms": args.trial_ms, "rotate_mib": args.rotate_mib, "copy_mib": args.copy_mib,
                   "cap_gib": cap / GIB, "sleep_cycles_per_us": timer.cycles_per_us, "args": {
                       k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}},
        "copy_bandwidth_gbs": copy_bandwidth(timer, args.copy_mib * MIB),
        "decode": [], "prefill": [], "skipped": plan.skipped, "notes": []}
    print(f"copy bandwidth: {report['copy_bandwidth_gbs'] / 1e3:.2f} TB/s (read + write)", flush=True)
    start = time.monotonic()
    total = len(plan.decode) + len(plan.prefill)
    orders: dict[tuple[str, int, int], list[tuple[str, str]]] = {}
    for i, case in enumerate(plan.decode, 1):
        key = (case.layout, case.batch, case.context)
        row = run_decode_case(case, settings, orders.get(key, ()))
        orders.setdefault(key, sdpa_order(row))
        report["decode"].append(row)
        torch.cuda.empty_cache()
        line = decode_line(row, sdpa_lookup(report["decode"]), report["copy_bandwidth_gbs"])
        print(f"[{i}/{total} {time.monotonic() - start:5.0f}s] {line}", flush=True)
        if i % 10 == 0:
            write_outputs(report, args, plot=False)     # what is done survives a run cut short
    if plan.decode:
        write_outputs(report, args, plot=False)      # the decode half is kept should prefill fail
    flash = None
    if plan.prefill:
        flash, why = load_flash_prefill()
        if why:
            report["notes"].append(f"prefill library rows skipped: {why}")
            print(f"note: {report['notes'][-1]}", flush=True)
    for i, case in enumerate(plan.prefill, len(plan.decode) + 1):
        row = run_prefill_case(case, settings, flash)
        report["prefill"].append(row)
        torch.cuda.empty_cache()
        print(f"[{i}/{total} {time.monotonic() - start:5.0f}s] {prefill_line(row)}", flush=True)
    report["seconds"] = time.monotonic() - start
    write_outputs(report, args)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or plan / re-render); print the tables."""
    args = parse_args(argv)
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        write_outputs(report, args)
        print(render_markdown(report))
        return 0
    if args.plan_only:
        print(describe_plan(build_plan(args, int(args.mem_cap_gib * GIB)), args))
        return 0
    problem = cuda_problem()
    if problem:
        print(f"paged_attention_bench: {problem}", file=sys.stderr)
        return 2
    report = run(args)
    print()
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
