"""The paged attention benchmark's plan, byte counting, summaries and report, on the CPU.

The GPU parts run on a CUDA machine; here their plumbing runs on CPU tensors with our kernels replaced
by the torch reference and a timer that calls each input set once.
"""

from __future__ import annotations

import itertools
import json
import types
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from benchmarks import paged_attention_bench as bench  # noqa: E402
from executor_svc import ops  # noqa: E402
from executor_svc.attention import AttentionMetadata, paged_attention_reference  # noqa: E402

GIB = 2**30


# --- the plan -------------------------------------------------------------------------------------

def test_decode_grid_main_sweep_then_new_block_sizes_only() -> None:
    cases = bench.decode_grid(["mha", "gqa8"], [1, 32], [128, 2048], 16, [(32, 2048)], [8, 16, 64])
    main = cases[:8]
    assert [(c.layout, c.batch, c.context) for c in main[:4]] == [
        ("mha", 1, 128), ("mha", 1, 2048), ("mha", 32, 128), ("mha", 32, 2048)]
    assert all(c.block_size == 16 and c.with_sdpa for c in main)
    extra = cases[8:]
    # Block 16 at (32, 2048) is already in the main sweep; SDPA comes from there.
    assert [(c.layout, c.block_size) for c in extra] == [
        ("mha", 8), ("mha", 64), ("gqa8", 8), ("gqa8", 64)]
    assert not any(c.with_sdpa for c in extra)
    assert len({(c.layout, c.batch, c.context, c.block_size) for c in cases}) == len(cases)


def test_block_point_outside_the_main_sweep_measures_sdpa_once() -> None:
    cases = bench.decode_grid(["gqa4"], [1], [128], 16, [(64, 4096)], [16, 32, 64])
    extra = [c for c in cases if c.batch == 64]
    assert [(c.block_size, c.with_sdpa) for c in extra] == [(16, True), (32, False), (64, False)]


def test_full_plan_sizes_and_memory_cap() -> None:
    plan = bench.build_plan(bench.parse_args([]), 40 * GIB)
    main = [c for c in plan.decode if c.block_size == 16]
    assert len(main) == 3 * 6 * 7 - 1
    assert len(plan.decode) - len(main) == 3 * 3 * 4        # three points x block sizes 8, 32, 64, 128
    assert len(plan.prefill) == 2 * 3 * 4 * 3
    assert [(s["layout"], s["batch"], s["context"]) for s in plan.skipped] == [("mha", 256, 16384)]
    assert "64.0 GiB > cap 40.0 GiB" in plan.skipped[0]["reason"]


def test_quick_plan_is_small() -> None:
    plan = bench.build_plan(bench.parse_args(["--quick"]), 40 * GIB)
    assert len(plan.decode) <= 12 and len(plan.prefill) <= 4
    args = bench.parse_args(["--quick", "--batches", "8", "--skip-prefill"])
    assert args.batches == "8" and args.trials == 5
    assert bench.build_plan(args, 40 * GIB).prefill == []


def test_filters_and_parsing() -> None:
    args = bench.parse_args(["--layouts", "gqa4", "--batches", "64", "--contexts", "1024,4096",
                             "--skip-block-sweep", "--skip-prefill"])
    plan = bench.build_plan(args, 40 * GIB)
    assert [(c.layout, c.batch, c.context, c.block_size) for c in plan.decode] == [
        ("gqa4", 64, 1024, 16), ("gqa4", 64, 4096, 16)]
    assert bench.parse_points("32x2048, 64x4096") == [(32, 2048), (64, 4096)]
    assert bench.parse_int_list("1,8,,32") == [1, 8, 32]
    with pytest.raises(Exception, match="unknown layout"):
        bench.parse_layouts("mha,mqa")


# --- bytes ----------------------------------------------------------------------------------------

def test_bytes_read_and_cache_bytes() -> None:
    # MHA, batch 256, context 16k: 256 * 16384 tokens * 32 heads * 128 * 2 (K, V) * 2 bytes = 64 GiB.
    assert bench.kv_read_bytes(256, 16384, 32, 128, 2) == 64 * GIB
    assert bench.kv_read_bytes(1, 1, 4, 128, 2) == 2048
    # The cache holds whole blocks: 100 tokens in blocks of 16 take 7 blocks (112 slots), per layer.
    assert bench.cache_bytes(2, 100, 8, 128, 16, 2) == 2 * 112 * 8 * 128 * 2 * 2
    one_layer = bench.cache_bytes(2, 100, 8, 128, 16, 2)
    assert bench.cache_bytes(2, 100, 8, 128, 16, 2, num_layers=3) == 3 * one_layer
    prefill = bench.PrefillCase("gqa4", 4, 512, 128, 16)
    assert bench.case_cache_bytes(prefill, 128, 2) == bench.cache_bytes(4, 640, 8, 128, 16, 2)


