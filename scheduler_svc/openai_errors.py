"""Errors of the OpenAI-compatible HTTP API, as OpenAI's error object with the matching HTTP status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "top_p", "code": null}}

The statuses are the ones the OpenAI SDKs turn into their typed exceptions: 400 BadRequestError,
401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 500 InternalServerError and 503 (an
APIStatusError the SDKs retry). Each refusal carries the gRPC status name the gRPC frontend would
answer with, so that the rejection metric counts a refusal the same whichever API it came through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pagedserve.errors import InvalidArgumentError, RequestErrorKind
from scheduler_svc.engine import QueueFullError, ShuttingDownError, UnavailableError

# (HTTP status, OpenAI error type, code, gRPC status name) by what the engine raised.
_SUBMIT_ERRORS: dict[type[Exception], tuple[int, str, str | None, str]] = {
    InvalidArgumentError: (400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    QueueFullError: (429, "rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    UnavailableError: (503, "service_unavailable_error", "service_unavailable", "UNAVAILABLE"),
    ShuttingDownError: (503, "service_unavailable_error", "service_unavailable", "UNAVAILABLE"),
}
# Errors that end an admitted request, by kind (the gRPC frontend's INVALID_ARGUMENT, UNAVAILABLE, INTERNAL).
_REQUEST_ERRORS: dict[RequestErrorKind, tuple[int, str]] = {
    RequestErrorKind.TOO_LARGE: (400, "invalid_request_error"),
    RequestErrorKind.UNAVAILABLE: (503, "service_unavailable_error"),
    RequestErrorKind.INTERNAL: (500, "internal_error"),
}
SUBMIT_ERRORS: tuple[type[Exception], ...] = tuple(_SUBMIT_ERRORS)


class OpenAIError(Exception):
    """A request the HTTP API answers with an error object instead of a completion."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, grpc_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.grpc_code = grpc_code      # the rejection metric's label, None when it is not a rejection

    def body(self) -> dict[str, Any]:
        """The JSON body: OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.code}}


def bad_request(param: str | None, message: str) -> OpenAIError:
    """400 for a field the caller must change; the message starts with the field's name."""
    text = f"{param}: {message}" if param else message
    return OpenAIError(400, text, param=param, grpc_code="INVALID_ARGUMENT")


def from_submit_error(err: Exception, param_names: Mapping[str, str] | None = None) -> OpenAIError:
    """The error object for an exception of SUBMIT_ERRORS.

    `param_names` renames the scheduler's field names to the request's (chat's `top_logprobs` is
    SamplingParams' `logprobs`); the message then names the field as the caller sent it.
    """
    status, error_type, code, grpc_code = _SUBMIT_ERRORS[type(err)]
    if isinstance(err, InvalidArgumentError):
        param = (param_names or {}).get(err.field, err.field)
        return OpenAIError(status, f"{param}: {err.message}", error_type, param, code, grpc_code)
    return OpenAIError(status, str(err), error_type, None, code, grpc_code)


def from_request_error(kind: RequestErrorKind, message: str) -> OpenAIError:
    """The error object for a request the service ended with an error after admitting it."""
    status, error_type = _REQUEST_ERRORS[kind]
    return OpenAIError(status, message, error_type)


def unauthorized() -> OpenAIError:
    """401 for a call without the server's bearer token."""
    return OpenAIError(401, "send the header 'Authorization: Bearer <token>' with the server's access token",
                       "invalid_request_error", None, "invalid_api_key", "UNAUTHENTICATED")


def not_serving(message: str = "no executor is serving yet; retry once /health answers 200") -> OpenAIError:
    """503 while the engine does not serve."""
    return OpenAIError(503, message, "service_unavailable_error", None, "service_unavailable", "UNAVAILABLE")
