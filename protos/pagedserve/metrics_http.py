"""Serve a Prometheus registry at `/metrics` over HTTP; shared by the scheduler and the executors.

Torch-free (the scheduler imports it). Each process passes its own CollectorRegistry rather than
prometheus_client's global default one, so tests can run several metric sets in one interpreter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> int:
    """Serve `registry` at http://host:port/metrics on a daemon thread; returns the bound port.

    Port 0 binds a free ephemeral port. The thread is a daemon, so it never keeps a process alive and
    needs no shutdown. Raises OSError when the address cannot be bound.
    """
    # prometheus_client >= 0.17 returns the WSGI server and its thread; the server knows the real port.
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)


def metrics_url(host: str, port: int) -> str:
    """The URL of the `/metrics` page served at host:port (IPv6 literals bracketed)."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"
