"""pagedserve.logs: --log-level and --log-format (flags and environment) and the JSON line format."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys

import pytest

from pagedserve.logs import JsonFormatter, add_logging_arguments, configure_logging, logging_environment


def parse(argv: list[str], environ: dict[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser, environ or {})
    return parser.parse_args(argv)


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("pagedserve.engine", logging.INFO, __file__, 1, message, args, None)
    made.__dict__.update(extra)
    return made


def test_a_json_line_has_time_level_logger_message_and_the_request_id():
    line = JsonFormatter().format(record("request %s finished", "r-1", request_id="r-1"))
    entry = json.loads(line)
    assert entry.keys() == {"time", "level", "logger", "message", "request_id"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "pagedserve.engine",
                                                                   "request r-1 finished")
    assert entry["request_id"] == "r-1" and entry["time"].endswith("Z") and "T" in entry["time"]


def test_a_json_line_without_a_request_has_no_request_id_and_a_traceback_stays_on_one_line():
    assert "request_id" not in json.loads(JsonFormatter().format(record("idle")))
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info())
    line = JsonFormatter().format(failed)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exception"]


def test_the_flags_default_to_text_info_or_the_environment_and_a_flag_wins():
    args = parse([])
    assert (args.log_level, args.log_format) == ("INFO", "text")
    environ = logging_environment("DEBUG", "json")
    args = parse([], environ)
    assert (args.log_level, args.log_format) == ("DEBUG", "json")
    args = parse(["--log-level", "warning", "--log-format", "TEXT"], environ)
    assert (args.log_level, args.log_format) == ("WARNING", "text")


@pytest.mark.parametrize(("argv", "environ"), [(["--log-format", "xml"], {}), (["--log-level", "loud"], {}),
                                               ([], {"PAGEDSERVE_LOG_FORMAT": "yaml"})])
def test_an_unknown_level_or_format_is_a_usage_error(argv, environ, capsys):
    with pytest.raises(SystemExit) as exited:
        parse(argv, environ)
    assert exited.value.code == 2 and "must be one of" in capsys.readouterr().err


def test_configure_logging_writes_every_logger_as_json_lines_at_the_level():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json", stream)
        logging.getLogger("pagedserve.requests").info("request %s done", "a", extra={"request_id": "a"})
        logging.getLogger("pagedserve.engine").debug("not written")
    finally:
        root.handlers[:] = handlers         # pytest's capture handlers, for the tests after this one
        root.setLevel(level)
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["a"]


def test_request_lines_are_on_by_default_and_off_with_the_flag_or_the_environment():
    assert parse([]).log_requests is True
    assert parse(["--no-log-requests"]).log_requests is False
    assert parse([], {"PAGEDSERVE_LOG_REQUESTS": "false"}).log_requests is False
    assert parse(["--log-requests"], {"PAGEDSERVE_LOG_REQUESTS": "0"}).log_requests is True
    assert logging_environment("INFO", "text", False)["PAGEDSERVE_LOG_REQUESTS"] == "false"
    executor = argparse.ArgumentParser()
    add_logging_arguments(executor, {}, requests=False)
    assert not hasattr(executor.parse_args([]), "log_requests")


def test_without_request_lines_the_request_logger_keeps_only_warnings():
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging("INFO", "text", stream, log_requests=False)
        logging.getLogger("pagedserve.requests").info("request a finished")
        logging.getLogger("pagedserve.engine").info("serving m")
        configure_logging("INFO", "text", stream)
        logging.getLogger("pagedserve.requests").info("request b finished")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    text = stream.getvalue()
    assert "request a" not in text and "serving m" in text and "request b" in text
