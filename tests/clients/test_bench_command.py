"""`pagedserve bench`: request-rate parsing, flag validation, and CPU smoke runs on the embedded model."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import pytest
from small_stack import SMALL_STACK, running_small_stack

from clients import bench_command
from clients.bench_command import parse_rates
from clients.cli import main as pagedserve
from clients.datasets import read_conversations, sample, tokenizer_encoder
from clients.loadgen import WorkloadSpec, build_load_requests
from pagedserve.default_model import default_model_dir
from pagedserve.errors import InvalidArgumentError
from tests.e2e.e2e_stack import RunningStack, require_model

# A small KV pool and a short profiling step: each stack starts in a few seconds on CPU.
DATASET = Path(__file__).parent / "data" / "sharegpt_small.json"


# ---- parse_rates and validation ------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("inf", [math.inf]), ("1,2.5", [1.0, 2.5]), ("4, 8,", [4.0, 8.0]), ("20,inf", [20.0, math.inf]),
])
def test_parse_rates_reads_comma_separated_rates(text, expected):
    assert parse_rates(text) == expected


@pytest.mark.parametrize("text", ["", ",", "0", "-1", "2,0", "nan", "-inf", "fast", "1,x"])
def test_parse_rates_rejects_bad_rates_naming_request_rate(text):
    with pytest.raises(InvalidArgumentError) as caught:
        parse_rates(text)
    assert caught.value.field == "request-rate"


@pytest.fixture
def no_stack(monkeypatch):
    """Fail the test if the command tries to start a local stack."""
    def refuse(*args, **kwargs):
        raise AssertionError("a stack was started for flags that are invalid")
    monkeypatch.setattr(bench_command, "LocalStack", refuse)


@pytest.mark.parametrize(("flags", "field"), [
    (["--request-rate", "0"], "request-rate"),
    (["--request-rate", "2,abc"], "request-rate"),
    (["--num-requests", "0"], "num_requests"),
    (["--n", "2", "--beam-width", "2"], "n"),
    (["--burstiness", "0"], "burstiness"),
    (["--request-rate", "1,2", "--shared-prefix-len", "-1"], "shared_prefix_len"),
    (["--plot", "latency.png"], "plot"),                       # offline only: no rate to draw against
    (["--plot", "latency.png", "--request-rate", "inf,inf"], "plot"),
    (["--dataset-path", "/nonexistent/sharegpt.json"], "dataset_path"),
    (["--dataset-path", str(Path(__file__).parent / "data" / "sharegpt_small.json"), "--tokenizer",
      "/nonexistent/tokenizer"], "tokenizer"),
])
def test_invalid_workload_flags_exit_2_before_starting_anything(flags, field, no_stack, capsys):
    assert pagedserve(["bench", "--no-progress", *flags]) == 2
    assert f"pagedserve bench: invalid {field}: " in capsys.readouterr().err


def test_a_target_that_does_not_answer_fails_within_the_connect_timeout(capsys):
    """A wrong --target is an error naming it after CONNECT_TIMEOUT_S, not a minute's wait."""
    with socket.socket() as sock:           # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    assert pagedserve(["bench", "--target", f"127.0.0.1:{port}", "--no-progress", "--trace", "fixed",
                       "--num-requests", "1"]) == 1
    assert time.monotonic() - started < bench_command.CONNECT_TIMEOUT_S + 5
    err = capsys.readouterr().err
    assert f"cannot connect to 127.0.0.1:{port} within 5 s" in err and "check --target" in err


# ---- smoke runs on the embedded model ------------------------------------------------------------------

