"""Runs an ASGI app with uvicorn inside the scheduler process, on the event loop grpc.aio runs on.

The socket is bound here, before uvicorn starts, so that a taken port fails `start` with an OSError
naming it, as the gRPC port does (uvicorn itself would log the error and call sys.exit). The process's
signals stay the scheduler's: uvicorn's own handlers would take SIGTERM from the drain in
`scheduler_svc.server.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger("pagedserve.http")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    def install_signal_handlers(self) -> None:      # uvicorn < 0.29
        """Install nothing: the scheduler handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:    # uvicorn >= 0.29
        """Capture nothing: the scheduler handles SIGTERM and SIGINT."""
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise OSError(f"cannot listen for HTTP on {host}:{port}: {err.strerror or err}") from err


class HttpServer:
    """One ASGI app served on host:port by uvicorn, as a task of the running loop (TLS with a certificate)."""

    def __init__(self, app: Any, host: str, port: int, tls_cert_file: str = "", tls_key_file: str = "",
                 log_level: str = "warning") -> None:
        self.host = host
        self.port = port
        self.scheme = "https" if tls_cert_file else "http"
        # No lifespan: the app holds nothing to set up; no access log: a line per request is noise at
        # thousands of requests a second (the metrics count them); logs go through the root logger.
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                access_log=False, log_config=None, ws="none",
                                ssl_certfile=tls_cert_file or None, ssl_keyfile=tls_key_file or None)
        self._server = _EmbeddedServer(config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, then serve in the background; raises OSError when the port is taken."""
        self._socket = bind_socket(self.host, self.port)
        self.port = self._socket.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="http-server")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()         # raises what stopped it
            raise OSError(f"the HTTP server on {self.host}:{self.port} stopped at start")

    async def stop(self, grace: float) -> None:
        """Stop taking connections; open ones get `grace` seconds to finish."""
        if self._task is None:
            return
        # uvicorn annotates it int | None; it is a timeout in seconds and takes a float.
        self._server.config.timeout_graceful_shutdown = max(grace, 0.1)  # type: ignore[assignment]
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._socket is not None:
            self._socket.close()
        self._task = None
