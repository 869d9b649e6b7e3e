"""Text logs never pass a control character through to the reader's terminal."""

from __future__ import annotations

import logging

from shared.logs import TEXT_FORMAT, TextFormatter


def test_ansi_escapes_in_logged_values_are_escaped() -> None:
    record = logging.LogRecord(
        "imgclf.test",
        logging.WARNING,
        __file__,
        1,
        "fetch %s failed",
        ("http://x/\x1b[2J\x07",),
        None,
    )
    record.request_id = "r1"
    line = TextFormatter(TEXT_FORMAT).format(record)
    assert "\x1b" not in line and "\x07" not in line
    assert line.endswith("fetch http://x/\\x1b[2J\\x07 failed")
