"""The engine's asyncio connection to one executor rank: handshake and the Execute stream."""

from __future__ import annotations

import asyncio
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.v1 import executor_pb2 as pb
from pagedserve.v1 import executor_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20


class ExecutorLink:
    """One rank at `address`: `describe`, `init_cache`, then `open_stream` and `send`/`receive` plans.

    Plans and results are protobuf messages: the engine encodes a plan once for every rank. Any
    failure surfaces as grpc.RpcError (grpc.aio.AioRpcError); the engine then treats the rank as lost.
    """

    def __init__(self, address: str, rank: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 call_timeout: float = 600.0) -> None:
        self.address = address
        self.rank = rank
        self.call_timeout = call_timeout
        self._options = [("grpc.max_send_message_length", max_message_bytes),
                         ("grpc.max_receive_message_length", max_message_bytes),
                         # A rank that is still starting (or restarting) refuses connections: retry within
                         # half a second, not gRPC's default backoff of 1 s growing 1.6x per attempt,
                         # which held up the first token of `serve` by about 3 s.
                         ("grpc.initial_reconnect_backoff_ms", 100),
                         ("grpc.max_reconnect_backoff_ms", 500)]
        self._channel: grpc.aio.Channel | None = None
        self._stub: executor_pb2_grpc.ExecutorServiceStub | None = None
        self._stream: grpc.aio.StreamStreamCall[pb.StepPlan, pb.StepResult] | None = None

    def _connect(self) -> executor_pb2_grpc.ExecutorServiceStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._stub = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        return self._stub

    async def is_serving(self, timeout: float) -> bool:
        """Whether the rank answers its health check with SERVING within `timeout` seconds."""
        self._connect()
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            # types-grpcio-health-checking declares HealthStub without its methods.
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)  # type: ignore[attr-defined]
        except grpc.RpcError:
            return False
        status: int = reply.status
        return status == health_pb2.HealthCheckResponse.SERVING

    async def describe(self) -> pb.DescribeResponse:
        """The model shard the rank serves."""
        # The generated *_pb2_grpc stubs are untyped: their calls return Any.
        response: pb.DescribeResponse = await self._connect().Describe(pb.DescribeRequest(),
                                                                       timeout=self.call_timeout)
        return response

    async def init_cache(self, request: pb.InitCacheRequest) -> pb.InitCacheResponse:
        """Have the rank profile a step and allocate its KV cache; returns its block counts."""
        response: pb.InitCacheResponse = await self._connect().InitCache(request, timeout=self.call_timeout)
        return response

    def open_stream(self) -> None:
        """Start a new Execute stream; the rank begins it holding no sequences."""
        self._stream = self._connect().Execute()

    async def send(self, plan: pb.StepPlan) -> None:
        """Write one plan on the open stream; raises grpc.RpcError when the stream has ended."""
        assert self._stream is not None, "open_stream() first"
        try:
            await self._stream.write(plan)
        except asyncio.InvalidStateError:
            # grpc.aio's answer to a write on a call that already ended (the rank died between two
            # plans): the same loss as a broken read, so it must reach the engine as one.
            raise StreamEndedError(f"executor rank {self.rank} at {self.address}: its Execute stream "
                                   "had already ended when a plan was sent") from None

    async def receive(self) -> pb.StepResult:
        """Read the next result; raises grpc.RpcError when the stream ended or broke."""
        assert self._stream is not None, "open_stream() first"
        result = await self._stream.read()
        if result is grpc.aio.EOF:
            raise StreamEndedError(f"executor rank {self.rank} at {self.address} closed its Execute stream")
        return cast(pb.StepResult, result)  # read() is typed as EOF or any object

    def close_stream(self) -> None:
        """Cancel the Execute stream, if one is open."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def close(self) -> None:
        """Close the stream and the channel; the link can connect again afterwards."""
        self.close_stream()
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None


class StreamEndedError(grpc.RpcError):
    """An executor ended its Execute stream without an error status (it shut down)."""

    def code(self) -> grpc.StatusCode:
        """Reported as UNAVAILABLE, like a connection loss."""
        return grpc.StatusCode.UNAVAILABLE