def test_split_by_memory_keeps_what_fits() -> None:
    cases = [bench.DecodeCase("mha", 1, 1024, 16), bench.DecodeCase("mha", 64, 1024, 16)]
    cap = bench.case_cache_bytes(cases[0], 128, 2)
    kept, skipped = bench.split_by_memory(cases, cap, 128, 2)
    assert kept == cases[:1]
    assert skipped[0]["batch"] == 64 and skipped[0]["cache_bytes"] == 64 * cap


def test_rotation_sets() -> None:
    assert bench.rotation_sets(GIB, 256 * 2**20, 512) == 1
    assert bench.rotation_sets(100 * 2**20, 256 * 2**20, 512) == 3
    assert bench.rotation_sets(1024, 256 * 2**20, 512) == 512
    assert bench.rotation_sets(0, 1, 4) == 1


def test_bandwidth_and_flops() -> None:
    assert bench.bandwidth_gbs(4e9, 1000.0) == pytest.approx(4000.0)       # 4 GB in 1 ms
    assert bench.bandwidth_gbs(1, None) is None
    case = bench.PrefillCase("mha", 2, 3, 4, 16)
    pairs = sum(3 + j + 1 for j in range(4))                              # query j sees 3 + j + 1 keys
    assert bench.prefill_flops(case, 32, 128) == 4 * 128 * 32 * 2 * pairs
    assert bench.ratio(2.0, 4.0) == 0.5 and bench.ratio(None, 1.0) is None


# --- summaries ------------------------------------------------------------------------------------

def decode_row(layout: str, batch: int, context: int, block: int = 16, auto: float | None = 100.0,
               nosplit: float | None = 100.0, split: float | None = 120.0, sdpa: float | None = 95.0,
               gather: float | None = 300.0) -> dict[str, Any]:
    """A measured decode row as run_decode_case writes it."""
    kv_heads = bench.LAYOUTS[layout][1]
    return {"layout": layout, "batch": batch, "context": context, "block_size": block, "with_sdpa": True,
            "num_heads": 32, "num_kv_heads": kv_heads, "head_size": 128, "dtype": "bfloat16",
            "kv_bytes": bench.kv_read_bytes(batch, context, kv_heads, 128, 2), "sets": 1,
            "ours_auto_us": auto, "ours_nosplit_us": nosplit, "ours_split_us": split, "sdpa_us": sdpa,
            "sdpa_backend": None if sdpa is None else "flash/native", "sdpa_all_us": {},
            "gather_sdpa_us": gather, "gather_sdpa_backend": "flash/native", "max_abs_diff": {},
            "mismatch": [], "errors": {}}


def test_sdpa_order_is_fastest_first() -> None:
    row = decode_row("gqa4", 1, 128)
    row["sdpa_all_us"] = {"flash/native": 9.0, "efficient/packed": 7.5, "cudnn/packed": 8.0}
    assert bench.sdpa_order(row) == [("efficient", "packed"), ("cudnn", "packed"), ("flash", "native")]


def test_faster_mode_table_and_threshold() -> None:
    rows = [decode_row("gqa8", 1, 512, nosplit=50.0, split=51.0),        # tie
            decode_row("gqa8", 1, 2048, auto=40.0, nosplit=80.0, split=40.0),
            decode_row("gqa8", 1, 8192, auto=150.0, nosplit=150.0, split=100.0),
            decode_row("gqa8", 64, 2048, nosplit=100.0, split=130.0),
            decode_row("gqa8", 64, 8192, nosplit=300.0, split=200.0),
            decode_row("mha", 8, 512, split=None)]                           # one mode missing: left out
    table = bench.faster_mode_table(rows)
    assert [e["faster"] for e in table] == ["tie", "split", "split", "nosplit", "split"]
    assert table[1]["split_speedup"] == pytest.approx(2.0)
    assert table[1]["auto_ok"] is True and table[2]["auto_ok"] is False
    assert table[3]["kv_work"] == 64 * 4
    thresholds = {(t["layout"], t["batch"]): t["from_context"] for t in bench.split_threshold(table)}
    assert thresholds == {("gqa8", 1): 512, ("gqa8", 64): 8192}
    headers, matrix = bench.split_k_matrix(table, "gqa8", 16)
    assert headers == ["batch", "ctx 512", "ctx 2048", "ctx 8192"]
    assert matrix == [[1, "0.98 =", "2.00 S", "1.50 S"], [64, "-", "0.77 N", "1.50 S"]]


