"""Sampling parameter validation names the offending field."""

import math

import pytest

from pagedserve.errors import InvalidArgumentError
from scheduler_svc.sampling_params import SamplingParams


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"n": 0}, "n"),
    ({"n": 2, "best_of": 1}, "best_of"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"seed": -1}, "seed"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"stop": ("",)}, "stop"),
    ({"stop": tuple(f"s{i}" for i in range(17))}, "stop"),
    ({"stop": ("x" * 257,)}, "stop"),
    ({"stop_token_ids": frozenset({-3})}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"beam_width": -1}, "beam_width"),
    ({"beam_width": 2, "n": 3, "temperature": 0.0}, "n"),
    ({"beam_width": 2, "temperature": 0.7}, "temperature"),
    ({"beam_width": 2, "temperature": 0.0, "best_of": 2}, "best_of"),
    ({"length_penalty": math.nan, "beam_width": 2, "temperature": 0.0}, "length_penalty"),
    ({"length_penalty": 3.4e38, "beam_width": 2, "temperature": 0.0}, "length_penalty"),
    ({"length_penalty": -10.5, "beam_width": 2, "temperature": 0.0}, "length_penalty"),
    ({"early_stopping": "always", "beam_width": 2, "temperature": 0.0}, "early_stopping"),
    ({"early_stopping": 1, "beam_width": 2, "temperature": 0.0}, "early_stopping"),
    ({"early_stopping": True}, "early_stopping"),               # only beam search reads it
    ({"early_stopping": "never"}, "early_stopping"),
])
def test_bad_value_names_its_field(kwargs, field):
    with pytest.raises(InvalidArgumentError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_derived_widths():
    assert SamplingParams().num_sequences == 1
    assert SamplingParams(n=3).num_sequences == 3
    best_of = SamplingParams(n=2, best_of=5)
    assert best_of.num_sequences == 5 and not best_of.streams_incrementally
    beam = SamplingParams(n=2, beam_width=4, temperature=0.0, logprobs=3)
    assert beam.use_beam_search and beam.num_sequences == 4
    assert beam.num_top_logprobs_needed == 8 and not beam.streams_incrementally
    assert SamplingParams(n=3).streams_incrementally


@pytest.mark.parametrize("mode", [True, False, "never"])
def test_early_stopping_takes_the_hf_values_with_beam_search(mode):
    assert SamplingParams(beam_width=2, temperature=0.0, early_stopping=mode).early_stopping == mode
    assert SamplingParams(early_stopping=False).early_stopping is False      # the default, accepted anywhere


def test_params_are_frozen_and_comparable():
    a, b = SamplingParams(temperature=0.5), SamplingParams(temperature=0.5)
    assert a == b
    with pytest.raises(AttributeError):
        a.temperature = 1.0
