"""`pagedserve healthcheck`: exit 0 when the server's health service reports SERVING, 1 otherwise.

Prints the status (SERVING, NOT_SERVING, ...); an unreachable server prints the gRPC error to stderr.
Made for docker HEALTHCHECK and scripts that wait for a server.
"""

from __future__ import annotations

import argparse

from clients.connection_args import add_connection_arguments, client_from_args

DEFAULT_TIMEOUT_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The service to check and the connection flags (a short default deadline)."""
    parser.add_argument("--service", default="",
                        help='the grpc.health.v1 service name to check (default "": the whole server)')
    add_connection_arguments(parser, timeout=DEFAULT_TIMEOUT_S)


def run(args: argparse.Namespace) -> int:
    """Print the health status; 0 when SERVING, else 1 (a failed call raises PagedServeError)."""
    with client_from_args(args) as client:
        status = client.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1
