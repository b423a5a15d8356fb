"""A blocking client for one executor rank: Describe, InitCache and the Execute stream."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from pagedserve.contract.plan import StepPlan, StepResult
from pagedserve.contract.plan_codec import plan_to_proto, result_from_proto
from pagedserve.v1 import executor_pb2 as pb
from pagedserve.v1 import executor_pb2_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 2**20


class ExecutorClient:
    """Talks to one executor at `address` (host:port). `step` sends a plan and waits for its result."""

    def __init__(self, address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout: float = 60.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)])
        self._stub = executor_pb2_grpc.ExecutorServiceStub(self._channel)
        self._plans: queue.Queue[pb.StepPlan | None] | None = None
        self._results: Iterator[pb.StepResult] | None = None

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel connects (raises grpc.FutureTimeoutError)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def describe(self) -> pb.DescribeResponse:
        """The model shard the executor serves."""
        # The generated *_pb2_grpc stubs are untyped: their calls return Any.
        response: pb.DescribeResponse = self._stub.Describe(pb.DescribeRequest(), timeout=self.timeout)
        return response

    def init_cache(self, block_size: int, gpu_memory_utilization: float, swap_space_bytes: int,
                   max_num_batched_tokens: int = 0) -> pb.InitCacheResponse:
        """Have the executor profile a step and allocate its KV cache; returns its block counts."""
        request = pb.InitCacheRequest(block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
                                      swap_space_bytes=swap_space_bytes,
                                      max_num_batched_tokens=max_num_batched_tokens)
        response: pb.InitCacheResponse = self._stub.InitCache(request, timeout=self.timeout)
        return response

    def step(self, plan: StepPlan) -> StepResult:
        """Send one plan on the Execute stream (opened on first use) and return its result.

        Raises ExecutorStepError when the executor rejects the plan, grpc.RpcError when the stream
        breaks.
        """
        if self._plans is None:
            self._plans = queue.Queue()
            self._results = self._stub.Execute(iter(self._plans.get, None))
        self._plans.put(plan_to_proto(plan))
        assert self._results is not None
        return result_from_proto(next(self._results))

    def close(self) -> None:
        """End the Execute stream and the channel."""
        if self._plans is not None:
            self._plans.put(None)
            self._plans = None
        self._channel.close()
