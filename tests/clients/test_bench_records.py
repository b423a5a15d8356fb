"""RequestRecord timelines, percentiles and the client summary of a run, on hand-made timelines."""

from __future__ import annotations

import math

import pytest

from clients.bench_records import Percentiles, RequestRecord, percentile, summarize


def test_record_is_ok_only_when_finished_without_error():
    assert RequestRecord(0, 4, 2, finished=1.0).ok
    assert not RequestRecord(0, 4, 2).ok
    assert not RequestRecord(0, 4, 2, finished=1.0, error="boom").ok


def test_latency_counts_from_the_trace_arrival():
    assert RequestRecord(0, 4, 2, arrival=1.25, finished=3.5).latency == 2.25


def test_time_per_output_token_spreads_the_time_after_the_first_token():
    record = RequestRecord(0, 4, 5, first_token=1.0, finished=3.0)
    assert record.time_per_output_token() == 0.5


def test_time_per_output_token_is_none_without_a_second_token_or_a_first_token():
    assert RequestRecord(0, 4, 1, first_token=1.0, finished=1.0).time_per_output_token() is None
    assert RequestRecord(0, 4, 3, finished=2.0).time_per_output_token() is None
    assert RequestRecord(0, 4, 3, first_token=1.0).time_per_output_token() is None


def test_inter_token_latencies_are_the_gaps_and_tokens_arriving_together_give_zero():
    record = RequestRecord(0, 4, 4, token_times=[1.0, 1.5, 1.5, 2.25])
    assert record.inter_token_latencies() == [0.5, 0.0, 0.75]
    assert RequestRecord(0, 4, 1, token_times=[1.0]).inter_token_latencies() == []


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([1.0, 2.0, 3.0, 4.0], 99, 3.97),
    ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
    ([1.0, 2.0, 3.0, 4.0], 25, 1.75),
    ([10.0, 20.0, 40.0], 75, 30.0),
    ([7.0], 99, 7.0),
])
def test_percentile_interpolates_linearly_like_numpy(values, q, expected):
    assert percentile(values, q) == pytest.approx(expected, rel=1e-12)


def test_percentile_of_nothing_is_nan():
    assert math.isnan(percentile([], 50))


def test_percentiles_of_seconds_are_in_milliseconds_and_sort_their_input():
    p = Percentiles.of([0.004, 0.001, 0.003, 0.002])
    assert p.mean_ms == pytest.approx(2.5)
    assert p.p50_ms == pytest.approx(2.5)
    assert p.p99_ms == pytest.approx(3.97)


def test_percentiles_of_no_samples_are_nan():
    p = Percentiles.of([])
    assert math.isnan(p.mean_ms) and math.isnan(p.p50_ms) and math.isnan(p.p99_ms)


def two_done_two_failed() -> list[RequestRecord]:
    """Two finished requests with known timelines and two failed ones that must not count."""
    return [
        RequestRecord(0, prompt_len=10, output_len=4, arrival=0.0, first_token=1.0, finished=4.0,
                      token_times=[1.0, 2.0, 3.0, 4.0], output_tokens=4, num_preemptions=1),
        RequestRecord(1, prompt_len=20, output_len=2, num_outputs=2, arrival=1.0, first_token=1.5,
                      finished=4.0, token_times=[1.5, 4.0], output_tokens=4),
        RequestRecord(2, prompt_len=100, output_len=7, arrival=0.5, first_token=0.7, error="boom",
                      token_times=[0.7, 0.9], output_tokens=7, num_preemptions=5),
        RequestRecord(3, prompt_len=100, output_len=7, first_token=0.2, finished=9.0, error="late error",
                      token_times=[0.2, 9.0], output_tokens=7, num_preemptions=5),
    ]


def test_summarize_counts_only_finished_requests():
    s = summarize(two_done_two_failed(), duration_s=4.0)
    assert (s.completed, s.failed) == (2, 2)
    assert (s.output_tokens, s.prompt_tokens, s.preemptions) == (8, 30, 1)
    assert s.duration_s == 4.0


def test_summarize_throughputs_divide_by_the_duration():
    s = summarize(two_done_two_failed(), duration_s=4.0)
    assert s.requests_per_s == pytest.approx(0.5)
    assert s.output_tokens_per_s == pytest.approx(2.0)
    assert s.total_tokens_per_s == pytest.approx(9.5)


def test_summarize_latencies_match_the_timelines():
    """Normalized latency is mean(latency / output_len); TTFT, TPOT, ITL are from the finished requests."""
    s = summarize(two_done_two_failed(), duration_s=4.0)
    assert s.normalized_latency_s == pytest.approx((4.0 / 4 + 3.0 / 2) / 2)
    assert s.mean_latency_s == pytest.approx(3.5)
    assert (s.ttft.mean_ms, s.ttft.p50_ms, s.ttft.p99_ms) == pytest.approx((750.0, 750.0, 995.0))
    assert (s.tpot.mean_ms, s.tpot.p50_ms, s.tpot.p99_ms) == pytest.approx((1750.0, 1750.0, 2485.0))
    # gaps 1, 1, 1 (request 0) and 2.5 (request 1): sorted [1000, 1000, 1000, 2500] ms
    assert (s.itl.mean_ms, s.itl.p50_ms, s.itl.p99_ms) == pytest.approx((1375.0, 1000.0, 2455.0))


def test_summarize_of_nothing_finished_has_zero_rates_and_nan_latencies():
    s = summarize([RequestRecord(0, 4, 2, error="refused")], duration_s=0.0)
    assert (s.completed, s.failed, s.output_tokens) == (0, 1, 0)
    assert s.requests_per_s == 0.0 and s.output_tokens_per_s == 0.0
    assert math.isnan(s.normalized_latency_s) and math.isnan(s.mean_latency_s)
    assert math.isnan(s.ttft.p50_ms) and math.isnan(s.tpot.p99_ms) and math.isnan(s.itl.mean_ms)
