"""Python client of the PagedServe `GenerationService`: blocking and asyncio.

    with PagedServeClient("127.0.0.1:50051") as client:
        for event in client.stream("The capital of France is", max_tokens=16):
            print(event.choices[0].text, end="", flush=True)
        completion = client.generate("Hello", n=2, temperature=0.8, logprobs=1)

    async with AsyncPagedServeClient() as client:
        completion = await client.generate("Hello")

The two clients differ only in how they call: requests are built by `clients.request_builder`,
responses become the frozen dataclasses below, `CompletionBuilder` aggregates a stream into a
`Completion`, and every gRPC error surfaces as `PagedServeError`, for both of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from types import ModuleType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.request_builder import build_generate_request
from pagedserve.v1 import generation_pb2 as pb
from pagedserve.v1 import generation_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20
HEALTH_POLL_S = 0.2
"""Pause between two health checks of `wait_until_serving`."""

T = TypeVar("T")


class PagedServeError(Exception):
    """A failed call: its gRPC status code and the server's message, which says what to change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def error_from_rpc(err: grpc.RpcError) -> PagedServeError:
    """The `PagedServeError` for an error of grpc or grpc.aio: the one place they are mapped."""
    # The errors grpc raises from calls (sync or aio) have code() and details(); RpcError itself
    # declares neither.
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return PagedServeError(code, details or "")


@contextlib.contextmanager
def _grpc_errors() -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as err:
        raise error_from_rpc(err) from err


