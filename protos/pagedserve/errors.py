"""Errors the services raise, each one telling the caller what to change."""

from __future__ import annotations

import enum


class InvalidArgumentError(ValueError):
    """A request or configuration field holds a value the service cannot accept.

    The frontend maps it to gRPC INVALID_ARGUMENT; `field` names the offending field so the message
    tells the caller exactly what to change.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PlanResultMismatchError(ValueError):
    """A step result does not answer the plan it claims to answer (wrong step id or sequences)."""


class RequestErrorKind(enum.Enum):
    """Why the service ended a request with an error rather than a finish reason.

    The frontend maps each kind to a gRPC status code; the scheduler stays free of gRPC.
    """

    # The request can never run here (it needs more KV blocks than the GPU holds): change the request.
    TOO_LARGE = "too_large"
    # No executor served within the grace period: retry later.
    UNAVAILABLE = "unavailable"
    # An executor failed on a step that included this request.
    INTERNAL = "internal"
