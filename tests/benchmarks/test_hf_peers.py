"""The Hugging Face peer systems of the serving benchmark on a tiny Llama, on the CPU.

Both systems serve small traces offline and online; every request must get exactly its output length,
with one time per token, never before its arrival. The static baseline's batching policy is checked on
its own, without a model.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# tiny_models lives beside the executor tests; that directory is on sys.path only when pytest collects there.
TINY_MODELS_DIR = str(Path(__file__).resolve().parents[1] / "executor_svc")
if TINY_MODELS_DIR not in sys.path:
    sys.path.append(TINY_MODELS_DIR)

import transformers.generation.continuous_batching.cache as cb_cache  # noqa: E402
from tiny_models import VOCAB, save_config_only, tiny_config  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from benchmarks import hf_peers  # noqa: E402
from benchmarks.hf_peers import PeerRequest, next_static_batch  # noqa: E402
from clients import bench_report  # noqa: E402
from clients.bench_records import RequestRecord, summarize  # noqa: E402

MAX_MODEL_LEN = 48
# A small paged cache for the tiny model: 64 blocks of 16 tokens hold every test's requests at once.
CB_CACHE = {"num_blocks": 64, "block_size": 16, "max_batch_tokens": 256}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A model directory with only a tiny Llama's config.json, as for a dummy-weight run."""
    return save_config_only(tiny_config("llama"), tmp_path / "tiny-llama")


@pytest.fixture
def model(model_dir: Path) -> PreTrainedModel:
    """The tiny Llama with dummy weights on the CPU."""
    return hf_peers.load_dummy_model(model_dir, "float32", "cpu", "sdpa")