@dataclasses.dataclass(frozen=True)
class LogprobCandidate:
    """A candidate token, its text on its own, and its natural-log probability."""

    token_id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs at one generated position: the chosen token and the most likely ones, most likely first."""

    chosen: LogprobCandidate
    top: tuple[LogprobCandidate, ...]


@dataclasses.dataclass(frozen=True)
class ChoiceDelta:
    """New data of one output in one stream event; `text`, `token_ids` and `logprobs` are deltas.

    `finish_reason` is "length", "stop", "eos" or "aborted" on the output's last chunk, else None;
    `stop_reason` (the stop string or the stop token's text) is set with "stop", `stop_token_id` when a
    stop token id ended it, and `cumulative_logprob` once the output has ended.
    """

    index: int
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None
    stop_reason: str | None
    stop_token_id: int | None
    cumulative_logprob: float | None


@dataclasses.dataclass(frozen=True)
class CompletionOutput(ChoiceDelta):
    """One output whole: every chunk of its index joined (the fields mean what they do in ChoiceDelta)."""


@dataclasses.dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    num_preemptions: int


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """One message of a Generate stream: at most one chunk per output, and usage on the last message."""

    request_id: str
    choices: tuple[ChoiceDelta, ...]
    usage: Usage | None


@dataclasses.dataclass(frozen=True)
class Completion:
    """A finished request: its outputs ordered by index, and its usage (None if the stream had none)."""

    request_id: str
    outputs: tuple[CompletionOutput, ...]
    usage: Usage | None

    @property
    def text(self) -> str:
        """The text of output 0 (the only one unless n > 1)."""
        return self.outputs[0].text if self.outputs else ""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The served model and its KV cache capacity (a copy of `pagedserve.v1.ModelInfo`)."""

    model_name: str
    max_model_len: int
    block_size: int
    kv_capacity_tokens: int
    num_gpu_blocks: int
    num_cpu_blocks: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    world_size: int


_FINISH_REASONS = {value.number: value.name.removeprefix("FINISH_REASON_").lower()
                   for value in pb.FinishReason.DESCRIPTOR.values}


def _finish_reason(value: int) -> str | None:
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    # A reason added to the .proto after this client was generated still reads as something.
    return _FINISH_REASONS.get(value, f"unknown_{value}")


def _copy_fields(cls: Callable[..., T], message: Message) -> T:
    """`cls` built from the like-named fields of `message`; repeated fields become tuples."""
    proto_fields = message.DESCRIPTOR.fields_by_name
    values = {}
    for name in (f.name for f in dataclasses.fields(cls)):  # type: ignore[arg-type]
        value = getattr(message, name)
        values[name] = tuple(value) if proto_fields[name].is_repeated else value
    return cls(**values)


def _token_logprobs(entry: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(_copy_fields(LogprobCandidate, entry.chosen),
                         tuple(_copy_fields(LogprobCandidate, c) for c in entry.top_logprobs))


def choice_from_proto(chunk: pb.CompletionChunk) -> ChoiceDelta:
    """A `CompletionChunk` as a ChoiceDelta.

    The fields that only mean something once the output has ended are None until then.
    """
    finish_reason = _finish_reason(chunk.finish_reason)
    return ChoiceDelta(
        index=chunk.index, text=chunk.text, token_ids=tuple(chunk.token_ids),
        logprobs=tuple(_token_logprobs(entry) for entry in chunk.logprobs), finish_reason=finish_reason,
        stop_reason=chunk.stop_reason if finish_reason == "stop" else None,
        stop_token_id=chunk.stop_token_id if chunk.HasField("stop_token_id") else None,
        cumulative_logprob=chunk.cumulative_logprob if finish_reason is not None else None)


def event_from_proto(response: pb.GenerateResponse) -> StreamEvent:
    """A `GenerateResponse` as a StreamEvent."""
    usage = _copy_fields(Usage, response.usage) if response.HasField("usage") else None
    return StreamEvent(response.request_id, tuple(choice_from_proto(c) for c in response.choices), usage)


def model_info_from_proto(info: pb.ModelInfo) -> ModelInfo:
    """A `pagedserve.v1.ModelInfo` as a ModelInfo."""
    return _copy_fields(ModelInfo, info)


@dataclasses.dataclass
class _OutputParts:
    """What has arrived of one output so far."""

    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprobs] = dataclasses.field(default_factory=list)
    last: ChoiceDelta | None = None


class CompletionBuilder:
    """Aggregates the events of one stream into a Completion, output index by output index."""

    def __init__(self) -> None:
        self.request_id = ""
        self.usage: Usage | None = None
        self._outputs: dict[int, _OutputParts] = {}

    def add(self, event: StreamEvent) -> list[int]:
        """Adds one event; returns the indices of the outputs it finished."""
        self.request_id = event.request_id or self.request_id
        if event.usage is not None:
            self.usage = event.usage
        finished = []
        for choice in event.choices:
            parts = self._outputs.setdefault(choice.index, _OutputParts())
            parts.text.append(choice.text)
            parts.token_ids.extend(choice.token_ids)
            parts.logprobs.extend(choice.logprobs)
            parts.last = choice
            if choice.finish_reason is not None:
                finished.append(choice.index)
        return finished

    def output(self, index: int) -> CompletionOutput:
        """Output `index` as received so far (its end fields are None while it runs)."""
        parts = self._outputs[index]
        assert parts.last is not None  # a part exists only once a chunk of its index arrived
        return CompletionOutput(
            index=index, text="".join(parts.text), token_ids=tuple(parts.token_ids),
            logprobs=tuple(parts.logprobs), finish_reason=parts.last.finish_reason,
            stop_reason=parts.last.stop_reason, stop_token_id=parts.last.stop_token_id,
            cumulative_logprob=parts.last.cumulative_logprob)

    def completion(self) -> Completion:
        """Everything received, outputs ordered by index."""
        return Completion(self.request_id, tuple(self.output(i) for i in sorted(self._outputs)), self.usage)


class _ServingWait:
    """The clock of `wait_until_serving`, shared by both clients."""

    def __init__(self, target: str, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._deadline = time.monotonic() + timeout

    def time_left(self) -> float:
        """Seconds until the deadline, at least 0."""
        return max(self._deadline - time.monotonic(), 0.0)

    def serving(self, answer: str) -> bool:
        """Whether `answer` is SERVING; raises DEADLINE_EXCEEDED when not and no time is left to retry."""
        if answer == "SERVING":
            return True
        if self.time_left() <= HEALTH_POLL_S:
            message = f"{self._target} not SERVING within {self._timeout:g} s; last answer: {answer}"
            raise PagedServeError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
        return False


def _status_name(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class _ClientBase:
    """The channel, stubs and per-call options of both clients; `_grpc` is the grpc or grpc.aio module."""

    _grpc: ModuleType

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 channel_options: Sequence[tuple[str, Any]] = ()) -> None:
        self.target = target
        self.timeout = timeout
        # Metadata rather than call credentials: gRPC sends those over TLS only, and a token on a
        # loopback connection without TLS is a supported setup.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.max_receive_message_length", max_message_bytes),
                   # Reconnect within two seconds of a (re)started server rather than after gRPC's
                   # default backoff of up to two minutes, so wait_until_serving notices it promptly.
                   ("grpc.max_reconnect_backoff_ms", 2000), *channel_options]
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self._channel = self._grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = self._grpc.insecure_channel(target, options=options)
        self._stub = generation_pb2_grpc.GenerationServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _call_options(self, timeout: float | None = None) -> dict[str, Any]:
        return {"metadata": self._metadata, "timeout": self.timeout if timeout is None else timeout}


class PagedServeClient(_ClientBase):
    """Blocking client of one PagedServe server; use it as a context manager or `close()` it.

    `token` is sent as `authorization: Bearer <token>`; `root_certificates` (PEM) or `tls=True` (system
    roots) makes the channel TLS. `timeout` is the deadline of every call in seconds (of the whole
    stream for `stream`); None waits forever. `channel_options` adds gRPC channel arguments. Every method
    raises `PagedServeError` when its call fails.
    """

    _grpc = grpc

    def __enter__(self) -> PagedServeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel, cancelling the calls still running on it."""
        self._channel.close()

    def stream(self, prompt: str | Sequence[int], *, request_id: str = "", skip_special_tokens: bool = True,
               **sampling: Any) -> Generator[StreamEvent, None, None]:
        """Streams the generation of `prompt` (text, or token ids) as events.

        `**sampling` takes the fields of `pagedserve.v1.SamplingParameters` (None: unset; an unknown name
        raises TypeError here, before any call). Closing the generator, or leaving a `for` over it early,
        cancels the call, and the server aborts the request.
        """
        request = build_generate_request(prompt, request_id, skip_special_tokens, **sampling)
        return self._events(request)

    def _events(self, request: pb.GenerateRequest) -> Generator[StreamEvent, None, None]:
        with contextlib.closing(self.stream_responses(request)) as responses:
            for response in responses:
                yield event_from_proto(response)

    def stream_responses(self, request: pb.GenerateRequest) -> Generator[pb.GenerateResponse, None, None]:
        """The raw Generate stream of a prepared request; closing the generator cancels the call."""
        call = self._stub.Generate(request, **self._call_options())
        try:
            with _grpc_errors():
                yield from call
        finally:
            call.cancel()  # no-op once the stream has ended; else the server aborts the request

    def generate(self, prompt: str | Sequence[int], *, request_id: str = "", skip_special_tokens: bool = True,
                 **sampling: Any) -> Completion:
        """Generates completions for `prompt` and returns them whole (arguments as for `stream`)."""
        builder = CompletionBuilder()
        for event in self.stream(prompt, request_id=request_id, skip_special_tokens=skip_special_tokens,
                                 **sampling):
            builder.add(event)
        return builder.completion()

    def abort(self, request_id: str) -> bool:
        """Aborts a live request; False when no live request has that id."""
        with _grpc_errors():
            return self._stub.Abort(pb.AbortRequest(request_id=request_id), **self._call_options()).found

    def model_info(self) -> ModelInfo:
        """The served model and its KV cache capacity."""
        with _grpc_errors():
            return model_info_from_proto(self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                                 **self._call_options()))

    def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        return self._check_health(service)

    def _check_health(self, service: str, timeout: float | None = None) -> str:
        with _grpc_errors():
            # types-grpcio-health-checking declares HealthStub without its methods.
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service),  # type: ignore[attr-defined]
                                          **self._call_options(timeout))
        return _status_name(response)

    def wait_until_serving(self, timeout: float, service: str = "") -> None:
        """Blocks until `service` is SERVING; raises PagedServeError(DEADLINE_EXCEEDED) after `timeout` s."""
        wait = _ServingWait(self.target, timeout)
        while not wait.serving(self._health_answer(service, wait.time_left())):
            time.sleep(HEALTH_POLL_S)

    def _health_answer(self, service: str, timeout: float) -> str:
        # Fail-fast calls, polled: an unreachable server answers at once with why (the channel's capped
        # reconnect backoff bounds how late a server that comes up is noticed).
        try:
            return self._check_health(service, timeout)
        except PagedServeError as err:
            return str(err)


class AsyncResponseStream(Generic[T]):
    """An async iterator over one Generate call of the asyncio client, yielding `convert(response)`.

    The call starts at the first iteration. `aclose()`, leaving `async with`, or dropping the stream
    (as leaving an `async for` over `client.stream(...)` early does) cancels it, and the server aborts
    the request.
    """

    def __init__(self, start: Callable[[], Any], convert: Callable[[pb.GenerateResponse], T]) -> None:
        self._call: Any = None
        self._start = start
        self._convert = convert

    def __aiter__(self) -> AsyncResponseStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._call is None:
            self._call = self._start()
        with _grpc_errors():
            response = await self._call.read()
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return self._convert(response)

    def cancel(self) -> None:
        """Cancels the call if it is still running."""
        if self._call is not None and not self._call.done():
            self._call.cancel()

    async def aclose(self) -> None:
        """Cancels the call if it is still running."""
        self.cancel()

    async def __aenter__(self) -> AsyncResponseStream[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        self.cancel()


class AsyncPagedServeClient(_ClientBase):
    """asyncio client with the API of PagedServeClient; create it inside a running event loop.

    Use it with `async with` or `await close()`. `stream` returns an AsyncResponseStream for
    `async for`; the other methods are coroutines.
    """

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncPagedServeClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel, cancelling the calls still running on it."""
        await self._channel.close()

    def stream(self, prompt: str | Sequence[int], *, request_id: str = "", skip_special_tokens: bool = True,
               **sampling: Any) -> AsyncResponseStream[StreamEvent]:
        """Streams the generation of `prompt` as events (arguments as for PagedServeClient.stream)."""
        request = build_generate_request(prompt, request_id, skip_special_tokens, **sampling)
        return self._open_stream(request, event_from_proto)

    def stream_responses(self, request: pb.GenerateRequest) -> AsyncResponseStream[pb.GenerateResponse]:
        """The raw Generate stream of a prepared request."""
        return self._open_stream(request, lambda response: response)

    def _open_stream(self, request: pb.GenerateRequest,
                     convert: Callable[[pb.GenerateResponse], T]) -> AsyncResponseStream[T]:
        return AsyncResponseStream(lambda: self._stub.Generate(request, **self._call_options()), convert)

    async def generate(self, prompt: str | Sequence[int], *, request_id: str = "",
                       skip_special_tokens: bool = True, **sampling: Any) -> Completion:
        """Generates completions for `prompt` and returns them whole (arguments as for `stream`)."""
        builder = CompletionBuilder()
        async with self.stream(prompt, request_id=request_id, skip_special_tokens=skip_special_tokens,
                               **sampling) as events:
            async for event in events:
                builder.add(event)
        return builder.completion()

    async def abort(self, request_id: str) -> bool:
        """Aborts a live request; False when no live request has that id."""
        with _grpc_errors():
            response = await self._stub.Abort(pb.AbortRequest(request_id=request_id), **self._call_options())
        return response.found

    async def model_info(self) -> ModelInfo:
        """The served model and its KV cache capacity."""
        with _grpc_errors():
            info = await self._stub.GetModelInfo(pb.GetModelInfoRequest(), **self._call_options())
        return model_info_from_proto(info)

    async def health(self, service: str = "") -> str:
        """The grpc.health.v1 status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        return await self._check_health(service)

    async def _check_health(self, service: str, timeout: float | None = None) -> str:
        with _grpc_errors():
            # types-grpcio-health-checking declares HealthStub without its methods.
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),  # type: ignore[attr-defined]
                                                **self._call_options(timeout))
        return _status_name(response)

    async def wait_until_serving(self, timeout: float, service: str = "") -> None:
        """Waits until `service` is SERVING; raises PagedServeError(DEADLINE_EXCEEDED) after `timeout` s."""
        wait = _ServingWait(self.target, timeout)
        while not wait.serving(await self._health_answer(service, wait.time_left())):
            await asyncio.sleep(HEALTH_POLL_S)

    async def _health_answer(self, service: str, timeout: float) -> str:
        try:
            return await self._check_health(service, timeout)
        except PagedServeError as err:
            return str(err)
