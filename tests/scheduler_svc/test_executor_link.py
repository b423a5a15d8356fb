"""The engine's link to a rank reconnects quickly to a rank that starts (or restarts) listening late."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from scheduler_svc.executor_link import ExecutorLink


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _poll_until_serving(link: ExecutorLink, deadline: float) -> float:
    """Poll as the engine's handshake does; the seconds it took to see SERVING."""
    start = time.monotonic()
    while not await link.is_serving(timeout=2.0):
        assert time.monotonic() < deadline, "never saw SERVING"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def test_a_rank_that_starts_listening_late_is_reached_within_half_a_second():
    """gRPC's default reconnect backoff (1 s, growing 1.6x per failed attempt) made the scheduler see a
    freshly started executor seconds late: about 3 s of `pagedserve serve`'s time to the first token."""

    async def scenario() -> float:
        port = _free_port()
        link = ExecutorLink(f"127.0.0.1:{port}", rank=0)
        try:
            for _ in range(3):                      # refused attempts grow the channel's backoff
                assert not await link.is_serving(timeout=0.5)
                await asyncio.sleep(0.3)
            server = grpc.aio.server()
            servicer = health.aio.HealthServicer()
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            try:
                return await _poll_until_serving(link, time.monotonic() + 10)
            finally:
                await server.stop(None)
        finally:
            await link.close()

    assert asyncio.run(scenario()) < 0.9


def test_the_links_channel_retries_a_refused_connection_within_half_a_second():
    """The options behind the test above, checked directly: gRPC's reconnect backoff is randomised, so
    the timing alone does not catch the default every time."""
    options = dict(ExecutorLink("127.0.0.1:1", rank=0)._options)
    assert options["grpc.initial_reconnect_backoff_ms"] <= 100
    assert options["grpc.max_reconnect_backoff_ms"] <= 500
