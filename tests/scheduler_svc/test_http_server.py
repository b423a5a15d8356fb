"""uvicorn inside the scheduler: it serves on the running loop, leaves the signals alone, and a taken port
fails start with the port named."""

from __future__ import annotations

import asyncio
import signal
import socket

import httpx2
import pytest
from fastapi import FastAPI

from scheduler_svc.http_server import HttpServer


def app() -> FastAPI:
    api = FastAPI()

    @api.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return api


def test_it_serves_on_the_loop_and_stops_leaving_signal_handlers_alone():
    async def scenario() -> tuple[int, dict]:
        before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
        server = HttpServer(app(), "127.0.0.1", 0)
        await server.start()
        assert server.port > 0 and server.scheme == "http"
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            reply = await client.get("/ping")
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        await server.stop(grace=1.0)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
        return reply.status_code, reply.json()

    assert asyncio.run(scenario()) == (200, {"pong": "yes"})


def test_a_taken_port_fails_start_naming_it():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario() -> None:
            await HttpServer(app(), "127.0.0.1", port).start()

        with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            asyncio.run(scenario())
