"""Benchmark results: strict JSON, table rows, markdown, loading result files, the latency-vs-rate plot."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from clients import bench_report
from clients.bench_records import ClientSummary, Failure, Percentiles, RequestRecord, summarize
from clients.server_metrics import ServerStats
from pagedserve.errors import RequestErrorKind

NAN = math.nan


def client(normalized_latency: float = 0.0123456, completed: int = 6) -> ClientSummary:
    return ClientSummary(completed=completed, failed=0, duration_s=2.0, output_tokens=300, prompt_tokens=100,
                         requests_per_s=3.0049, output_tokens_per_s=150.04, total_tokens_per_s=200.06,
                         normalized_latency_s=normalized_latency, mean_latency_s=1.0,
                         ttft=Percentiles(10.0, 12.34, 56.78), tpot=Percentiles(5.0, 5.26, 6.64),
                         itl=Percentiles(NAN, NAN, NAN), preemptions=3)


def server() -> ServerStats:
    return ServerStats(iterations=10, mean_batched_requests=3.26, mean_kv_utilization=0.8046,
                       mean_kv_sharing_saved=0.5, preemptions_swap=1, preemptions_recompute=2,
                       control_plane_fraction=0.2214, mean_iteration_ms=12.0, decode_steps=8,
                       mean_decode_roofline=NAN, gpu_kv_blocks=512, block_size=16)


def result(system: str, rates: list[float], with_server: bool = True) -> dict:
    """A result whose run at rate r has normalized latency r / 100 (offline: 0.5)."""
    runs = [bench_report.run_entry(r, client(0.5 if math.isinf(r) else r / 100),
                                   server() if with_server else None) for r in rates]
    return {"system": system, "runs": runs}


def strict_loads(text: str) -> object:
    """json.loads that refuses NaN and Infinity, as strict parsers (JavaScript, jq) do."""
    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def test_dumps_writes_nan_as_null_infinities_as_strings_and_enums_as_values():
    text = bench_report.dumps({"rate": math.inf, "low": -math.inf, "p": NAN,
                               "kind": RequestErrorKind.TOO_LARGE, "nested": [(1.5, NAN), {"x": math.inf}]})
    assert strict_loads(text) == {"rate": "inf", "low": "-inf", "p": None, "kind": "too_large",
                                  "nested": [[1.5, None], {"x": "inf"}]}
    assert text.endswith("}\n")


def test_dumps_of_a_run_entry_is_strict_json_keeping_every_finite_value():
    run = bench_report.run_entry(math.inf, client(), server())
    loaded = strict_loads(bench_report.dumps(run))
    assert loaded["request_rate"] == "inf"
    assert loaded["client"]["itl"] == {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    assert loaded["client"]["ttft"] == {"mean_ms": 10.0, "p50_ms": 12.34, "p99_ms": 56.78}
    assert loaded["server"]["mean_decode_roofline"] is None
    assert loaded["server"]["gpu_kv_blocks"] == 512


def test_run_entry_without_server_stats_has_null_server():
    assert bench_report.run_entry(2.0, client(), None)["server"] is None


@pytest.mark.parametrize(("value", "expected"), [("inf", math.inf), (math.inf, math.inf), (2, 2.0),
                                                 (0.5, 0.5)])
def test_request_rate_reads_numbers_and_the_inf_string(value, expected):
    assert bench_report.request_rate({"request_rate": value}) == expected


def test_table_row_formats_every_column():
    row = bench_report.table_row("pagedserve", bench_report.run_entry(math.inf, client(), server()))
    assert len(row) == len(bench_report.COLUMNS)
    assert row == ["pagedserve", "offline", 6, "0", 3.0, 150.0, 200.1, "0.0123", "12.3", "56.8", "5.3", "6.6",
                   "-", "-", "3.3", "80.5%", "50.0%", "3", "22.1%", "-"]


def test_table_row_without_server_stats_dashes_the_server_columns():
    row = bench_report.table_row("hf-static", bench_report.run_entry(2.5, client(), None))
    assert row[:4] == ["hf-static", "2.5", 6, "0"]
    server_columns = bench_report.COLUMNS.index("batched reqs")
    assert row[server_columns:] == ["-"] * (len(bench_report.COLUMNS) - server_columns)


def test_table_row_is_the_same_after_a_json_round_trip():
    run = bench_report.run_entry(math.inf, client(normalized_latency=NAN), server())
    loaded = json.loads(bench_report.dumps(run))
    assert bench_report.table_row("x", loaded) == bench_report.table_row("x", run)
    assert bench_report.table_row("x", loaded)[bench_report.COLUMNS.index("norm. latency (s/tok)")] == "-"


def test_markdown_has_one_row_per_system_and_rate_in_order():
    table = bench_report.markdown([result("pagedserve", [math.inf, 4.0]), result("hf-static", [2.0], False)])
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == list(bench_report.COLUMNS)
    firsts = [[cell.strip() for cell in line.strip("|").split("|")][:2] for line in lines[2:]]
    assert firsts == [["pagedserve", "offline"], ["pagedserve", "4"], ["hf-static", "2"]]


def test_load_results_reads_single_results_and_lists(tmp_path):
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    one.write_text(bench_report.dumps(result("a", [math.inf])))
    many.write_text(bench_report.dumps([result("b", [1.0]), result("c", [2.0, 3.0])]))
    loaded = bench_report.load_results([one, many])
    assert [r["system"] for r in loaded] == ["a", "b", "c"]
    assert [bench_report.request_rate(run) for run in loaded[2]["runs"]] == [2.0, 3.0]
    assert loaded[0]["runs"][0]["request_rate"] == "inf"


def test_plot_draws_one_line_per_system_with_online_runs_sorted_by_rate(tmp_path, monkeypatch):
    """Offline runs are left out; a system with only offline runs gets no line; the PNG is written."""
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(args[0]), list(args[1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    results = [result("pagedserve", [4.0, math.inf, 1.0, 2.0]), result("offline-only", [math.inf]),
               json.loads(bench_report.dumps(result("hf", [3.0, 0.5], with_server=False)))]
    path = tmp_path / "latency.png"
    bench_report.plot_latency_vs_rate(results, path, title="test")
    assert drawn == [("pagedserve", [1.0, 2.0, 4.0], [0.01, 0.02, 0.04]), ("hf", [0.5, 3.0], [0.005, 0.03])]
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_plot_of_loaded_results_with_a_failed_run_at_a_repeated_rate(tmp_path):
    runs = [bench_report.run_entry(2.0, client(normalized_latency=NAN, completed=0), None),
            bench_report.run_entry(2.0, client(normalized_latency=0.02), None)]
    path = tmp_path / "r.json"
    path.write_text(bench_report.dumps({"system": "x", "runs": runs}))
    bench_report.plot_latency_vs_rate(bench_report.load_results([path]), tmp_path / "p.png")
    assert (tmp_path / "p.png").exists()


def test_failed_requests_are_counted_by_code_in_the_table_json_and_failure_lines():
    records = [RequestRecord(0, 4, 2, finished=1.0, output_tokens=2),
               RequestRecord(1, 4, 2, error="the waiting queue is full", error_code="RESOURCE_EXHAUSTED"),
               RequestRecord(2, 4, 2, error="queue full again", error_code="RESOURCE_EXHAUSTED"),
               RequestRecord(3, 4, 2, error="no executor", error_code="UNAVAILABLE"),
               RequestRecord(4, 4, 2)]                     # a stream that ended without its usage
    summary = summarize(records, 1.0)
    assert summary.failures_by_code == {"INCOMPLETE": 1, "RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert summary.failures[:2] == (Failure(1, "RESOURCE_EXHAUSTED", "the waiting queue is full"),
                                    Failure(2, "RESOURCE_EXHAUSTED", "queue full again"))
    run = json.loads(bench_report.dumps(bench_report.run_entry(math.inf, summary, None)))
    assert run["client"]["failures"][2] == {"request": 3, "code": "UNAVAILABLE", "message": "no executor"}
    cell = bench_report.table_row("x", run)[bench_report.COLUMNS.index("failed")]
    assert cell == "4 (RESOURCE_EXHAUSTED 2, INCOMPLETE 1, UNAVAILABLE 1)"
    lines = bench_report.failure_lines(run["client"])
    assert lines[1] == "failed: 2 x RESOURCE_EXHAUSTED (e.g. request 1: the waiting queue is full)"


def test_the_terminal_summary_is_key_value_lines_that_fit_100_columns():
    run = bench_report.run_entry(math.inf, client(), server())
    text = bench_report.summary("pagedserve", run)
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"     # as vllm bench serve
    assert lines[-1] == "=" * len(lines[0])
    assert max(len(line) for line in lines) <= bench_report.SUMMARY_WIDTH
    assert "Request rate (req/s):                    inf (offline)" in lines
    assert "Output token throughput (tok/s):         150.04" in lines
    assert "Median TTFT (ms):                        12.34" in lines and "Mean ITL (ms):" in text
    assert "Preemptions (swap / recompute):          1 / 2" in lines
    loaded = json.loads(bench_report.dumps(run))                    # as read back from --json
    assert bench_report.summary("pagedserve", loaded) == text


def test_the_summary_of_a_run_without_server_stats_or_with_many_failures_still_fits():
    failing = dataclasses.replace(client(), failed=40, failures_by_code={
        f"SOME_LONG_STATUS_CODE_{i}": 4 for i in range(10)})
    text = bench_report.summary("a-system-with-a-rather-long-name" * 3, bench_report.run_entry(2.0, failing,
                                                                                                 None))
    assert "Server" not in text and "Request rate (req/s):                    2" in text
    assert max(len(line) for line in text.splitlines()) <= bench_report.SUMMARY_WIDTH