def test_decode_target_summary_uses_big_shapes_and_sdpa_from_any_block() -> None:
    rows = [decode_row("mha", 8, 4096, auto=10.0, sdpa=100.0),              # batch < 32: not counted
            decode_row("mha", 32, 512, auto=10.0, sdpa=100.0),              # context < 1k: not counted
            decode_row("mha", 32, 2048, auto=100.0, sdpa=95.0),
            decode_row("gqa4", 64, 4096, auto=125.0, nosplit=100.0, split=130.0, sdpa=100.0),
            decode_row("gqa4", 64, 4096, block=64, auto=90.0, sdpa=None)]   # block 64: not counted
    summary = bench.decode_target_summary(rows)
    assert summary["count"] == 2
    assert summary["min"] == pytest.approx(0.8) and summary["below_goal"] == 1 and not summary["met"]
    assert summary["worst"] == {"layout": "gqa4", "batch": 64, "context": 4096, "ratio": pytest.approx(0.8)}
    assert summary["best_mode_min"] == pytest.approx(0.95)


def test_block_size_summary() -> None:
    rows = [decode_row("mha", 32, 2048, block=16, auto=105.0),
            decode_row("mha", 32, 2048, block=64, auto=100.0),
            decode_row("gqa8", 32, 2048, block=16, auto=120.0),
            decode_row("gqa8", 32, 2048, block=64, auto=100.0),
            decode_row("gqa4", 32, 2048, block=16, auto=120.0)]            # no block 64: left out
    summary = bench.block_size_summary(rows)
    assert len(summary["points"]) == 2
    assert summary["max"] == pytest.approx(1.2) and not summary["met"]
    assert bench.block_size_summary(rows[:2])["met"]


def test_anchor_summary_counts_large_shapes_only() -> None:
    big = decode_row("mha", 64, 4096, auto=100.0, sdpa=90.0, gather=300.0)       # 2 GiB read
    small = decode_row("mha", 1, 128, auto=1.0, sdpa=1.0, gather=1.0)
    copy_gbs = big["kv_bytes"] / 90.0 / 1e3                                   # SDPA at exactly copy speed
    anchors = bench.anchor_summary([big, small], copy_gbs)
    assert anchors["sdpa"]["count"] == 1 and anchors["sdpa"]["median"] == pytest.approx(1.0)
    assert anchors["ours"]["median"] == pytest.approx(0.9)
    assert anchors["gather_sdpa"]["median"] == pytest.approx(0.3)


def prefill_row(ours: float | None, library: float | None) -> dict[str, Any]:
    case = bench.PrefillCase("mha", 4, 512, 128, 16)
    return {**bench.case_fields(case), "num_heads": 32, "num_kv_heads": 32, "head_size": 128, "sets": 1,
            "flops": bench.prefill_flops(case, 32, 128), "ours_us": ours, "library_us": library,
            "max_abs_diff": 0.001, "mismatch": [], "errors": {}}


def test_prefill_summary() -> None:
    summary = bench.prefill_summary([prefill_row(100.0, 150.0), prefill_row(100.0, 50.0),
                                     prefill_row(100.0, None)])
    assert summary["count"] == 2 and summary["ours_faster"] == 1
    assert summary["median_speedup"] == pytest.approx(1.0)


# --- the report -----------------------------------------------------------------------------------

def sample_report() -> dict[str, Any]:
    rows = [decode_row("mha", 32, 2048, auto=100.0, sdpa=95.0),
            decode_row("mha", 32, 2048, block=64, auto=98.0, sdpa=None, gather=400.0),
            decode_row("gqa8", 64, 4096, auto=50.0, nosplit=50.0, split=70.0, sdpa=49.0)]
    rows[2]["mismatch"] = ["ours split"]
    rows[2]["errors"] = {"sdpa efficient/native": "RuntimeError: No available kernel."}
    report = {"benchmark": "paged_attention", "date": "2026-11-23T10:00:00+00:00",
              "command": "python benchmarks/paged_attention_bench.py --quick",
              "device": {"name": "NVIDIA H200", "sms": 132, "memory_gib": 139.8, "l2_mib": 60.0,
                         "capability": "9.0"},
              "torch": "2.11.0", "cuda": "13.0", "bytes_counted": bench.BYTES_COUNTED,
              "config": {"dtype": "bfloat16", "head_size": 128, "num_layers": 1, "block_size": 16,
                         "block_points": [[32, 2048]], "block_sweep": [16, 64], "trials": 7, "trial_ms": 1.0,
                         "rotate_mib": 256, "copy_mib": 2048, "cap_gib": 40.0},
              "copy_bandwidth_gbs": 4270.0, "decode": rows, "prefill": [prefill_row(100.0, 150.0)],
              "skipped": [{"kind": "DecodeCase", "layout": "mha", "batch": 256, "context": 16384,
                           "block_size": 16, "cache_bytes": 64 * GIB, "reason": "cache too big"}],
              "notes": ["prefill library rows skipped: not there"]}
    bench.summarize(report)
    return report