def read_result(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert result["system"] and result["runs"]
    return result


def expected_requests(result: dict, **spec: object):
    """The requests the run sent, rebuilt from its workload and the served model's shape."""
    model = result["model"]
    return build_load_requests(WorkloadSpec(**spec), model["vocab_size"], model["max_model_len"])


def test_offline_alpaca_smoke_run_writes_exact_client_and_sane_server_stats(tmp_path, capsys):
    require_model()
    path, table = tmp_path / "result.json", tmp_path / "result.md"
    code = pagedserve(["bench", "--trace", "alpaca", "--num-requests", "6", "--json", str(path),
                       "--markdown", str(table), "--no-progress", *SMALL_STACK])
    assert code == 0
    result = read_result(path)
    assert result["model"]["model_name"] == Path(default_model_dir()).name
    assert result["workload"]["request_rates"] == ["inf"]
    (run,) = result["runs"]
    assert run["request_rate"] == "inf"
    requests = expected_requests(result, trace="alpaca", num_requests=6)
    c = run["client"]
    assert (c["completed"], c["failed"]) == (6, 0)
    assert c["output_tokens"] == sum(r.output_len for r in requests)
    assert c["prompt_tokens"] == sum(len(r.prompt_token_ids) for r in requests)
    assert c["output_tokens_per_s"] == pytest.approx(c["output_tokens"] / c["duration_s"])
    s = run["server"]
    # Every iteration gives each running sequence at most one token.
    assert s["iterations"] >= max(r.output_len for r in requests)
    assert 0 <= s["decode_steps"] <= s["iterations"]
    assert 1 <= s["mean_batched_requests"] <= 6
    assert 0 < s["mean_kv_utilization"] <= 1
    assert 0 <= s["control_plane_fraction"] <= 1
    assert (s["preemptions_swap"], s["preemptions_recompute"]) == (0, 0)
    assert (s["block_size"], s["gpu_kv_blocks"]) == (16, result["model"]["num_gpu_blocks"])
    captured = capsys.readouterr()
    assert "pagedserve.requests" not in captured.err        # no log line per request under the bar
    summary = captured.out.splitlines()                     # the terminal gets the narrow summary
    assert summary[0] == "============ Serving Benchmark Result ============"
    assert "Successful requests:                     6" in summary
    assert any(line.startswith("Engine iterations:") for line in summary)
    assert max(len(line) for line in summary) <= 100
    rows = table.read_text().splitlines()                  # the file gets the wide table
    assert rows[0].startswith("| system") and rows[-1].startswith("| pagedserve | offline")


def test_online_run_at_two_rates_honours_arrivals_and_plots(tmp_path):
    require_model()
    path, plot = tmp_path / "online.json", tmp_path / "latency.png"
    code = pagedserve(["bench", "--trace", "alpaca", "--num-requests", "6", "--request-rate", "20,40",
                       "--label", "mine", "--json", str(path), "--plot", str(plot), "--no-progress",
                       *SMALL_STACK])
    assert code == 0
    result = read_result(path)
    assert result["system"] == "mine"
    assert [run["request_rate"] for run in result["runs"]] == [20.0, 40.0]
    for run in result["runs"]:
        requests = expected_requests(result, trace="alpaca", num_requests=6, request_rate=run["request_rate"])
        c = run["client"]
        assert (c["completed"], c["failed"]) == (6, 0)
        assert c["output_tokens"] == sum(r.output_len for r in requests)
        assert c["duration_s"] > requests[-1].arrival_time > 0      # the last request was sent on time
        assert run["server"]["iterations"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


stack = pytest.fixture(scope="module", name="stack")(running_small_stack)


def metrics_url(stack: RunningStack) -> str:
    return f"http://{stack.stack.processes['scheduler'].metrics_address}/metrics"


def test_parallel_sampling_against_a_running_server_counts_every_output(stack, tmp_path):
    path = tmp_path / "n2.json"
    code = pagedserve(["bench", "--target", stack.target, "--metrics-url", metrics_url(stack), "--trace",
                       "fixed", "--num-requests", "3", "--prompt-len", "6", "--output-len", "5", "--n", "2",
                       "--json", str(path), "--no-progress"])
    assert code == 0
    result = read_result(path)
    (run,) = result["runs"]
    assert (run["client"]["completed"], run["client"]["output_tokens"]) == (3, 3 * 5 * 2)
    assert run["client"]["prompt_tokens"] == 3 * 6
    assert run["server"]["iterations"] >= 5 and 1 <= run["server"]["mean_batched_requests"] <= 3
    assert result["config"] is None


def test_a_running_server_without_metrics_url_has_client_stats_only(stack, tmp_path):
    path = tmp_path / "plain.json"
    code = pagedserve(["bench", "--target", stack.target, "--trace", "fixed", "--num-requests", "1",
                       "--prompt-len", "4", "--output-len", "3", "--json", str(path), "--no-progress"])
    assert code == 0
    (run,) = read_result(path)["runs"]
    assert (run["client"]["completed"], run["client"]["output_tokens"], run["server"]) == (1, 3, None)


def test_beam_search_against_a_running_server_counts_every_beam(stack, tmp_path):
    path = tmp_path / "beam.json"
    code = pagedserve(["bench", "--target", stack.target, "--metrics-url", metrics_url(stack),
                       "--trace", "fixed", "--num-requests", "3", "--prompt-len", "6", "--output-len", "5",
                       "--beam-width", "2", "--json", str(path), "--no-progress"])
    assert code == 0
    (run,) = read_result(path)["runs"]
    assert run["server"]["iterations"] >= 5
    assert (run["client"]["completed"], run["client"]["output_tokens"]) == (3, 3 * 5 * 2)


def test_warm_up_requests_are_left_out_of_the_measured_run(stack, tmp_path):
    """Warm-up runs before the first scrape: one request of 3 tokens takes exactly 3 iterations."""
    path = tmp_path / "warm.json"
    code = pagedserve(["bench", "--target", stack.target, "--metrics-url", metrics_url(stack),
                       "--warmup-requests", "2", "--trace", "fixed", "--num-requests", "1",
                       "--prompt-len", "4", "--output-len", "3", "--json", str(path), "--no-progress"])
    assert code == 0
    (run,) = read_result(path)["runs"]
    assert (run["client"]["completed"], run["client"]["output_tokens"]) == (1, 3)
    assert (run["server"]["iterations"], run["server"]["mean_batched_requests"]) == (3, 1.0)


@pytest.mark.parametrize(("flags", "outputs"), [(["--n", "2"], 2), (["--beam-width", "2"], 2), ([], 1)])
def test_the_openai_api_runs_the_same_workload_to_the_same_counts(stack, tmp_path, flags, outputs):
    path = tmp_path / "openai.json"
    code = pagedserve(["bench", "--api", "openai", "--target", stack.target, "--http-url", stack.http_url,
                       "--metrics-url", metrics_url(stack), "--trace", "fixed", "--num-requests", "3",
                       "--prompt-len", "6", "--output-len", "5", *flags, "--json", str(path),
                       "--no-progress"])
    assert code == 0
    result = read_result(path)
    assert result["workload"]["api"] == "openai"
    (run,) = result["runs"]
    client = run["client"]
    assert (client["completed"], client["failed"], client["output_tokens"]) == (3, 0, 3 * 5 * outputs)
    assert client["prompt_tokens"] == 3 * 6 and client["ttft"]["p50_ms"] > 0
    assert run["server"]["iterations"] >= 5


def test_a_sharegpt_dataset_against_a_running_server_sends_its_conversations(stack, tmp_path, capsys):
    """The fixture's four usable conversations, tokenized with the served (embedded) model's tokenizer."""
    path = tmp_path / "sharegpt.json"
    code = pagedserve(["bench", "--target", stack.target, "--dataset-path", str(DATASET), "--num-requests",
                       "4", "--json", str(path), "--no-progress"])
    assert code == 0
    result = read_result(path)
    assert result["workload"]["trace"] == "dataset" and result["workload"]["dataset_path"] == str(DATASET)
    encode = tokenizer_encoder(default_model_dir())
    taken = sample(read_conversations(DATASET), encode, 4, result["model"]["max_model_len"])
    (run,) = result["runs"]
    assert (run["client"]["completed"], run["client"]["failed"]) == (4, 0)
    assert run["client"]["prompt_tokens"] == sum(len(s.prompt_token_ids) for s in taken.samples)
    assert run["client"]["output_tokens"] == sum(s.output_len for s in taken.samples)
    assert f"dataset {DATASET}: 4 requests from" in capsys.readouterr().err
    assert pagedserve(["bench", "--target", stack.target, "--dataset-path", str(DATASET), "--num-requests",
                       "5", "--no-progress"]) == 2         # the fixture has four usable conversations


def test_fixed_lengths_over_the_served_model_are_refused(stack, capsys):
    code = pagedserve(["bench", "--target", stack.target, "--trace", "fixed", "--prompt-len", "1000",
                       "--output-len", "100", "--num-requests", "1", "--no-progress"])
    assert code == 2
    assert "invalid output_len: 1000 prompt + 100 output tokens exceed the model's context" in (
        capsys.readouterr().err)
