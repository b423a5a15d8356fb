"""The connection flags every client subcommand shares: --target, --token, --tls-ca, --tls, --timeout."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from clients.client import DEFAULT_TARGET, PagedServeClient
from pagedserve.errors import InvalidArgumentError

TOKEN_ENV = "PAGEDSERVE_TOKEN"


def add_connection_arguments(parser: argparse.ArgumentParser, timeout: float | None = None) -> None:
    """Adds the connection flags to `parser`; `timeout` is the default of --timeout (None: no deadline)."""
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, metavar="HOST:PORT",
                       help=f"the server's address (default {DEFAULT_TARGET})")
    group.add_argument("--token", help=f"access token sent as 'authorization: Bearer'; default ${TOKEN_ENV}")
    group.add_argument("--tls-ca", type=Path, metavar="FILE",
                       help="connect with TLS, trusting the PEM root certificates in FILE")
    group.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots")
    no_deadline = "no deadline" if timeout is None else f"{timeout:g}"
    group.add_argument("--timeout", type=float, default=timeout, metavar="S",
                       help=f"deadline of each call in seconds (default {no_deadline})")


def read_root_certificates(path: Path | None) -> bytes | None:
    """The PEM file given by --tls-ca, or None without one; an unreadable file is an error naming it."""
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidArgumentError("tls-ca", f"cannot read {path}: {err.strerror}") from None


def client_from_args(args: argparse.Namespace) -> PagedServeClient:
    """A blocking client configured by the connection flags."""
    root_certificates = read_root_certificates(args.tls_ca)
    # The token is read from the environment here, not as the flag's default, so --help never shows it.
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return PagedServeClient(args.target, token=token, root_certificates=root_certificates, tls=args.tls,
                            timeout=args.timeout)
