"""The launcher's handling of its services' log lines in both formats: labelled, and read for readiness."""

from __future__ import annotations

import json
import logging

from clients.stack import LISTENING, READY, labelled_line
from pagedserve.logs import TEXT_FORMAT, JsonFormatter

SERVING = logging.LogRecord("pagedserve.engine", logging.INFO, __file__, 1,
                            "serving %s: %d GPU blocks", ("stdlib-llama", 64), None)
LISTENING_RECORD = logging.LogRecord("pagedserve.scheduler", logging.INFO, __file__, 1,
                                     "pagedserve-scheduler listening on %s:%d (insecure)",
                                     ("127.0.0.1", 50051), None)


def test_a_text_line_gets_the_service_name_in_front():
    assert labelled_line("executor-0", "2026 INFO x: up\n") == "[executor-0] 2026 INFO x: up\n"
    assert labelled_line("scheduler", "{not json\n") == "[scheduler] {not json\n"


def test_a_json_line_stays_one_json_object_with_the_service_added():
    line = JsonFormatter().format(SERVING) + "\n"
    labelled = labelled_line("scheduler", line)
    assert labelled.endswith("\n")
    entry = json.loads(labelled)
    assert entry["service"] == "scheduler" and entry["message"].startswith("serving stdlib-llama")


def test_readiness_and_the_address_are_read_from_either_format():
    for formatter in (logging.Formatter(TEXT_FORMAT), JsonFormatter()):
        assert READY.search(formatter.format(SERVING)) is not None
        match = LISTENING.search(formatter.format(LISTENING_RECORD))
        assert match is not None and match.groups() == ("127.0.0.1", "50051")
