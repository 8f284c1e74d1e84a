"""JSON log lines: one object per line with time, level, logger, message and extras."""

from __future__ import annotations

import logging
import sys

import orjson

from qmtl_dagmanager.logs import JsonFormatter


def test_a_json_line_carries_the_message_and_extras() -> None:
    record = logging.LogRecord(
        "qmtl_dagmanager.x", logging.WARNING, "f.py", 1, "gc of %s", ("t",), None
    )
    record.strategy = "s1"
    doc = orjson.loads(JsonFormatter().format(record))
    assert (doc["level"], doc["logger"], doc["message"], doc["strategy"]) == (
        "warning",
        "qmtl_dagmanager.x",
        "gc of t",
        "s1",
    )
    assert doc["time"].endswith("+00:00")


def test_an_exception_is_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("n", logging.ERROR, "f", 1, "failed", (), sys.exc_info())
    doc = orjson.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"] and "\n" not in JsonFormatter().format(record)