def test_render_markdown_has_every_section() -> None:
    text = bench.render_markdown(sample_report())
    assert text.startswith("# Paged attention kernel benchmark: NVIDIA H200\n")
    for heading in ("## Targets", "## Decode (block 16)", "## Block size", "## Split-K",
                    "## Prefill over a paged context", "## Errors and mismatches"):
        assert heading in text
    assert "Copy bandwidth: 4.27 TB/s" in text
    assert "`python benchmarks/paged_attention_bench.py --quick`" in text
    assert "**met**" in text and "**not met**" not in text    # speed 0.95 and 0.98; block 16 at 1.02x
    decode_lines = [line for line in text.splitlines()
                    if line.startswith("| MHA 32/32 ") and "| 2048 |" in line]
    assert any(" 0.950 |" in line for line in decode_lines)           # ours/SDPA speed at block 16
    assert any(" 1.020 |" in line for line in decode_lines)           # block 16 time / block 64 time
    assert any("|    95.0 |" in line for line in decode_lines)        # µs with one decimal
    assert "mha b256 ctx16384" in text
    assert "ours split: output differs" in text and "No available kernel" in text
    assert "Note: prefill library rows skipped" in text


def test_targets_in_the_report() -> None:
    report = sample_report()
    targets = report["targets"]
    assert targets["decode_vs_sdpa"]["count"] == 2 and targets["decode_vs_sdpa"]["met"]
    assert targets["block_size"]["points"][0]["slowdown"] == pytest.approx(100 / 98)
    assert report["split_k"]["modes"][0]["faster"] == "nosplit"        # 100 µs non-split, 120 split
    assert "**met**" in "\n".join(bench.targets_markdown(report))


def test_from_json_rerenders_without_a_gpu(tmp_path: Path) -> None:
    source = tmp_path / "report.json"
    source.write_text(json.dumps(sample_report()))
    out_md = tmp_path / "report.md"
    assert bench.main(["--from-json", str(source), "--out-md", str(out_md)]) == 0
    assert "## Decode (block 16)" in out_md.read_text()


def test_plan_only_and_no_cuda_exit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert bench.main(["--plan-only"]) == 0
    assert "decode cases: 161" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--quick"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "Traceback" not in err


# --- the GPU plumbing, on CPU tensors -------------------------------------------------------------

def reference_decode(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seq_len: int,
                     partition_mode: int = -1) -> torch.Tensor:
    """ops.paged_attention_decode through the torch reference."""
    lens = seq_lens.tolist()
    meta = AttentionMetadata.build([n - 1 for n in lens], [1] * len(lens), block_tables.tolist(),
                                   kv_cache.shape[4])
    return out.copy_(paged_attention_reference(query, kv_cache[:, layer], meta, scale))


def reference_prefill(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, layer: int,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                      scale: float, max_seq_len: int, max_query_len: int,
                      partition_mode: int = -1) -> torch.Tensor:
    """ops.paged_attention through the torch reference."""
    lens = seq_lens.tolist()
    starts = query_start_loc.tolist()
    q_lens = [b - a for a, b in itertools.pairwise(starts)]
    meta = AttentionMetadata.build([n - q for n, q in zip(lens, q_lens, strict=True)], q_lens,
                                   block_tables.tolist(), kv_cache.shape[4])
    return out.copy_(paged_attention_reference(query, kv_cache[:, layer], meta, scale))


class CallOnceTimer:
    """Runs every input set once and reports a fixed time."""

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, fns: list) -> float:
        for fn in fns:
            fn()
        self.calls += 1
        return 10.0 + self.calls


def cpu_settings(**overrides: Any) -> bench.Settings:
    values: dict[str, Any] = {"dtype": torch.float32, "head_size": 32, "num_layers": 2, "layer": 1,
                              "rotate_bytes": 1, "max_sets": 4, "math_max_bytes": GIB, "cap_bytes": GIB,
                              "tolerance": 1e-3, "timer": CallOnceTimer(), "device": "cpu"}
    return bench.Settings(**{**values, **overrides})


