"""Hypothesis strategies over the SamplingParams the service accepts: every field anywhere in its validated
range, the extreme ends (the smallest subnormal, float32's and float64's largest values) drawn often."""

from __future__ import annotations

import math
import struct
import sys

from hypothesis import strategies as st

from scheduler_svc.sampling_params import (
    MAX_BEAM_WIDTH,
    MAX_BEST_OF,
    MAX_LENGTH_PENALTY,
    MAX_LOGPROBS,
    SamplingParams,
)

FLOAT64_MAX = sys.float_info.max
FLOAT32_MAX = 3.4028234663852886e38
SMALLEST_SUBNORMAL = 5e-324

# Validated ranges: temperature >= 0 and finite; repetition_penalty > 0 and finite; top_p in (0, 1];
# min_p in [0, 1]; top_k >= 0; presence and frequency penalties in [-2, 2].
TEMPERATURE_EDGES = (0.0, SMALLEST_SUBNORMAL, 1e-45, 1e-38, 1e-5, 0.7, 1.0, 2.0, FLOAT32_MAX, 1e300,
                     FLOAT64_MAX)
REPETITION_EDGES = (SMALLEST_SUBNORMAL, 1e-45, 1e-38, 1e-5, 0.5, 1.0, 1.3, 1e5, 1e38, FLOAT32_MAX, 1e300,
                    FLOAT64_MAX)
TOP_P_EDGES = (SMALLEST_SUBNORMAL, 1e-300, 1e-45, 1e-38, 1e-5, 0.5, 0.9, 1.0)
MIN_P_EDGES = (0.0, SMALLEST_SUBNORMAL, 1e-38, 0.05, 0.5, 1.0)
TOP_K_EDGES = (0, 1, 2, 40, 4095, 4096, 4097, 2**31 - 1, 2**32 - 1, 2**32, 2**63)
PENALTY_EDGES = (-2.0, -1e-38, 0.0, 1e-38, 0.5, 2.0)


def as_float32(value: float) -> float:
    """value rounded to float32, as the client API's float fields carry it."""
    return struct.unpack("f", struct.pack("f", value))[0] if abs(value) <= FLOAT32_MAX else math.inf


def _edged_floats(edges: tuple[float, ...], low: float, high: float, exclude_low: bool = False,
                  width: int = 64) -> st.SearchStrategy[float]:
    """Floats in [low, high] (or (low, high]), the given edge values drawn about half the time.

    width 32: only values a float32 field holds inside the range (the client API's domain).
    """
    if width == 32:
        edges = tuple(e for e in map(as_float32, edges)
                      if (low < e if exclude_low else low <= e) and e <= high)
        high = min(high, FLOAT32_MAX)
    inside = st.floats(low, high, exclude_min=exclude_low, allow_nan=False, allow_infinity=False,
                       allow_subnormal=True, width=width)
    return st.one_of(st.sampled_from(edges), inside)


@st.composite
def accepted_sampling_params(draw: st.DrawFn, max_sequences: int = MAX_BEST_OF, max_tokens: int = 64,
                             api: bool = False) -> SamplingParams:
    """A SamplingParams that validation accepts: sampled, greedy or beam search, every filter and
    penalty anywhere in its range. `max_sequences` caps n, best_of and beam_width, `max_tokens` the
    output length (a served stack's budget). With `api`, only what the client API can carry: float32
    floats, uint32 top_k and stop token ids.
    """
    width, uint_max = (32, 2**32 - 1) if api else (64, 2**63)

    def floats(edges: tuple[float, ...], low: float, high: float, exclude_low: bool = False) -> float:
        return draw(_edged_floats(edges, low, high, exclude_low, width))

    beam = draw(st.integers(0, 4)) == 0
    tokens = draw(st.integers(1, max_tokens))
    common = dict(
        repetition_penalty=floats(REPETITION_EDGES, 0.0, FLOAT64_MAX, exclude_low=True),
        presence_penalty=floats(PENALTY_EDGES, -2.0, 2.0), frequency_penalty=floats(PENALTY_EDGES, -2.0, 2.0),
        seed=draw(st.one_of(st.none(), st.sampled_from((0, 2**63 - 1)), st.integers(0, 2**63 - 1))),
        max_tokens=tokens, min_tokens=draw(st.integers(0, tokens)),
        stop_token_ids=draw(st.frozensets(st.one_of(st.integers(0, 8), st.integers(0, min(uint_max, 2**40))),
                                          max_size=4)),
        ignore_eos=draw(st.booleans()), logprobs=draw(st.integers(0, MAX_LOGPROBS)),
        stop=tuple(draw(st.lists(st.text(min_size=1, max_size=6), max_size=2))),
        include_stop_str_in_output=draw(st.booleans()))
    if beam:
        beams = draw(st.integers(1, min(max_sequences, MAX_BEAM_WIDTH)))
        return SamplingParams(n=draw(st.integers(1, beams)), beam_width=beams, temperature=0.0,
                              length_penalty=floats((-MAX_LENGTH_PENALTY, 0.0, 1.0, MAX_LENGTH_PENALTY),
                                                    -MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY),
                              early_stopping=draw(st.sampled_from((False, True, "never"))), **common)
    n = draw(st.integers(1, max_sequences))
    best_of = draw(st.one_of(st.none(), st.integers(n, max_sequences)))
    return SamplingParams(
        n=n, best_of=best_of, temperature=floats(TEMPERATURE_EDGES, 0.0, FLOAT64_MAX),
        top_p=floats(TOP_P_EDGES, 0.0, 1.0, exclude_low=True),
        top_k=draw(st.one_of(st.sampled_from([k for k in TOP_K_EDGES if k <= uint_max]),
                             st.integers(0, uint_max))),
        min_p=floats(MIN_P_EDGES, 0.0, 1.0), **common)
