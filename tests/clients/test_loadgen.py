"""The load generator: workload validation, seeded requests that fit the model (or are refused), dataset
requests, and runs on a real stack."""

from __future__ import annotations

import asyncio
import io
import itertools
import math
import statistics

import pytest
from small_stack import running_small_stack
from tqdm import tqdm

from clients.bench_records import summarize
from clients.client import AsyncPagedServeClient
from clients.datasets import DatasetSample
from clients.loadgen import (
    LoadGenerator,
    LoadRequest,
    WorkloadSpec,
    build_load_requests,
    run_workload,
    sampling_arguments,
    trace_of,
)
from clients.request_builder import build_generate_request
from clients.traces import alpaca_like, sharegpt_like, with_poisson_arrivals
from pagedserve.errors import InvalidArgumentError

VOCAB = 4096


# ---- WorkloadSpec --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("changes", "field"), [
    ({"trace": "bogus"}, "trace"),
    ({"num_requests": 0}, "num_requests"),
    ({"prompt_len": 0}, "prompt_len"),
    ({"output_len": 0}, "output_len"),
    ({"n": 0}, "n"),
    ({"beam_width": -1}, "beam_width"),
    ({"shared_prefix_len": -1}, "shared_prefix_len"),
    ({"request_rate": 0.0}, "request_rate"),
    ({"request_rate": -2.0}, "request_rate"),
    ({"request_rate": math.nan}, "request_rate"),
    ({"burstiness": 0.0}, "burstiness"),
    ({"burstiness": math.nan}, "burstiness"),
])
def test_workload_spec_rejects_a_bad_field_naming_it(changes, field):
    with pytest.raises(InvalidArgumentError) as caught:
        WorkloadSpec(**changes)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_workload_spec_refuses_parallel_sampling_with_beam_search():
    with pytest.raises(InvalidArgumentError, match="exclusive") as caught:
        WorkloadSpec(n=2, beam_width=2)
    assert caught.value.field in ("n", "beam_width")


def test_workload_spec_offline_and_outputs_per_request():
    assert WorkloadSpec().offline and WorkloadSpec().num_outputs == 1
    assert not WorkloadSpec(request_rate=3.0).offline
    assert WorkloadSpec(n=4).num_outputs == 4
    assert WorkloadSpec(beam_width=3).num_outputs == 3


# ---- traces and requests -------------------------------------------------------------------------------

def test_trace_of_uses_the_named_seeded_trace_with_sharing():
    trace = trace_of(WorkloadSpec(trace="sharegpt", num_requests=20, n=3, seed=5))
    assert [(r.prompt_len, r.output_len) for r in trace] == [(r.prompt_len, r.output_len)
                                                             for r in sharegpt_like(20, seed=5)]
    assert {(r.n, r.beam_width, r.arrival_time) for r in trace} == {(3, 0, 0.0)}
    beams = trace_of(WorkloadSpec(trace="alpaca", num_requests=5, beam_width=2))
    assert [(r.prompt_len, r.output_len) for r in beams] == [(r.prompt_len, r.output_len)
                                                             for r in alpaca_like(5)]
    assert {(r.n, r.beam_width) for r in beams} == {(1, 2)}


def test_trace_of_fixed_has_the_given_lengths():
    trace = trace_of(WorkloadSpec(trace="fixed", num_requests=3, prompt_len=7, output_len=9))
    assert [(r.prompt_len, r.output_len, r.arrival_time) for r in trace] == [(7, 9, 0.0)] * 3


def test_trace_of_online_has_the_seeded_poisson_arrivals():
    spec = WorkloadSpec(trace="alpaca", num_requests=10, request_rate=4.0, burstiness=0.5, seed=2)
    expected = with_poisson_arrivals(alpaca_like(10, seed=2), 4.0, 0.5, seed=2)
    assert [r.arrival_time for r in trace_of(spec)] == [r.arrival_time for r in expected]


