"""Seeded synthetic request traces shaped like the paper's workloads (DESIGN.md §7)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

# Lognormal spread of ShareGPT-like lengths; the mean is matched exactly before capping.
_LENGTH_SIGMA = 1.0


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One synthetic request: its lengths, sharing shape and arrival time (seconds from start)."""

    prompt_len: int
    output_len: int
    n: int = 1
    beam_width: int = 0
    arrival_time: float = 0.0


def _lognormal_length(rng: random.Random, mean: float, cap: int) -> int:
    mu = math.log(mean) - _LENGTH_SIGMA**2 / 2
    return max(1, min(cap, round(rng.lognormvariate(mu, _LENGTH_SIGMA))))


# Draws per request before a context too short for the trace is given up on.
_MAX_DRAWS_PER_REQUEST = 1000


def lognormal_trace(num_requests: int, mean_prompt: float, mean_output: float, cap: int = 1024,
                    seed: int = 0, max_total_len: int | None = None) -> list[TraceRequest]:
    """Prompt and output lengths drawn from lognormal distributions with the given means, capped.

    With `max_total_len`, a pair whose prompt + output exceeds it is drawn again, as vLLM's benchmark
    skips ShareGPT conversations too long for the model: clipping it instead would pile requests up at
    the limit. Without one (or when every pair fits) the trace is the same as before.
    """
    if max_total_len is not None and max_total_len < 2:
        raise ValueError(f"max_total_len must be at least 2 (one prompt and one output token), "
                         f"got {max_total_len}")
    rng = random.Random(seed)
    trace: list[TraceRequest] = []
    for _ in range(num_requests * _MAX_DRAWS_PER_REQUEST):
        if len(trace) == num_requests:
            break
        request = TraceRequest(_lognormal_length(rng, mean_prompt, cap),
                               _lognormal_length(rng, mean_output, cap))
        if max_total_len is None or request.prompt_len + request.output_len <= max_total_len:
            trace.append(request)
    if len(trace) < num_requests:
        raise ValueError(f"a context of {max_total_len} tokens is too short for this trace "
                         f"(mean {mean_prompt:g} in / {mean_output:g} out)")
    return trace


def sharegpt_like(num_requests: int, seed: int = 0, max_total_len: int | None = None) -> list[TraceRequest]:
    """ShareGPT-like: long conversations, means 161 in / 338 out, capped at 1024 / 1024."""
    return lognormal_trace(num_requests, 161, 338, 1024, seed, max_total_len)


def alpaca_like(num_requests: int, seed: int = 0, max_total_len: int | None = None) -> list[TraceRequest]:
    """Alpaca-like: short instructions, means 19 in / 58 out."""
    return lognormal_trace(num_requests, 19, 58, 1024, seed, max_total_len)


def fixed_trace(num_requests: int, prompt_len: int, output_len: int) -> list[TraceRequest]:
    """Every request with the same lengths."""
    return [TraceRequest(prompt_len, output_len) for _ in range(num_requests)]


TRACES = {"sharegpt": sharegpt_like, "alpaca": alpaca_like}


def with_sharing(trace: list[TraceRequest], n: int = 1, beam_width: int = 0) -> list[TraceRequest]:
    """The same trace with parallel sampling (n outputs each) or beam search of the given width."""
    return [replace(r, n=n, beam_width=beam_width) for r in trace]


def with_poisson_arrivals(trace: list[TraceRequest], rate: float, burstiness: float = 1.0,
                          seed: int = 0) -> list[TraceRequest]:
    """Arrivals at `rate` requests/s; gaps are gamma-distributed (burstiness 1 is Poisson)."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError("rate and burstiness must be > 0")
    rng = random.Random(seed)
    t, out = 0.0, []
    for request in trace:
        out.append(replace(request, arrival_time=t))
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def prompt_token_ids(request_index: int, length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Deterministic pseudo-random prompt tokens (ids 3 and up, clear of common special tokens)."""
    rng = random.Random(seed * 1_000_003 + request_index)
    return [rng.randrange(3, vocab_size) for _ in range(length)]


def shared_prefix_prompt(request_index: int, length: int, prefix_len: int, vocab_size: int,
                         seed: int = 0) -> list[int]:
    """A prompt whose first `prefix_len` tokens are the same for every request (a shared system prompt),
    followed by the request's own tokens; `length` counts both."""
    prefix = prompt_token_ids(-1, min(prefix_len, length), vocab_size, seed)
    return prefix + prompt_token_ids(request_index, length - len(prefix), vocab_size, seed)
