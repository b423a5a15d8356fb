"""Every SamplingParams validation accepts crosses the executor wire meaning what it meant.

SequenceStart carries float32 and uint32 fields: a temperature or repetition penalty beyond float32 would
arrive as inf, a top_p below it as 0 (both outside what an executor accepts), and a top_k past uint32
could not be encoded at all. The codec saturates them; the scheduler sends no stop token id outside the
vocabulary for suppression (it can never be sampled). Torch-free, like the scheduler.
"""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.contract.plan import SequenceStart, SequenceWork, StepPlan
from pagedserve.contract.plan_codec import plan_from_proto, plan_to_proto
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.sampling_params import SamplingParams
from scheduler_svc.scheduler import Scheduler
from tests.sampling_strategies import FLOAT32_MAX, FLOAT64_MAX, accepted_sampling_params, as_float32

VOCAB = 1000
TINY = 2.0**-126


def over_the_wire(start: SequenceStart) -> SequenceStart:
    """The start as an executor decodes it."""
    plan = StepPlan(1, sequences=[SequenceWork(1, [5], 0, 0, [0], 1, 0, start)])
    decoded = plan_from_proto(plan_to_proto(plan)).sequences[0].start
    assert decoded is not None
    return decoded


def start_with(**fields: object) -> SequenceStart:
    """A SequenceStart with these sampling fields."""
    return SequenceStart(request_id="r", num_prompt_tokens=1, seed=0, sample_index=0, **fields)  # type: ignore[arg-type]


def test_values_past_float32_saturate_and_tiny_ones_stay_positive() -> None:
    for huge in (FLOAT32_MAX, 1e39, 1e300, FLOAT64_MAX):
        got = over_the_wire(start_with(temperature=huge, repetition_penalty=huge))
        assert (got.temperature, got.repetition_penalty) == (FLOAT32_MAX, FLOAT32_MAX)
    for tiny in (5e-324, 1e-300, 1e-45):
        got = over_the_wire(start_with(top_p=tiny, repetition_penalty=tiny))
        assert got.top_p == got.repetition_penalty == TINY
    assert over_the_wire(start_with(temperature=1e-300)).temperature == 0.0      # the limit: greedy
    assert over_the_wire(start_with(top_k=2**63)).top_k == 2**32 - 1             # >= the vocabulary: off


def test_ordinary_values_cross_unchanged_but_for_float32_rounding() -> None:
    got = over_the_wire(start_with(temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.3))
    assert (got.temperature, got.top_p, got.repetition_penalty) == tuple(map(as_float32, (0.7, 0.9, 1.3)))
    assert got.top_k == 40


def scheduled_starts(params: list[SamplingParams]) -> list[SequenceStart]:
    """The SequenceStart of every request's first step, as an executor decodes it."""
    scheduler = Scheduler(SchedulerConfig(block_size=16, max_num_batched_tokens=2048), 256, 0, 2048,
                          eos_token_ids=[2], vocab_size=VOCAB, seed=0)
    for i, p in enumerate(params):
        scheduler.add_request(f"r{i}", [3, 4, 5], p)
    starts = [w.start for w in plan_from_proto(plan_to_proto(scheduler.schedule())).sequences]
    assert all(s is not None for s in starts)
    return starts  # type: ignore[return-value]


def test_stop_token_ids_outside_the_vocabulary_are_not_suppressed() -> None:
    (start,) = scheduled_starts([SamplingParams(min_tokens=4, stop_token_ids=frozenset({7, VOCAB, 2**40}))])
    assert start.suppressed_token_ids == (2, 7)


@settings(max_examples=200, deadline=None)
@given(st.lists(accepted_sampling_params(max_sequences=4), min_size=1, max_size=4))
def test_every_accepted_parameter_set_arrives_in_the_executors_ranges(params: list[SamplingParams]) -> None:
    for start in scheduled_starts(params):
        assert 0.0 <= start.temperature <= FLOAT32_MAX
        assert 0.0 < start.top_p <= 1.0
        assert 0.0 <= start.min_p <= 1.0
        assert 0.0 < start.repetition_penalty <= FLOAT32_MAX
        assert math.isfinite(start.presence_penalty) and math.isfinite(start.frequency_penalty)
        assert 0 <= start.top_k < 2**32
        assert all(0 <= t < VOCAB for t in start.suppressed_token_ids)
