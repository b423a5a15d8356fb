"""What the scheduler hands the frontend after each step: new tokens per request and output index."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler_svc.errors import RequestErrorKind
from scheduler_svc.sequence import FinishReason

# (logprob of the chosen token, top-k alternatives as (token id, logprob) best first)
TokenLogprobs = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(slots=True)
class CompletionOutput:
    """New tokens of one output index since the last report, and how it ended if it did."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None


@dataclass(slots=True)
class RequestOutput:
    """One report for one request. `finished` marks its single terminal report.

    `num_generated_tokens` (all sequences, for usage accounting) is filled in the terminal report.
    A request that failed has `error` (what happened) and `error_kind` set on its terminal report.
    """

    request_id: str
    outputs: list[CompletionOutput]
    finished: bool = False
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None
    error_kind: RequestErrorKind | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0   # prompt tokens found in the prefix cache (terminal report)
    # Seconds from arrival to first scheduling; None if the request never ran.
    queue_seconds: float | None = None
