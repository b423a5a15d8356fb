"""`pagedserve simulate` runs end to end on CPU and prints its tables."""

import json

from clients.cli import main as pagedserve
from clients.tables import markdown_table


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_simulate_compares_paged_with_the_reservation_baselines(capsys, tmp_path):
    out = tmp_path / "report.json"
    code = pagedserve(["simulate", "--num-requests", "40", "--kv-tokens", "4096", "--check",
                       "--json", str(out)])
    assert code == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"paged", "reserve-max", "reserve-pow2", "reserve-oracle"}
    reports = {r["reservation"]: r for r in json.loads(out.read_text())}
    assert all(r["num_failed"] == 0 for r in reports.values())
    tokens = {r["generated_tokens"] for r in reports.values()}
    assert len(tokens) == 1                                        # same work in every mode
    # The paper's claim on this trace: paging batches more requests and wastes less memory.
    assert reports["paged"]["mean_batched_requests"] > reports["reserve-oracle"]["mean_batched_requests"]
    assert reports["paged"]["mean_kv_utilization"] > 0.9 > reports["reserve-max"]["mean_kv_utilization"]


def test_simulate_with_parallel_sampling_and_beams(capsys):
    assert pagedserve(["simulate", "--num-requests", "10", "--n", "3", "--modes", "paged",
                       "--trace", "alpaca", "--check"]) == 0
    assert pagedserve(["simulate", "--num-requests", "6", "--beam-width", "3", "--modes", "paged",
                       "--trace", "fixed", "--prompt-len", "20", "--output-len", "12", "--check"]) == 0
    assert "paged" in table_rows(capsys.readouterr().out)


def test_simulate_takes_the_configured_mode_from_environment(capsys, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_RESERVATION", "reserve-pow2")
    monkeypatch.setenv("PAGEDSERVE_BLOCK_SIZE", "32")
    assert pagedserve(["simulate", "--modes", "config", "--num-requests", "20", "--kv-tokens", "8192"]) == 0
    captured = capsys.readouterr()
    assert list(table_rows(captured.out)) == ["reserve-pow2"]
    assert "blocks of 32 tokens" in captured.err


def test_bad_flags_name_the_field(capsys):
    assert pagedserve(["simulate", "--block-size", "12"]) == 2
    assert "block_size" in capsys.readouterr().err


def test_markdown_table_aligns_numbers_right():
    text = markdown_table(["name", "value"], [["a", 1.5], ["bb", 10]])
    assert text.splitlines()[1] == "|------|------:|"
    assert text.splitlines()[2] == "| a    | 1.500 |"


def test_simulate_exits_1_when_requests_fail(capsys):
    """Prompts larger than the whole KV pool can never run: they fail, and so does the command."""
    code = pagedserve(["simulate", "--trace", "fixed", "--prompt-len", "100", "--output-len", "10",
                       "--kv-tokens", "64", "--modes", "paged", "--num-requests", "2"])
    assert code == 1
    assert "2 of 2 requests failed under paged" in capsys.readouterr().err


def test_lengths_over_the_model_context_are_refused_not_clipped(capsys):
    code = pagedserve(["simulate", "--trace", "fixed", "--prompt-len", "2000", "--output-len", "100",
                       "--modes", "paged", "--num-requests", "2"])
    assert code == 2
    assert "invalid output_len: 2000 prompt + 100 output tokens do not fit" in capsys.readouterr().err


