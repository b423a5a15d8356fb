"""DecodeErrorInterceptor on a small grpc.aio server: every kind of handler answers bytes that do not decode
with INVALID_ARGUMENT, and passes everything that decodes on unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.grpc_decoding import DecodeErrorInterceptor, guard_handler
from tests.wire_fuzz import key, varint

Request = health_pb2.HealthCheckRequest
Response = health_pb2.HealthCheckResponse
# HealthCheckRequest is one string field, `service = 1`.
GOOD = Request(service="x").SerializeToString()
TRUNCATED = b"\x0a\x05ab"                              # says 5 bytes follow, 2 do
BAD_UTF8 = b"\x0a\x02\xc3\x28"
WIRE_TYPE_7 = key(1, 7)                                # no such wire type
UNKNOWN_FIELDS = GOOD + key(9, 0) + varint(2**64 - 1) + key(10, 2) + varint(3) + b"abc"
WRONG_WIRE_TYPE = key(1, 0) + varint(5)                # `service` sent as a varint: an unknown field
TOY = "/test.Toy/"


class Toy:
    """Handlers of every kind over HealthCheckRequest/Response; each records what it saw."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.cleaned_up = 0
        self.address = ""               # where the server listens, once it does

    async def unary_stream(self, request: Request, context: Any) -> AsyncIterator[Response]:
        try:
            self.seen.append(request.service)
            for _ in range(2):
                yield Response(status=Response.SERVING)
        finally:
            self.cleaned_up += 1

    async def stream_unary(self, requests: AsyncIterator[Request], context: Any) -> Response:
        try:
            async for request in requests:
                self.seen.append(request.service)
            return Response(status=Response.SERVING)
        finally:
            self.cleaned_up += 1

    async def stream_stream(self, requests: AsyncIterator[Request], context: Any) -> AsyncIterator[Response]:
        try:
            async for request in requests:
                self.seen.append(request.service)
                yield Response(status=Response.SERVING)
        finally:
            self.cleaned_up += 1

    async def stream_stream_writer(self, requests: AsyncIterator[Request], context: Any) -> None:
        async for request in requests:
            self.seen.append(request.service)
            await context.write(Response(status=Response.SERVING))

    def handler(self) -> grpc.GenericRpcHandler:
        """The toy service's generic handler."""
        codec = {"request_deserializer": Request.FromString,
                 "response_serializer": Response.SerializeToString}
        return grpc.method_handlers_generic_handler("test.Toy", {
            "UnaryStream": grpc.unary_stream_rpc_method_handler(self.unary_stream, **codec),
            "StreamUnary": grpc.stream_unary_rpc_method_handler(self.stream_unary, **codec),
            "StreamStream": grpc.stream_stream_rpc_method_handler(self.stream_stream, **codec),
            "StreamStreamWriter": grpc.stream_stream_rpc_method_handler(self.stream_stream_writer, **codec),
        })


