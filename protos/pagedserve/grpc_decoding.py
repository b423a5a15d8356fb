"""Undecodable request messages answer INVALID_ARGUMENT, on every RPC of a grpc.aio server.

grpc-python decodes each request message before the servicer sees it. When the protobuf parser
raises (truncated bytes, a wrong wire type, bad UTF-8 in a string), the call ends with UNKNOWN
("Unexpected <class 'DecodeError'>"), a code our APIs do not document. `DecodeErrorInterceptor`
wraps every method handler: its deserializer returns an `Undecodable` marker instead of raising, and
its behaviour answers the marker with INVALID_ARGUMENT naming the method, the message type and the
parser's error. In a request stream, the marker aborts the call when the servicer reaches it, so the
messages before it are served and the servicer's own cleanup runs.

Bytes that decode are passed on unchanged: a valid message with fields the server does not know is
served (proto3 keeps unknown fields), and checking the values is the servicer's job.

Handlers must be async (coroutine or async generator functions), as every grpc.aio servicer of
grpcio, grpc_health and grpc_reflection is; a synchronous one is passed on unguarded. A servicer that
reads a request stream with `context.read()` instead of the request iterator gets the marker itself.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeAlias

import grpc

__all__ = ["DecodeErrorInterceptor", "Undecodable", "guard_handler"]

Behaviour = Callable[..., Any]
# Generic in grpc's type stubs only, so named in strings (never subscripted at run time).
_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class Undecodable:
    """Stands in for a request message whose bytes the deserializer could not decode."""

    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error

    def details(self, method: str, index: int | None = None) -> str:
        """The INVALID_ARGUMENT message: the method, which message, its type and the parser's error."""
        which = "the request" if index is None else f"message {index} of the request stream"
        error = str(self.error) or type(self.error).__name__
        # protobuf's DecodeError names the message type itself; other errors may not.
        as_type = "" if self.type_name in error else f" as {self.type_name}"
        return f"{method}: cannot decode {which}{as_type}: {error}"


def tolerant_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """`deserialize`, returning an Undecodable instead of raising."""
    message_class = getattr(deserialize, "__self__", None)      # FromString is bound to its class
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = str(getattr(descriptor, "full_name", None) or getattr(deserialize, "__qualname__", "request"))

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        # The deserializer sees nothing but the client's bytes, so whatever it raises (DecodeError
        # from the parser, or anything else) means those bytes are not an acceptable message.
        except Exception as err:
            return Undecodable(type_name, err)

    return decode


class _Reject:
    """Answers one Undecodable request with INVALID_ARGUMENT, after telling `on_reject`."""

    def __init__(self, method: str, on_reject: Callable[[str], None] | None) -> None:
        self.method = method
        self.on_reject = on_reject

    async def __call__(self, context: _Context, request: Undecodable,
                       index: int | None = None) -> None:
        if self.on_reject is not None:
            self.on_reject(self.method)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details(self.method, index))


def _guard_unary_request(behaviour: Behaviour, reject: _Reject) -> Behaviour:
    """A behaviour of the same kind that rejects an Undecodable request before calling `behaviour`."""
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await reject(context, request)
            # aclosing: a call that ends early closes the servicer's generator now (its finally
            # blocks free what it holds), not whenever the garbage collector gets to it.
            async with aclosing(behaviour(request, context)) as responses:
                async for response in responses:
                    yield response
        return guarded_stream

    async def guarded(request: Any, context: _Context) -> Any:
        if isinstance(request, Undecodable):
            await reject(context, request)
        return await behaviour(request, context)
    return guarded


async def _checked_requests(requests: AsyncIterator[Any], context: _Context,
                            reject: _Reject) -> AsyncIterator[Any]:
    """The request stream, aborting the call with INVALID_ARGUMENT at its first Undecodable message."""
    index = 0
    async for request in requests:
        if isinstance(request, Undecodable):
            await reject(context, request, index)
        yield request
        index += 1


def _guard_stream_request(behaviour: Behaviour, reject: _Reject) -> Behaviour:
    """A behaviour of the same kind that reads its requests through `_checked_requests`."""
    if inspect.isasyncgenfunction(behaviour):
        async def guarded_stream(requests: AsyncIterator[Any],
                                 context: _Context) -> AsyncIterator[Any]:
            checked = _checked_requests(requests, context, reject)
            async with aclosing(behaviour(checked, context)) as responses:
                async for response in responses:
                    yield response
        return guarded_stream

    async def guarded(requests: AsyncIterator[Any], context: _Context) -> Any:
        return await behaviour(_checked_requests(requests, context, reject), context)
    return guarded


def _behaviour(handler: _Handler) -> Behaviour | None:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def guard_handler(handler: _Handler | None, method: str,
                  on_reject: Callable[[str], None] | None = None) -> _Handler | None:
    """`handler` with undecodable requests answered INVALID_ARGUMENT; `on_reject(method)` counts them.

    A missing handler, one without a deserializer (it takes raw bytes) or a synchronous one is
    returned as it is.
    """
    if handler is None or handler.request_deserializer is None:
        return handler
    behaviour = _behaviour(handler)
    if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
        return handler
    reject = _Reject(method, on_reject)
    guard = _guard_stream_request if handler.request_streaming else _guard_unary_request
    make = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
    deserialize = tolerant_deserializer(handler.request_deserializer)
    return make(guard(behaviour, reject), request_deserializer=deserialize,
                response_serializer=handler.response_serializer)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers undecodable request messages with INVALID_ARGUMENT on every method of the server.

    Put it after an authenticating interceptor: that one sees the call first, so an unauthenticated
    call is refused as such whatever its bytes. `on_reject(method)` is called for each call rejected
    here (for metrics).
    """

    def __init__(self, on_reject: Callable[[str], None] | None = None) -> None:
        self._on_reject = on_reject
        # method -> (the handler found, its guarded version): the servicers' handlers are the same
        # objects on every call, so each is wrapped once.
        self._guarded: dict[str, tuple[_Handler, _Handler | None]] = {}

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        """The handler the server found for the call, guarded."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = guard_handler(handler, method, self._on_reject)
        self._guarded[method] = (handler, guarded)
        return guarded
