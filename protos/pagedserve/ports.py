"""Check, before a service loads anything, that the fixed ports it will listen on are free.

A taken port otherwise shows up only when the server binds it: after the model has loaded, and (for
the metrics port) as a traceback that never says which flag chose the port. `check_ports` binds each
fixed port once and names the flag of the first that is taken, so the service can exit with one line.
The real bind still reports what slips through the gap between this check and it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ListenPort:
    """A port a service will listen on, and the flag (or flags and arithmetic) that chose it."""

    flag: str           # such as "--metrics-port", or "--port + 10" for a port derived from a flag
    host: str
    port: int           # 0 (the OS picks a free port) and negative (no server) are never checked


class PortInUseError(OSError):
    """A port a service is configured to listen on cannot be bound; the message names its flag."""

    def __init__(self, listen: ListenPort, reason: str) -> None:
        super().__init__(f"{listen.flag}: cannot listen on {_address(listen.host, listen.port)}: {reason}; "
                         "choose another port")
        self.listen = listen


def check_ports(ports: Iterable[ListenPort]) -> None:
    """Raise PortInUseError for the first fixed port of `ports` that cannot be bound now."""
    for listen in ports:
        if listen.port > 0:
            _try_bind(listen)


def _try_bind(listen: ListenPort) -> None:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As the servers do: a port whose old connections linger in TIME_WAIT (a restart) is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((listen.host, listen.port))
        except OSError as err:
            in_use = err.errno == errno.EADDRINUSE
            reason = "the port is already in use" if in_use else (err.strerror or str(err))
            raise PortInUseError(listen, reason) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