def test_synthetic_requests_are_drawn_to_fit_the_model_context_not_clipped():
    """prompt < max_model_len and prompt + output <= max_model_len, with the trace's own lengths."""
    spec = WorkloadSpec(trace="sharegpt", num_requests=200, seed=1)
    assert any(t.prompt_len + t.output_len > 300 for t in trace_of(spec))         # unlimited, some exceed
    requests = build_load_requests(spec, VOCAB, max_model_len=300)
    assert [(len(r.prompt_token_ids), r.output_len) for r in requests] == [
        (t.prompt_len, t.output_len) for t in trace_of(spec, max_model_len=300)]
    assert all(len(r.prompt_token_ids) + r.output_len <= 300 for r in requests)
    assert sum(len(r.prompt_token_ids) + r.output_len == 300 for r in requests) < 5     # no pile at the limit


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"prompt_len": 300, "output_len": 8}, "prompt_len", "a prompt of 300 tokens leaves no room"),
    ({"prompt_len": 200, "output_len": 101}, "output_len", "at most 100 output tokens fit"),
    ({"prompt_len": 4, "output_len": 8, "shared_prefix_len": 300}, "shared_prefix_len",
     "(300 of them the shared prefix)"),
])
def test_fixed_lengths_over_the_model_context_are_an_error(changes, field, words):
    spec = WorkloadSpec(trace="fixed", num_requests=2, **changes)
    with pytest.raises(InvalidArgumentError) as err:
        build_load_requests(spec, VOCAB, max_model_len=300)
    assert err.value.field == field and words in str(err.value)


def test_a_shared_prefix_filling_the_context_leaves_no_room_for_a_synthetic_trace():
    spec = WorkloadSpec(trace="alpaca", num_requests=2, shared_prefix_len=299)
    with pytest.raises(InvalidArgumentError) as err:
        build_load_requests(spec, VOCAB, max_model_len=300)
    assert err.value.field == "shared_prefix_len"


def test_dataset_requests_keep_the_dataset_tokens_behind_the_shared_prefix():
    samples = [DatasetSample((11, 12, 13, 14), 5), DatasetSample((21, 22, 23, 24, 25), 7)]
    spec = WorkloadSpec(trace="dataset", dataset_path="conversations.json", num_requests=2,
                        shared_prefix_len=3, request_rate=10.0)
    requests = build_load_requests(spec, VOCAB, 1024, samples)
    assert [r.prompt_token_ids[3:] for r in requests] == [(11, 12, 13, 14), (21, 22, 23, 24, 25)]
    assert requests[0].prompt_token_ids[:3] == requests[1].prompt_token_ids[:3]
    assert [r.output_len for r in requests] == [5, 7] and requests[1].arrival_time > 0
    with pytest.raises(InvalidArgumentError):
        WorkloadSpec(trace="dataset")                        # the dataset trace names its file
    with pytest.raises(InvalidArgumentError):
        WorkloadSpec(trace="fixed", dataset_path="conversations.json")


def test_requests_keep_trace_lengths_when_they_fit():
    spec = WorkloadSpec(trace="alpaca", num_requests=30, seed=3)
    requests = build_load_requests(spec, VOCAB, max_model_len=100_000)
    assert [(len(r.prompt_token_ids), r.output_len) for r in requests] == [
        (t.prompt_len, t.output_len) for t in trace_of(spec)]
    assert [r.index for r in requests] == list(range(30))


def test_a_two_token_context_takes_a_one_token_prompt_and_output():
    spec = WorkloadSpec(trace="fixed", num_requests=2, prompt_len=1, output_len=1)
    requests = build_load_requests(spec, VOCAB, max_model_len=2)
    assert [(len(r.prompt_token_ids), r.output_len) for r in requests] == [(1, 1), (1, 1)]


def test_prompt_tokens_are_in_the_vocabulary_clear_of_special_ids():
    requests = build_load_requests(WorkloadSpec(trace="alpaca", num_requests=50), 50, max_model_len=1024)
    ids = {t for r in requests for t in r.prompt_token_ids}
    assert min(ids) >= 3 and max(ids) < 50


def test_shared_prefix_is_identical_across_requests_and_lengthens_prompts():
    spec = WorkloadSpec(trace="alpaca", num_requests=8, shared_prefix_len=32, seed=4)
    requests = build_load_requests(spec, VOCAB, max_model_len=1024)
    assert len({r.prompt_token_ids[:32] for r in requests}) == 1
    assert len({r.prompt_token_ids[32:40] for r in requests if len(r.prompt_token_ids) >= 40}) > 1
    assert [len(r.prompt_token_ids) for r in requests] == [t.prompt_len + 32 for t in trace_of(spec)]


