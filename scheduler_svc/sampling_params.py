"""Sampling parameters of one request, validated once at admission."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pagedserve.errors import InvalidArgumentError

# Top-k logprobs a request may ask for; beam search asks the executor for 2 x width on its own.
MAX_LOGPROBS = 20
MAX_BEAM_WIDTH = 64
MAX_BEST_OF = 64
# Beam scores divide by length ** length_penalty: within +-10 that stays a finite, non-zero float for
# any length below 2^32 (a penalty of 100 overflows it at 1,000 tokens).
MAX_LENGTH_PENALTY = 10.0
# Stop strings are matched by every output's detokenizer, which holds each one's every prefix: their
# number and length bound that memory and the per-token work (a 100,000-character one took seconds).
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256

# When beam search ends, as in HF transformers (see scheduler_svc/beam_search.py): True, False or "never".
EarlyStopping = bool | Literal["never"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to decode one request; the field names match `pagedserve.v1.SamplingParameters`.

    `n` outputs are returned. With `best_of > n`, `best_of` sequences are sampled and the `n` with the
    highest cumulative logprob are returned. With `beam_width > 0` the request runs beam search with
    that many beams and returns the `n` best finished hypotheses by length-penalised score;
    `early_stopping` (True, False or "never", as in HF transformers) says when the search ends, and is
    refused without beam search unless False.
    `top_k = 0` and `top_p = 1` disable those filters; `temperature = 0` is greedy.
    `seed = None` lets the scheduler pick one at admission, so that a request's output stays the same
    across preemption, swap and recomputation (DESIGN.md invariant 5).
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    logprobs: int = 0
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False
    priority: int = 0

    # Derived once at construction (the scheduler reads them for every sequence every step).
    num_sequences: int = field(init=False, repr=False, compare=False)
    use_beam_search: bool = field(init=False, repr=False, compare=False)
    streams_incrementally: bool = field(init=False, repr=False, compare=False)
    num_top_logprobs_needed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)
        beam = self.beam_width > 0
        width = self.beam_width if beam else (self.best_of if self.best_of is not None else self.n)
        derived = {
            # How many sequences the request runs at once at its widest (best_of, or the beam width).
            "num_sequences": width,
            "use_beam_search": beam,
            # Beam search and best_of > n only know which sequences they return once they finish.
            "streams_incrementally": not beam and width == self.n,
            # Top-k logprobs the executor returns per step: beam search needs 2 x width candidates.
            "num_top_logprobs_needed": max(self.logprobs, 2 * self.beam_width),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


def sampling_params_from_fields(values: Mapping[str, object]) -> SamplingParams:
    """SamplingParams from the fields a client set, named as SamplingParams names them.

    The one construction every frontend (gRPC and the OpenAI HTTP API) goes through, so that an unset
    field means the same everywhere: it takes the SamplingParams default, except that beam search
    defaults temperature to 0 (it is greedy, and refuses any other temperature). `stop` and
    `stop_token_ids` take any iterable. Raises InvalidArgumentError naming the first bad field.
    """
    # Any: each field's type is checked by SamplingParams' own validation, which names the bad field.
    fields: dict[str, Any] = dict(values)
    if "temperature" not in fields and fields.get("beam_width"):
        fields["temperature"] = 0.0
    if "stop" in fields:
        fields["stop"] = tuple(fields["stop"])
    if "stop_token_ids" in fields:
        fields["stop_token_ids"] = frozenset(fields["stop_token_ids"])
    return SamplingParams(**fields)


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise InvalidArgumentError(name, message)


def _validate(p: SamplingParams) -> None:
    """Check every field, raising InvalidArgumentError that names the first bad one."""
    _require(p.n >= 1, "n", f"must be at least 1, got {p.n}")
    if p.best_of is not None:
        _require(p.best_of >= p.n, "best_of", f"must be at least n ({p.n}), got {p.best_of}")
        _require(p.best_of <= MAX_BEST_OF, "best_of", f"must be at most {MAX_BEST_OF}, got {p.best_of}")
    _require(p.n <= MAX_BEST_OF, "n", f"must be at most {MAX_BEST_OF}, got {p.n}")
    _require(math.isfinite(p.temperature) and p.temperature >= 0.0, "temperature",
             f"must be a finite number >= 0, got {p.temperature}")
    _require(0.0 < p.top_p <= 1.0, "top_p", f"must be in (0, 1], got {p.top_p}")
    _require(p.top_k >= 0, "top_k", f"must be >= 0 (0 disables it), got {p.top_k}")
    _require(0.0 <= p.min_p <= 1.0, "min_p", f"must be in [0, 1], got {p.min_p}")
    _require(math.isfinite(p.repetition_penalty) and p.repetition_penalty > 0.0, "repetition_penalty",
             f"must be > 0 (1 disables it), got {p.repetition_penalty}")
    _require(-2.0 <= p.presence_penalty <= 2.0, "presence_penalty",
             f"must be in [-2, 2], got {p.presence_penalty}")
    _require(-2.0 <= p.frequency_penalty <= 2.0, "frequency_penalty",
             f"must be in [-2, 2], got {p.frequency_penalty}")
    if p.seed is not None:
        _require(0 <= p.seed < 2**63, "seed", f"must be in [0, 2^63), got {p.seed}")
    _require(p.max_tokens >= 1, "max_tokens", f"must be at least 1, got {p.max_tokens}")
    _require(0 <= p.min_tokens <= p.max_tokens, "min_tokens",
             f"must be in [0, max_tokens={p.max_tokens}], got {p.min_tokens}")
    _require(all(isinstance(s, str) and s for s in p.stop), "stop", "stop strings must be non-empty")
    _require(len(p.stop) <= MAX_STOP_STRINGS, "stop",
             f"at most {MAX_STOP_STRINGS} stop strings, got {len(p.stop)}")
    _require(all(len(s) <= MAX_STOP_STRING_CHARS for s in p.stop), "stop",
             f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long")
    _require(all(t >= 0 for t in p.stop_token_ids), "stop_token_ids", "token ids must be >= 0")
    _require(0 <= p.logprobs <= MAX_LOGPROBS, "logprobs",
             f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs}")
    _require(0 <= p.beam_width <= MAX_BEAM_WIDTH, "beam_width",
             f"must be in [0, {MAX_BEAM_WIDTH}], got {p.beam_width}")
    _require(-MAX_LENGTH_PENALTY <= p.length_penalty <= MAX_LENGTH_PENALTY, "length_penalty",
             f"must be in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}], got {p.length_penalty}")
    _validate_early_stopping(p)
    if p.beam_width > 0:
        _require(p.n <= p.beam_width, "n", f"must be at most beam_width ({p.beam_width}), got {p.n}")
        _require(p.best_of is None, "best_of", "cannot be combined with beam search")
        _require(p.temperature == 0.0 and p.top_p == 1.0 and p.top_k == 0 and p.min_p == 0.0,
                 "temperature", "beam search is deterministic: leave temperature, top_p, top_k and "
                 "min_p unset (temperature 0)")


def _validate_early_stopping(p: SamplingParams) -> None:
    # `is` rather than ==: 1 and 0 equal True and False but are not the HF values.
    _require(p.early_stopping is True or p.early_stopping is False or p.early_stopping == "never",
             "early_stopping", f'must be true, false or "never", got {p.early_stopping!r}')
    # Only beam search reads it; a non-default value without it is a mistake the caller should hear of.
    _require(p.beam_width > 0 or p.early_stopping is False, "early_stopping",
             "only applies to beam search (beam_width > 0)")
