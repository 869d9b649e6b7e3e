"""Logging set-up shared by the API and the workers: one line per record, JSON or text,
carrying the request id of the API call that started the work.

The API takes ``X-Request-ID`` from the client (or makes one), stores it on the job,
and the worker and the webhook worker set it again while they handle that job, so
one id follows a job from the API through the worker to its webhook.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key in ("job_id", "batch_id", "event_id"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# C0 and C1 controls but newline and tab: an ANSI escape in a logged value (a URL, a
# name) must not reach the reader's terminal. JSON lines escape them already.
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def escape_controls(text: str) -> str:
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


# Libraries that log routine start-up at INFO: alembic names each of its seven built-in
# plugins when it is imported (the API, `flask create-admin`), which buries the lines a
# reader is looking for. Their warnings and errors still show.
QUIET_LOGGERS = ("alembic.runtime.plugins",)


def configure(level: str, fmt: str) -> None:
    """Install one stderr handler on the root logger (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in root.handlers:
        if getattr(handler, "_imgclf", False):
            return
    handler = logging.StreamHandler(sys.stderr)
    handler._imgclf = True  # type: ignore[attr-defined]
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root.addHandler(handler)