@pytest.mark.parametrize("layout", ["mha", "gqa8"])
def test_contiguous_gather_and_every_sdpa_form_match_the_reference(layout: str) -> None:
    torch.manual_seed(0)
    settings = cpu_settings()
    num_heads, num_kv_heads = bench.LAYOUTS[layout]
    batch, context, block = 3, 37, 8
    kv_cache, tables = bench.paged_inputs(settings, batch, context, num_kv_heads, block)
    assert sorted(tables.flatten().tolist()) == list(range(batch * 5))       # every block once, shuffled
    query = torch.randn(batch, num_heads, 32)
    expected = reference_decode(torch.empty_like(query), query, kv_cache, 1, tables,
                                torch.full((batch,), context), 32**-0.5, context)
    k, v = bench.contiguous_kv(kv_cache, 1, tables, context, chunk_bytes=1)   # one sequence per chunk
    assert k.shape == (batch, num_kv_heads, context, 32) and k.is_contiguous()
    layer_kv = kv_cache[:, 1].permute(1, 2, 0, 3, 4)
    gk, gv = bench.gather_kv(layer_kv, tables.long(), context)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    group = num_heads // num_kv_heads
    for form in bench.sdpa_forms(num_heads, num_kv_heads):
        expand = form == "expanded"
        kk, vv = (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)) if expand else (k, v)
        got = bench.sdpa_decode(form, query, kk, vv, 32**-0.5)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=form)


def supported(monkeypatch: pytest.MonkeyPatch, answer: bool) -> None:
    """Make ops accept (or refuse) every shape, under its current and its older name."""
    for name in ("attention_supported", "decode_supported"):
        monkeypatch.setattr(ops, name, lambda query, kv_cache: answer, raising=False)


def test_run_decode_case_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "paged_attention_decode", reference_decode)
    supported(monkeypatch, True)
    torch.manual_seed(1)
    settings = cpu_settings(rotate_bytes=10**9, math_max_bytes=GIB)
    case = bench.DecodeCase("gqa4", 2, 45, 16)
    row = bench.run_decode_case(case, settings)
    assert row["sets"] == 4
    assert row["ours_auto_us"] and row["ours_nosplit_us"] and row["ours_split_us"]
    assert row["sdpa_us"] is not None
    assert row["sdpa_backend"].split("/")[1] in ("native", "packed", "expanded")
    assert row["gather_sdpa_us"] is not None
    assert row["mismatch"] == [], row["max_abs_diff"]
    assert {"ours auto", "ours nosplit", "ours split", "gather+sdpa"} <= set(row["max_abs_diff"])
    assert row["errors"] == {}
    assert "cudnn/native" in row["sdpa_unavailable"]                          # no cuDNN on the CPU
    assert row["kv_bytes"] == 2 * 45 * 8 * 32 * 2 * 4


def test_run_decode_case_without_sdpa_compares_with_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "paged_attention_decode", reference_decode)
    supported(monkeypatch, True)
    case = bench.DecodeCase("mha", 1, 20, 8, with_sdpa=False)
    row = bench.run_decode_case(case, cpu_settings())
    assert row["sdpa_us"] is None and row["gather_sdpa_backend"] == "flash/native"
    # With the order of the shape's SDPA row, gather+SDPA tries its fastest backend first.
    row = bench.run_decode_case(case, cpu_settings(), [("cudnn", "native"), ("math", "native")])
    assert row["gather_sdpa_backend"] == "math/native"
    assert "gather+sdpa cudnn/native" in row["sdpa_unavailable"]
    assert set(row["max_abs_diff"]) == {"ours auto", "ours nosplit", "ours split"}


def test_run_decode_case_records_an_unsupported_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    supported(monkeypatch, False)
    row = bench.run_decode_case(bench.DecodeCase("mha", 1, 20, 128), cpu_settings(skip_gather=True))
    assert row["ours_auto_us"] is None and "attention_supported" in row["errors"]["ours"]


def test_run_prefill_case_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "paged_attention", reference_prefill, raising=False)
    supported(monkeypatch, True)
    flash = types.SimpleNamespace(
        flash_available=lambda: True,
        paged_flash_attention=lambda q, cache, layer, meta, scale: paged_attention_reference(
            q, cache[:, layer], meta, scale))
    torch.manual_seed(2)
    case = bench.PrefillCase("gqa4", 2, 20, 7, 16)
    row = bench.run_prefill_case(case, cpu_settings(), flash)
    assert row["ours_us"] and row["library_us"] and row["mismatch"] == []
    assert row["max_abs_diff"] < 1e-4
    row = bench.run_prefill_case(case, cpu_settings(), None)
    assert row["library_us"] is None and row["ours_us"]