async def serve(test: Callable[[grpc.aio.Channel, Toy, list[str]], Awaitable[None]]) -> None:
    """Run `test(channel, toy, rejected methods)` against a server with health, reflection and the toy."""
    rejected: list[str] = []
    server = grpc.aio.server(interceptors=[DecodeErrorInterceptor(rejected.append)])
    toy = Toy()
    server.add_generic_rpc_handlers([toy.handler()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    toy.address = f"127.0.0.1:{port}"
    await server.start()
    await health_servicer.set("x", Response.SERVING)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await test(channel, toy, rejected)
    finally:
        await server.stop(0)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str, int]:
    """The status code, details and number of responses of a finished call."""
    responses = 0
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                responses += 1
        else:
            await call
            responses = 1
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or "", responses
    return grpc.StatusCode.OK, "", responses


def expect_invalid(status: tuple[grpc.StatusCode, str, int], method: str, error: str) -> None:
    code, details, _ = status
    assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert details.startswith(f"{method}: cannot decode ") and error in details, details


@pytest.mark.parametrize(("data", "error"), [(TRUNCATED, "Wire format was corrupt"),
                                             (BAD_UTF8, "bad UTF-8"), (WIRE_TYPE_7, "corrupt")])
def test_a_unary_call_that_does_not_decode_is_invalid_argument(data: bytes, error: str) -> None:
    method = "/grpc.health.v1.Health/Check"

    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        check = channel.unary_unary(method)
        expect_invalid(await status_of(check(data, timeout=10)), method, error)
        assert "grpc.health.v1.HealthCheckRequest" in (await status_of(check(data, timeout=10)))[1]
        assert rejected == [method, method]
        assert Response.FromString(await check(GOOD, timeout=10)).status == Response.SERVING

    asyncio.run(serve(test))


def test_bytes_that_decode_are_served_unknown_and_mismatched_fields_included() -> None:
    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        assert Response.FromString(await check(UNKNOWN_FIELDS, timeout=10)).status == Response.SERVING
        # protobuf skips a known field sent with another valid wire type, as an unknown field: this
        # is the empty request (the overall health), which is not an error.
        assert (await status_of(check(WRONG_WIRE_TYPE, timeout=10)))[0] is grpc.StatusCode.OK
        assert (await status_of(check(Request(service="nope").SerializeToString(), timeout=10)))[0] \
            is grpc.StatusCode.NOT_FOUND           # the servicer's own answer comes through
        assert rejected == []

    asyncio.run(serve(test))


def test_unary_stream_handlers_async_generator_and_writer() -> None:
    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        method = TOY + "UnaryStream"
        call = channel.unary_stream(method)
        expect_invalid(await status_of(call(TRUNCATED, timeout=10)), method, "corrupt")
        assert toy.seen == [] and toy.cleaned_up == 0               # the servicer never ran
        assert await status_of(call(GOOD, timeout=10)) == (grpc.StatusCode.OK, "", 2)
        assert toy.seen == ["x"] and toy.cleaned_up == 1
        watch = "/grpc.health.v1.Health/Watch"                      # a coroutine writing its responses
        expect_invalid(await status_of(channel.unary_stream(watch)(BAD_UTF8, timeout=10)), watch, "UTF-8")
        watching = channel.unary_stream(watch)(GOOD, timeout=10)
        assert Response.FromString(await watching.read()).status == Response.SERVING
        watching.cancel()

    asyncio.run(serve(test))


def test_a_bad_message_in_a_request_stream_ends_the_call_after_the_good_ones() -> None:
    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        method = TOY + "StreamUnary"
        call = channel.stream_unary(method)
        status = await status_of(call(iter([GOOD, GOOD, TRUNCATED]), timeout=10))
        expect_invalid(status, method, "corrupt")
        assert "message 2 of the request stream" in status[1]
        assert toy.seen == ["x", "x"] and toy.cleaned_up == 1       # its finally block ran
        assert (await status_of(call(iter([GOOD]), timeout=10)))[0] is grpc.StatusCode.OK

    asyncio.run(serve(test))


@pytest.mark.parametrize("name", ["StreamStream", "StreamStreamWriter"])
def test_stream_stream_answers_the_good_messages_then_invalid_argument(name: str) -> None:
    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        method = TOY + name
        call = channel.stream_stream(method)
        code, details, responses = await status_of(call(iter([GOOD, UNKNOWN_FIELDS, BAD_UTF8]), timeout=10))
        expect_invalid((code, details, responses), method, "UTF-8")
        assert responses == 2 and "message 2 of the request stream" in details
        assert rejected == [method]
        assert await status_of(call(iter([GOOD] * 3), timeout=10)) == (grpc.StatusCode.OK, "", 3)

    asyncio.run(serve(test))


def test_the_status_stands_while_the_client_goes_on_writing() -> None:
    # The blocking client: grpc.aio's replaces the status with INTERNAL when one of its writes races
    # the end of the call (grpc/grpc#36066), which is why the other tests end their streams at the
    # bad message.
    method = TOY + "StreamStream"

    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        def send() -> tuple[grpc.StatusCode, str, int]:
            with grpc.insecure_channel(toy.address) as blocking:
                responses = 0
                try:
                    requests = iter([GOOD, TRUNCATED] + [GOOD] * 50)
                    for _ in blocking.stream_stream(method)(requests, timeout=10):
                        responses += 1
                except grpc.RpcError as err:
                    return err.code(), err.details(), responses
                return grpc.StatusCode.OK, "", responses

        for _ in range(20):
            status = await asyncio.get_running_loop().run_in_executor(None, send)
            expect_invalid(status, method, "corrupt")
            assert status[2] == 1

    asyncio.run(serve(test))


def test_reflection_stream_rejects_an_undecodable_request() -> None:
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"

    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        call = channel.stream_stream(method)
        expect_invalid(await status_of(call(iter([TRUNCATED]), timeout=10)), method,
                       "grpc.reflection.v1alpha.ServerReflectionRequest")
        list_services = key(7, 2) + varint(0)                        # list_services: ""
        assert await status_of(call(iter([list_services]), timeout=10)) == (grpc.StatusCode.OK, "", 1)

    asyncio.run(serve(test))


def test_an_unknown_method_stays_unimplemented() -> None:
    async def test(channel: grpc.aio.Channel, toy: Toy, rejected: list[str]) -> None:
        code, _, _ = await status_of(channel.unary_unary("/test.Toy/Nothing")(TRUNCATED, timeout=10))
        assert code is grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(serve(test))


def test_raw_byte_and_synchronous_handlers_are_left_alone() -> None:
    raw = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert guard_handler(raw, "/m") is raw
    sync = grpc.unary_unary_rpc_method_handler(lambda request, context: request,
                                               request_deserializer=Request.FromString)
    assert guard_handler(sync, "/m") is sync
    assert guard_handler(None, "/m") is None


def test_each_handler_is_guarded_once() -> None:
    async def test() -> None:
        interceptor = DecodeErrorInterceptor()
        handler = grpc.unary_unary_rpc_method_handler(Toy().stream_unary,
                                                      request_deserializer=Request.FromString)

        async def continuation(details: Any) -> Any:
            return handler

        details = SimpleNamespace(method="/m", invocation_metadata=())
        first = await interceptor.intercept_service(continuation, details)
        assert first is not handler and await interceptor.intercept_service(continuation, details) is first

    asyncio.run(test())