@pytest.fixture
def cpu_cache_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give HF's cache sizer a fixed 1 GiB budget on the CPU.

    On a CPU, HF CB measures memory with psutil, which is optional; without it the sizer sees 0 bytes and
    refuses any cache. The budget only bounds the check, the sizes come from CB_CACHE.
    """
    monkeypatch.setattr(cb_cache, "get_device_and_memory_breakdown",
                        lambda: (torch.device("cpu"), 2**30, 0, 0))


def tiny_requests(trace: str = "alpaca", num_requests: int = 6,
                  rate: float | None = None) -> list[PeerRequest]:
    """A small trace for the tiny model: alpaca-like lengths clipped to MAX_MODEL_LEN, or fixed ones."""
    return hf_peers.build_requests(trace, num_requests, seed=1, vocab_size=VOCAB, max_model_len=MAX_MODEL_LEN,
                                   request_rate=rate, prompt_len=5, output_len=7)


def assert_exact(records: Sequence[RequestRecord], requests: Sequence[PeerRequest]) -> None:
    """Every request finished with exactly its output length, one time per token, after its arrival."""
    assert [r.index for r in records] == [q.index for q in requests]
    for record, request in zip(records, requests, strict=True):
        assert record.ok, record.error
        assert record.prompt_len == request.prompt_len
        assert record.output_len == request.output_len
        assert record.output_tokens == request.output_len
        assert len(record.token_times) == request.output_len
        assert record.token_times == sorted(record.token_times)
        assert record.first_token is not None and record.finished is not None
        assert request.arrival_time == record.arrival <= record.first_token <= record.finished
        assert record.first_token == record.token_times[0] and record.finished == record.token_times[-1]


def assert_sane_summary(records: Sequence[RequestRecord], duration: float) -> None:
    """The summary counts every request and token, with positive rates and latencies."""
    summary = summarize(records, duration)
    assert summary.completed == len(records) and summary.failed == 0
    assert summary.output_tokens == sum(r.output_len for r in records)
    assert duration >= max(r.finished for r in records) - min(r.arrival for r in records) - 1e-9
    assert summary.output_tokens_per_s > 0 and summary.total_tokens_per_s > summary.output_tokens_per_s
    assert summary.normalized_latency_s > 0 and summary.ttft.p50_ms >= 0 and summary.itl.p99_ms >= 0


# --- the trace -------------------------------------------------------------------------------------

def test_build_requests_draws_lengths_that_fit_like_the_load_generator() -> None:
    requests = hf_peers.build_requests("sharegpt", 50, seed=3, vocab_size=VOCAB, max_model_len=64)
    assert all(1 <= r.prompt_len <= 63 and r.output_len >= 1 and r.prompt_len + r.output_len <= 64
               for r in requests)
    assert all(3 <= t < VOCAB for r in requests for t in r.prompt_token_ids)
    assert all(r.arrival_time == 0 for r in requests)
    assert requests == hf_peers.build_requests("sharegpt", 50, seed=3, vocab_size=VOCAB, max_model_len=64)


def test_build_requests_online_and_fixed() -> None:
    online = hf_peers.build_requests("fixed", 20, seed=0, vocab_size=VOCAB, max_model_len=64,
                                     request_rate=5.0, prompt_len=10, output_len=54)
    arrivals = [r.arrival_time for r in online]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    assert {(r.prompt_len, r.output_len) for r in online} == {(10, 54)}
    with pytest.raises(ValueError, match="at most 54 output tokens fit"):     # refused, not clipped
        hf_peers.build_requests("fixed", 3, seed=0, vocab_size=VOCAB, max_model_len=64, prompt_len=10,
                                output_len=55)
    offline = hf_peers.build_requests("fixed", 3, seed=0, vocab_size=VOCAB, max_model_len=64,
                                      request_rate=math.inf, prompt_len=10, output_len=5)
    assert [r.arrival_time for r in offline] == [0, 0, 0]
    with pytest.raises(ValueError, match="prompt_len"):
        hf_peers.build_requests("fixed", 3, seed=0, vocab_size=VOCAB, max_model_len=64)


# --- the static baseline's policy ------------------------------------------------------------------

def arrivals(*times: float) -> list[PeerRequest]:
    """Requests arriving at the given times (in order), with one-token prompts."""
    return [PeerRequest(i, (3,), 4, t) for i, t in enumerate(times)]


def test_static_batch_takes_up_to_batch_size_of_the_arrived() -> None:
    waiting = arrivals(0.0, 0.1, 0.2, 0.3, 5.0)
    batch, start = next_static_batch(waiting, now=1.0, batch_size=3)
    assert [r.index for r in batch] == [0, 1, 2] and start == 1.0
    batch, start = next_static_batch(waiting[3:], now=2.0, batch_size=3)
    assert [r.index for r in batch] == [3] and start == 2.0       # request 4 has not arrived yet


def test_static_batch_waits_for_the_next_arrival_when_none_has_come() -> None:
    waiting = arrivals(5.0, 5.0, 6.0)
    batch, start = next_static_batch(waiting, now=2.0, batch_size=32)
    assert [r.index for r in batch] == [0, 1] and start == 5.0    # both arrive at 5.0; 6.0 is later


def test_static_batch_offline_is_consecutive_chunks() -> None:
    waiting = arrivals(*[0.0] * 7)
    chunks = []
    while waiting:
        batch, _ = next_static_batch(waiting, now=0.0, batch_size=3)
        chunks.append([r.index for r in batch])
        del waiting[:len(batch)]
    assert chunks == [[0, 1, 2], [3, 4, 5], [6]]


def test_static_batch_rejects_nothing_to_run() -> None:
    with pytest.raises(ValueError):
        next_static_batch([], now=0.0, batch_size=4)
    with pytest.raises(ValueError):
        next_static_batch(arrivals(0.0), now=0.0, batch_size=0)


def test_left_padding_puts_prompts_at_the_right() -> None:
    ids, mask = hf_peers.left_padded([(5, 6, 7), (8,)], pad_token_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


# --- the systems -----------------------------------------------------------------------------------

def test_hf_static_offline_exact_lengths(model: PreTrainedModel) -> None:
    requests = tiny_requests("alpaca")
    assert len({r.output_len for r in requests}) > 1               # batches mix output lengths
    records, duration = hf_peers.run_hf_static(model, requests, batch_size=4, progress=False)
    assert_exact(records, requests)
    assert_sane_summary(records, duration)
    # Requests 0-3 ran as one batch: they share step times, each keeping its own first output_len steps.
    longest = max(records[:4], key=lambda r: r.output_len)
    for record in records[:4]:
        assert record.token_times == longest.token_times[:record.output_len]


def test_hf_static_online_respects_arrivals(model: PreTrainedModel) -> None:
    requests = tiny_requests("fixed", 6, rate=50.0)
    records, duration = hf_peers.run_hf_static(model, requests, batch_size=2, progress=False)
    assert_exact(records, requests)
    assert_sane_summary(records, duration)


def test_hf_continuous_offline_exact_lengths(model: PreTrainedModel, cpu_cache_budget: None) -> None:
    requests = tiny_requests("alpaca")
    settings: dict[str, object] = {}
    records, duration = hf_peers.run_hf_continuous(model, requests, progress=False, settings=settings,
                                                   **CB_CACHE)
    assert_exact(records, requests)
    assert_sane_summary(records, duration)
    assert settings["num_blocks"] == 64 and settings["max_batch_tokens"] == 256
    assert "sdpa" in str(settings["attn_implementation"])
    assert model.config._attn_implementation == "sdpa"             # the manager put the model back


def test_hf_continuous_without_streaming_uses_hf_timestamps(model: PreTrainedModel,
                                                            cpu_cache_budget: None) -> None:
    requests = tiny_requests("alpaca", 4)
    records, duration = hf_peers.run_hf_continuous(model, requests, progress=False, stream=False, **CB_CACHE)
    assert_exact(records, requests)
    assert_sane_summary(records, duration)


def test_hf_continuous_online_respects_arrivals(model: PreTrainedModel, cpu_cache_budget: None) -> None:
    requests = tiny_requests("fixed", 6, rate=50.0)
    records, duration = hf_peers.run_hf_continuous(model, requests, progress=False, **CB_CACHE)
    assert_exact(records, requests)
    assert_sane_summary(records, duration)


def test_hf_continuous_times_every_token_through_evictions(model: PreTrainedModel,
                                                           cpu_cache_budget: None) -> None:
    # Six requests of 40 tokens (3 blocks each) in 8 blocks: HF evicts some and recomputes them later
    # (a "soft reset"), which restarts their HF timestamps.
    requests = hf_peers.build_requests("fixed", 6, seed=0, vocab_size=VOCAB, max_model_len=MAX_MODEL_LEN,
                                       prompt_len=10, output_len=30)
    tight = {"num_blocks": 8, "block_size": 16, "max_batch_tokens": 64}
    streamed, duration = hf_peers.run_hf_continuous(model, requests, progress=False, **tight)
    assert sum(r.num_preemptions for r in streamed) > 0
    assert_exact(streamed, requests)                               # streamed: every token's time survives
    assert_sane_summary(streamed, duration)

    whole, _ = hf_peers.run_hf_continuous(model, requests, progress=False, stream=False, **tight)
    assert all(r.ok and r.output_tokens == 30 for r in whole)
    reset = [r for r in whole if r.num_preemptions]
    assert reset, "expected soft resets"
    # Whole results keep only the times after the last reset: no first-token time, but a real end.
    for record in reset:
        assert record.first_token is None and 0 < len(record.token_times) < 30
        assert record.finished == record.token_times[-1]
    assert_exact([r for r in whole if not r.num_preemptions],
                 [q for q, r in zip(requests, whole, strict=True) if not r.num_preemptions])


def test_hf_continuous_records_a_failed_request_and_goes_on(model: PreTrainedModel,
                                                            cpu_cache_budget: None) -> None:
    # 40 tokens need 3 blocks of 16; with 2 blocks the scheduler can never place the long request, so
    # HF fails it (or the whole loop); either way the run returns records instead of raising.
    requests = [PeerRequest(0, (3,) * 30, 10), PeerRequest(1, (4,) * 4, 3)]
    records, _ = hf_peers.run_hf_continuous(model, requests, progress=False, num_blocks=2, block_size=16,
                                            max_batch_tokens=64)
    assert [r.index for r in records] == [0, 1]
    assert not records[0].ok and records[0].error


# --- the command line ------------------------------------------------------------------------------

def test_cli_runs_each_rate_and_writes_a_bench_report_result(model_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "static.json"
    code = hf_peers.main(["--system", "hf-static", "--model", str(model_dir), "--dtype", "float32",
                          "--device", "cpu", "--trace", "fixed", "--num-requests", "3", "--prompt-len", "4",
                          "--output-len", "5", "--batch-size", "2", "--request-rate", "inf,100",
                          "--no-progress", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "output tok/s" in table and "| hf-static | offline" in table and "| hf-static | 100" in table
    report = json.loads(out.read_text())
    assert report["system"] == "hf-static"
    assert [run["request_rate"] for run in report["runs"]] == ["inf", 100.0]    # bench_report's strict JSON
    assert all(run["client"]["completed"] == 3 and run["client"]["output_tokens"] == 15
               for run in report["runs"])
    assert "summary" not in report                                 # only a single-rate run has one
    assert report["workload"]["trace"] == "fixed" and report["workload"]["request_rates"] == ["inf", 100.0]
    assert report["model"]["max_model_len"] == 128                 # the config's max_position_embeddings
    assert report["environment"]["transformers"] and report["environment"]["device"] == "cpu"
    # The benchmark suite reads it with the report tools, next to our server's results.
    results = bench_report.load_results([out])
    assert bench_report.markdown(results).count("| hf-static") == 2


def test_cli_single_rate_has_the_summary(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "static.json"
    assert hf_peers.main(["--system", "hf-static", "--model", str(model_dir), "--dtype", "float32",
                          "--device", "cpu", "--trace", "fixed", "--num-requests", "2", "--prompt-len", "3",
                          "--output-len", "2", "--no-progress", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"] == report["runs"][0]["client"] and report["summary"]["completed"] == 2
    assert report["config"]["request_rate"] == ["inf"]


def test_requests_match_the_load_generator() -> None:
    loadgen = pytest.importorskip("clients.loadgen")        # needs the gRPC client stack
    for fields in ({"trace": "sharegpt", "num_requests": 30, "seed": 2},
                   {"trace": "alpaca", "num_requests": 30, "seed": 0, "request_rate": 4.0, "burstiness": 0.5},
                   {"trace": "fixed", "num_requests": 4, "prompt_len": 50, "output_len": 9}):
        spec = loadgen.WorkloadSpec(**fields)
        ours = hf_peers.build_requests(spec.trace, spec.num_requests, spec.seed, VOCAB, 64,
                                       request_rate=spec.request_rate, burstiness=spec.burstiness,
                                       prompt_len=spec.prompt_len, output_len=spec.output_len)
        theirs = loadgen.build_load_requests(spec, VOCAB, 64)
        assert [(r.index, r.prompt_token_ids, r.output_len, r.arrival_time) for r in ours] == [
            (r.index, r.prompt_token_ids, r.output_len, r.arrival_time) for r in theirs]
