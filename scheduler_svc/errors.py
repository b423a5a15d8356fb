"""Errors the scheduler raises, each one telling the caller what to change."""

from __future__ import annotations


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
