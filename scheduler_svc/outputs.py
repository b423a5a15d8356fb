"""What the scheduler hands the frontend after each step: new tokens per request and output index."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.errors import RequestErrorKind
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


@dataclass(slots=True)
class FinishedRequest:
    """A request's whole output, assembled from its streamed reports."""

    request_id: str
    token_ids: dict[int, list[int]] = field(default_factory=dict)      # output index -> tokens
    finish_reasons: dict[int, str] = field(default_factory=dict)
    error: str | None = None
    finished: bool = False
    cached_prompt_tokens: int = 0


def collect(outputs: list[RequestOutput], into: dict[str, FinishedRequest]) -> None:
    """Fold streamed reports into whole outputs; asserts one terminal report per request."""
    for out in outputs:
        done = into.setdefault(out.request_id, FinishedRequest(out.request_id))
        assert not done.finished, f"{out.request_id}: report after its terminal report"
        for c in out.outputs:
            done.token_ids.setdefault(c.index, []).extend(c.token_ids)
            if c.finish_reason is not None:
                done.finish_reasons[c.index] = c.finish_reason.value
        done.error = out.error
        done.finished = out.finished
        if out.finished:
            done.cached_prompt_tokens = out.num_cached_prompt_tokens
