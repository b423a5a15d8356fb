"""`pagedserve info`: the served model and the capacity of its KV cache (GetModelInfo)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from clients.connection_args import add_connection_arguments, client_from_args
from clients.tables import markdown_table

DEFAULT_TIMEOUT_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--json and the connection flags."""
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    add_connection_arguments(parser, timeout=DEFAULT_TIMEOUT_S)


def _cell(value: object) -> object:
    return ", ".join(map(str, value)) if isinstance(value, tuple) else value


def run(args: argparse.Namespace) -> int:
    """Print the model info as a two-column table, or as JSON."""
    with client_from_args(args) as client:
        info = dataclasses.asdict(client.model_info())
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(markdown_table(["field", "value"], [[name, _cell(value)] for name, value in info.items()]))
    return 0
