"""Synthetic traces have the shapes the benchmarks claim."""

import itertools
import statistics

import pytest

from clients.traces import (
    alpaca_like,
    fixed_trace,
    prompt_token_ids,
    sharegpt_like,
    with_poisson_arrivals,
    with_sharing,
)


def test_sharegpt_like_means_and_caps():
    trace = sharegpt_like(20000, seed=1)
    prompts = [r.prompt_len for r in trace]
    outputs = [r.output_len for r in trace]
    # Capping at 1024 trims the lognormal's tail a little below the target means.
    assert 140 < statistics.fmean(prompts) < 170
    assert 290 < statistics.fmean(outputs) < 345
    assert max(prompts) <= 1024 and max(outputs) <= 1024 and min(prompts) >= 1
    assert sharegpt_like(50, seed=1) == trace[:50]                 # seeded and prefix-stable


def test_alpaca_like_is_short():
    trace = alpaca_like(20000, seed=2)
    assert 17 < statistics.fmean(r.prompt_len for r in trace) < 21
    assert 53 < statistics.fmean(r.output_len for r in trace) < 62


def test_poisson_arrivals_have_the_requested_rate():
    trace = with_poisson_arrivals(fixed_trace(5000, 8, 8), rate=20.0, seed=3)
    times = [r.arrival_time for r in trace]
    assert times == sorted(times) and times[0] == 0.0
    assert times[-1] / len(times) == pytest.approx(1 / 20.0, rel=0.05)
    bursty = with_poisson_arrivals(fixed_trace(5000, 8, 8), rate=20.0, burstiness=0.2, seed=3)
    gaps = [b.arrival_time - a.arrival_time for a, b in itertools.pairwise(bursty)]
    assert statistics.pstdev(gaps) > 2 * (1 / 20.0)                # gamma(0.2) is far burstier
    with pytest.raises(ValueError):
        with_poisson_arrivals(trace, rate=0.0)


def test_sharing_and_prompt_tokens():
    trace = with_sharing(fixed_trace(3, 4, 5), n=4)
    assert {r.n for r in trace} == {4}
    tokens = prompt_token_ids(7, 100, 1000, seed=1)
    assert len(tokens) == 100 and min(tokens) >= 3 and max(tokens) < 1000
    assert tokens == prompt_token_ids(7, 100, 1000, seed=1) != prompt_token_ids(8, 100, 1000, seed=1)


def test_a_context_limit_redraws_pairs_that_do_not_fit_instead_of_clipping_them():
    trace = sharegpt_like(2000, seed=5, max_total_len=300)
    assert len(trace) == 2000 and all(r.prompt_len + r.output_len <= 300 for r in trace)
    totals = [r.prompt_len + r.output_len for r in trace]
    assert totals.count(300) < 20                # clipping would pile hundreds up at the limit
    assert sharegpt_like(200, seed=5, max_total_len=4096) == sharegpt_like(200, seed=5)   # all fit
    with pytest.raises(ValueError, match="at least 2"):
        alpaca_like(3, max_total_len=1)
