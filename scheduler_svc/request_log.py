"""One INFO line per request that ended: finished, aborted, failed or refused, on `pagedserve.requests`.

Fields are `key=value` so that a text log greps and parses (logfmt) as easily as the JSON one, where
the request id is also the record's `request_id`. A separate logger lets an operator silence or route
per-request lines (`--log-level WARNING`, or a handler on `pagedserve.requests`) without losing the
engine's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("pagedserve.requests")


@dataclass(frozen=True, slots=True)
class RequestSummary:
    """What the line of an ended request says. `ttft_seconds` is None when no token came."""

    request_id: str
    finish_reason: str
    prompt_tokens: int
    output_tokens: int
    ttft_seconds: float | None
    e2e_seconds: float
    preemptions: int


def format_summary(summary: RequestSummary) -> str:
    """The summary as `request ID finished: finish_reason=... prompt_tokens=... ...`."""
    ttft = "-" if summary.ttft_seconds is None else f"{summary.ttft_seconds:.3f}"
    verb = {"aborted": "aborted", "error": "failed"}.get(summary.finish_reason, "finished")
    return (f"request {summary.request_id} {verb}: finish_reason={summary.finish_reason} "
            f"prompt_tokens={summary.prompt_tokens} output_tokens={summary.output_tokens} "
            f"ttft_s={ttft} e2e_s={summary.e2e_seconds:.3f} preemptions={summary.preemptions}")


def log_request_ended(summary: RequestSummary) -> None:
    """The one INFO line of a request that got into the scheduler and has ended."""
    log.info("%s", format_summary(summary), extra={"request_id": summary.request_id})


def log_request_refused(request_id: str, code: str, message: str) -> None:
    """The one INFO line of a request refused before it was queued (`code`: a grpc.StatusCode name)."""
    log.info("request %s refused: %s: %s", request_id or "(no id)", code, message,
             extra={"request_id": request_id or None})