def test_requests_are_reproducible_from_the_seed():
    spec = WorkloadSpec(trace="sharegpt", num_requests=20, request_rate=5.0, seed=9)
    assert build_load_requests(spec, VOCAB, 1024) == build_load_requests(spec, VOCAB, 1024)
    other = build_load_requests(WorkloadSpec(trace="sharegpt", num_requests=20, request_rate=5.0, seed=10),
                                VOCAB, 1024)
    assert [r.prompt_token_ids for r in other] != [r.prompt_token_ids for r in
                                                   build_load_requests(spec, VOCAB, 1024)]


def test_offline_requests_all_arrive_at_zero():
    requests = build_load_requests(WorkloadSpec(trace="alpaca", num_requests=10), VOCAB, 1024)
    assert {r.arrival_time for r in requests} == {0.0}


def test_online_arrivals_increase_at_the_requested_mean_rate():
    requests = build_load_requests(WorkloadSpec(trace="alpaca", num_requests=2000, request_rate=8.0),
                                   VOCAB, 1024)
    arrivals = [r.arrival_time for r in requests]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert arrivals[0] == 0.0 and all(gap > 0 for gap in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.1)
    # Poisson: exponential gaps, whose standard deviation equals their mean.
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.15)


def test_lower_burstiness_gives_burstier_arrivals_at_the_same_rate():
    """Gamma gaps of shape k have a coefficient of variation 1/sqrt(k): 2 for burstiness 0.25."""
    requests = build_load_requests(WorkloadSpec(trace="alpaca", num_requests=4000, request_rate=8.0,
                                                burstiness=0.25), VOCAB, 1024)
    gaps = [b.arrival_time - a.arrival_time for a, b in itertools.pairwise(requests)]
    assert statistics.fmean(gaps) == pytest.approx(1 / 8.0, rel=0.1)
    assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(2.0, rel=0.15)


def test_requests_carry_the_sharing_shape():
    requests = build_load_requests(WorkloadSpec(trace="fixed", num_requests=2, beam_width=4), VOCAB, 1024)
    assert {(r.n, r.beam_width) for r in requests} == {(1, 4)}
    requests = build_load_requests(WorkloadSpec(trace="fixed", num_requests=2, n=6), VOCAB, 1024)
    assert {(r.n, r.beam_width) for r in requests} == {(6, 0)}


# ---- sampling arguments --------------------------------------------------------------------------------

def test_sampling_arguments_of_parallel_sampling_are_exact_and_seeded():
    args = sampling_arguments(LoadRequest(7, (5, 6), output_len=33, n=2), seed=3)
    assert args == {"max_tokens": 33, "ignore_eos": True, "seed": 3 * 1_000_003 + 7, "n": 2,
                    "temperature": 1.0}


def test_sampling_arguments_of_beam_search_are_greedy_and_exact():
    args = sampling_arguments(LoadRequest(0, (5,), output_len=9, beam_width=4), seed=0)
    assert {k: args[k] for k in ("max_tokens", "ignore_eos", "seed", "beam_width", "temperature")} == {
        "max_tokens": 9, "ignore_eos": True, "seed": 0, "beam_width": 4, "temperature": 0.0}


def test_sampling_arguments_of_beam_search_ask_for_every_beam():
    """The record counts beam_width outputs, so the request must ask the server for n = beam_width."""
    args = sampling_arguments(LoadRequest(0, (5,), output_len=9, beam_width=4), seed=0)
    assert args.get("n", 1) == 4


def test_sampling_arguments_make_a_valid_generate_request():
    request = LoadRequest(1, (5, 6, 7), output_len=12, beam_width=2)
    message = build_generate_request(list(request.prompt_token_ids), "r", **sampling_arguments(request, 1))
    assert (message.sampling.max_tokens, message.sampling.ignore_eos) == (12, True)
    assert (message.sampling.beam_width, message.sampling.temperature) == (2, 0.0)
    assert list(message.token_ids.ids) == [5, 6, 7]


# ---- LoadGenerator on a real stack ---------------------------------------------------------------------

stack = pytest.fixture(scope="module", name="stack")(running_small_stack)


@pytest.fixture(scope="module")
def model_shape(stack) -> tuple[int, int]:
    """The served model's vocabulary size and context length."""
    with stack.client() as client:
        info = client.model_info()
    return info.vocab_size, info.max_model_len


async def generate_all(target: str, requests: list[LoadRequest], progress: tqdm | None = None):
    async with AsyncPagedServeClient(target) as client:
        return await LoadGenerator(client, requests, seed=1, progress=progress).run()


