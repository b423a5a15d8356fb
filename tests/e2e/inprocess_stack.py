"""The whole stack inside the test process: the scheduler's frontend and engine and one model executor on
the embedded model, each a real gRPC server on loopback, run by one asyncio loop on a background thread.

The processes of e2e_stack.RunningStack are the faithful setup; this one exists for what they cannot
offer: a test can monkeypatch the executor's code (to force a failure) and read the scheduler's state.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc

from clients.cli import build_parser
from clients.client import PagedServeClient
from clients.serve_command import build_configs
from executor_svc.__main__ import make_backend
from executor_svc.server import start_server
from scheduler_svc.engine import Engine
from scheduler_svc.server import SchedulerServer

START_TIMEOUT = 180.0
T = TypeVar("T")


class InProcessStack:
    """A scheduler and one executor serving from this process (flags as for `pagedserve serve`)."""

    def __init__(self, *flags: str) -> None:
        args = build_parser().parse_args(["serve", "--port", "0", "--metrics-port", "-1", *flags])
        self.scheduler_config, (self.executor_config, *others) = build_configs(args)
        assert not others, "one executor rank only"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="inprocess-stack", daemon=True)
        self._thread.start()
        self._executor: grpc.aio.Server | None = None
        self._scheduler: SchedulerServer | None = None
        try:
            self._call(self._start(), START_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        assert self._scheduler is not None
        self.target = f"127.0.0.1:{self._scheduler.port}"
        http = self._scheduler.http
        self.http_url = f"http://127.0.0.1:{http.port}" if http is not None else ""

    @property
    def engine(self) -> Engine:
        """The scheduler's engine (read its scheduler between requests, not while they run)."""
        assert self._scheduler is not None
        return self._scheduler.engine

    def client(self, **kwargs: Any) -> PagedServeClient:
        """A client of this stack's frontend."""
        return PagedServeClient(self.target, **kwargs)

    def stop(self) -> None:
        """Stop both servers and the loop's thread."""
        if self._loop.is_running():
            self._call(self._stop(), 60.0)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def _call(self, coroutine: Coroutine[Any, Any, T], timeout: float) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self) -> None:
        # The executor first: the engine's handshake connects to it.
        backend = make_backend(self.executor_config)
        self._executor, _ = await start_server(self.executor_config, backend)
        self._scheduler = SchedulerServer(self.scheduler_config)
        await self._scheduler.start()
        await self._scheduler.engine.start()

    async def _stop(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.drain_and_stop()
        if self._executor is not None:
            await self._executor.stop(grace=1.0)
