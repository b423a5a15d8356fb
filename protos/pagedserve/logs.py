"""Logging setup shared by `pagedserve serve` and both services: a level and a text or JSON format.

`--log-format json` writes one JSON object per line (time, level, logger, message, and `request_id`
when the line is about one request), which log collectors (Loki, Fluent Bit, Cloud Logging) parse
without a pattern. Code names the request of a line with `extra={"request_id": ...}`.
The scheduler's INFO line per finished request (logger `pagedserve.requests`) can be left out with
--no-log-requests, as vLLM's --disable-log-requests did. Each flag's default comes from
PAGEDSERVE_LOG_LEVEL / PAGEDSERVE_LOG_FORMAT / PAGEDSERVE_LOG_REQUESTS, so that `pagedserve serve`
passes its own choice on to the services it starts through their environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
LEVEL_ENV = "PAGEDSERVE_LOG_LEVEL"
FORMAT_ENV = "PAGEDSERVE_LOG_FORMAT"
REQUESTS_ENV = "PAGEDSERVE_LOG_REQUESTS"
REQUEST_LOGGER = "pagedserve.requests"
_FALSE = ("0", "false", "no", "off")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id if set.

    A traceback goes in `exception` as one string, so a record stays one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single-line JSON object."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            entry["exception"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def _choice(values: tuple[str, ...], normalize: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type that accepts one of `values` in any case (defaults from the environment too)."""

    def parse(text: str) -> str:
        value = normalize(text.strip())
        if value not in values:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(values)}, got {text!r}")
        return value

    parse.__name__ = "choice"       # argparse names the type in its error message
    return parse


def add_logging_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None,
                          requests: bool = True) -> None:
    """--log-level and --log-format, defaulting to $PAGEDSERVE_LOG_LEVEL / $PAGEDSERVE_LOG_FORMAT, and
    with `requests` (the scheduler, serve) --[no-]log-requests, defaulting to $PAGEDSERVE_LOG_REQUESTS."""
    env = os.environ if environ is None else environ
    if requests:
        parser.add_argument("--log-requests", action=argparse.BooleanOptionalAction,
                            default=env.get(REQUESTS_ENV, "true").strip().lower() not in _FALSE,
                            help=f"an INFO line per finished, aborted or refused request (default on; "
                                 f"${REQUESTS_ENV})")
    parser.add_argument("--log-level", type=_choice(LEVELS, str.upper), default=env.get(LEVEL_ENV, "INFO"),
                        metavar="{" + ",".join(LEVELS) + "}",
                        help=f"least severe log level written (default INFO; ${LEVEL_ENV})")
    parser.add_argument("--log-format", type=_choice(FORMATS, str.lower),
                        default=env.get(FORMAT_ENV, "text"), metavar="{" + ",".join(FORMATS) + "}",
                        help=f"text lines, or one JSON object per line (default text; ${FORMAT_ENV})")


def configure_logging(level: str, log_format: str, stream: TextIO | None = None,
                      log_requests: bool = True) -> None:
    """Send every logger's records at `level` and above to `stream` (stderr) in `log_format`; without
    `log_requests`, the per-request lines only from WARNING up."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(REQUEST_LOGGER).setLevel(logging.NOTSET if log_requests else logging.WARNING)


def logging_environment(level: str, log_format: str, log_requests: bool = True) -> dict[str, str]:
    """The environment that gives a child service the same level, format and request lines."""
    return {LEVEL_ENV: level, FORMAT_ENV: log_format, REQUESTS_ENV: "true" if log_requests else "false"}