def test_offline_run_records_every_token_of_every_request(stack, model_shape):
    spec = WorkloadSpec(trace="fixed", num_requests=4, prompt_len=8, output_len=6)
    requests = build_load_requests(spec, *model_shape)
    records, duration = asyncio.run(generate_all(stack.target, requests))
    assert [r.index for r in records] == [0, 1, 2, 3]
    for r in records:
        assert r.ok, r.error
        assert (r.prompt_len, r.output_len, r.output_tokens, r.num_outputs) == (8, 6, 6, 1)
        assert len(r.token_times) == 6 and r.token_times == sorted(r.token_times)
        assert r.arrival == 0.0 and r.first_token == r.token_times[0] and r.finished >= r.token_times[-1]
    assert duration == max(r.finished for r in records)
    assert summarize(records, duration).output_tokens == 24


def test_parallel_samples_count_every_output_and_time_output_zero(stack, model_shape):
    spec = WorkloadSpec(trace="fixed", num_requests=2, prompt_len=5, output_len=7, n=3)
    records, _ = asyncio.run(generate_all(stack.target, build_load_requests(spec, *model_shape)))
    outcome = [(r.ok, r.output_tokens, r.num_outputs, len(r.token_times)) for r in records]
    assert outcome == [(True, 21, 3, 7)] * 2


def test_beam_search_counts_every_beam(stack, model_shape):
    spec = WorkloadSpec(trace="fixed", num_requests=2, prompt_len=5, output_len=4, beam_width=2)
    records, _ = asyncio.run(generate_all(stack.target, build_load_requests(spec, *model_shape)))
    assert [(r.ok, r.output_tokens, r.num_outputs) for r in records] == [(True, 8, 2)] * 2


def test_online_requests_are_not_sent_before_their_arrival(stack, model_shape):
    spec = WorkloadSpec(trace="fixed", num_requests=5, prompt_len=4, output_len=3, request_rate=25.0, seed=2)
    requests = build_load_requests(spec, *model_shape)
    records, duration = asyncio.run(generate_all(stack.target, requests))
    assert all(r.ok for r in records)
    assert [r.arrival for r in records] == [r.arrival_time for r in requests]
    assert all(r.first_token > r.arrival for r in records)
    assert duration > requests[-1].arrival_time > 0


def test_a_refused_request_is_recorded_as_failed_and_the_others_finish(stack, model_shape):
    _, max_model_len = model_shape
    fine = LoadRequest(0, (5, 6, 7), output_len=3)
    too_long = LoadRequest(1, tuple([5] * (max_model_len + 10)), output_len=3)
    stream = io.StringIO()
    bar = tqdm(total=2, desc="t", file=stream)
    records, _ = asyncio.run(generate_all(stack.target, [fine, too_long], bar))
    assert records[0].ok and records[0].output_tokens == 3
    assert not records[1].ok and records[1].error and records[1].output_tokens == 0
    assert records[1].error_code == "INVALID_ARGUMENT"
    summary = summarize(records, 1.0)
    assert (summary.completed, summary.failed) == (1, 1)
    assert summary.failures_by_code == {"INVALID_ARGUMENT": 1}
    assert [(f.request, f.code) for f in summary.failures] == [(1, "INVALID_ARGUMENT")]
    assert summary.failures[0].message == records[1].error
    last = stream.getvalue().split("\r")[-1]
    assert last.startswith("t: 100%") and "2/2" in last and "1 failed" in last


def test_run_workload_opens_its_own_client(stack, model_shape):
    spec = WorkloadSpec(trace="alpaca", num_requests=3, seed=6)
    requests = build_load_requests(spec, *model_shape)
    records, duration = asyncio.run(run_workload(stack.target, requests, seed=6, show_progress=False))
    assert [r.output_tokens for r in records] == [r.output_len for r in requests]
    assert duration > 0


def test_run_workload_spreads_requests_over_many_clients(stack, model_shape):
    spec = WorkloadSpec(trace="fixed", num_requests=6, prompt_len=4, output_len=3, seed=7)
    requests = build_load_requests(spec, *model_shape)
    records, _ = asyncio.run(run_workload(stack.target, requests, seed=7, show_progress=False, num_clients=3))
    assert [(r.ok, r.output_tokens) for r in records] == [(True, 3)] * 6
    with pytest.raises(InvalidArgumentError, match="num_clients"):
        asyncio.run(run_workload(stack.target, requests, num_clients=0))
