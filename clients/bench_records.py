"""What a serving benchmark records per request, and the summary the paper and `vllm bench serve` report.

Every system under test (PagedServe over gRPC, the Hugging Face peers in process) fills the same
RequestRecord, so one `summarize` computes every system's table row the same way. Times are seconds on
one monotonic clock, relative to the start of the run.
"""

from __future__ import annotations

import collections
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestRecord:
    """One request's timeline.

    `arrival` is when the trace says the request arrives (0 for offline runs); latencies count from it,
    so time spent queued in the client or the server is part of them. `token_times` holds, for output 0,
    the time each of its tokens reached the client (tokens arriving together share a time).
    """

    index: int
    prompt_len: int
    output_len: int                 # tokens asked for per output (exact: ignore_eos)
    num_outputs: int = 1            # n, or the beam width (the beams returned)
    arrival: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0          # tokens returned, summed over every output
    num_preemptions: int = 0
    cached_prompt_tokens: int = 0   # prompt tokens the server found in its prefix cache
    error: str = ""                 # why it failed: the server's message, or what the client saw
    error_code: str = ""            # the gRPC status code's name of a failed call ("" for others)

    @property
    def ok(self) -> bool:
        """Whether it finished without an error."""
        return not self.error and self.finished is not None

    @property
    def failure_code(self) -> str:
        """What a failed request is counted under: its gRPC code, ERROR without one, INCOMPLETE for a
        stream that ended without its last message."""
        if self.error_code:
            return self.error_code
        return "ERROR" if self.error else "INCOMPLETE"

    @property
    def latency(self) -> float:
        """Arrival to the last token, seconds."""
        assert self.finished is not None
        return self.finished - self.arrival

    def time_per_output_token(self) -> float | None:
        """Mean time between tokens after the first (None for single-token outputs)."""
        if self.first_token is None or self.finished is None or self.output_len < 2:
            return None
        return (self.finished - self.first_token) / (self.output_len - 1)

    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive token arrivals of output 0."""
        return [b - a for a, b in itertools.pairwise(self.token_times)]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Mean, median and 99th percentile of a latency, in milliseconds."""

    mean_ms: float
    p50_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Percentiles:
        """From samples in seconds; NaN when there are none."""
        if not seconds:
            return cls(math.nan, math.nan, math.nan)
        ms = sorted(1000 * s for s in seconds)
        return cls(statistics.fmean(ms), percentile(ms, 50), percentile(ms, 99))


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed request of a run: its index in the trace, its code (RequestRecord.failure_code) and
    message."""

    request: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ClientSummary:
    """Throughput and latency of one run as seen by the client."""

    completed: int
    failed: int
    duration_s: float
    output_tokens: int
    prompt_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    normalized_latency_s: float     # mean over requests of latency / output_len (the paper's metric)
    mean_latency_s: float
    ttft: Percentiles
    tpot: Percentiles
    itl: Percentiles
    preemptions: int
    cached_prompt_tokens: int = 0   # of prompt_tokens, served from the prefix cache
    failures_by_code: dict[str, int] = field(default_factory=dict)     # failed requests per code
    failures: tuple[Failure, ...] = ()                                 # every failed request


def summarize(records: Sequence[RequestRecord], duration_s: float) -> ClientSummary:
    """The client-side summary of a run that took `duration_s` seconds (first arrival to last token)."""
    done = [r for r in records if r.ok]
    failures = tuple(Failure(r.index, r.failure_code, r.error) for r in records if not r.ok)
    duration = max(duration_s, 1e-9)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    ttfts = [r.first_token - r.arrival for r in done if r.first_token is not None]
    tpots = [t for r in done if (t := r.time_per_output_token()) is not None]
    itls = [gap for r in done for gap in r.inter_token_latencies()]
    return ClientSummary(
        completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
        output_tokens=output_tokens, prompt_tokens=prompt_tokens,
        requests_per_s=len(done) / duration, output_tokens_per_s=output_tokens / duration,
        total_tokens_per_s=(output_tokens + prompt_tokens) / duration,
        normalized_latency_s=_mean([r.latency / max(r.output_len, 1) for r in done]),
        mean_latency_s=_mean([r.latency for r in done]),
        ttft=Percentiles.of(ttfts), tpot=Percentiles.of(tpots), itl=Percentiles.of(itls),
        preemptions=sum(r.num_preemptions for r in done),
        cached_prompt_tokens=sum(r.cached_prompt_tokens for r in done),
        failures_by_code=dict(sorted(collections.Counter(f.code for f in failures).items())),
        failures=failures)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan
