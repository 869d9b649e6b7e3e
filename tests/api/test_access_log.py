"""gunicorn.conf.py's access logger writes the same lines as gunicorn's own (issue #22:
it only builds fewer atoms for the default format)."""

from __future__ import annotations

import datetime
import logging
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

from tests import support

ENVIRON = {
    "REQUEST_METHOD": "POST",
    "RAW_URI": "/v1/jobs?x=1",
    "PATH_INFO": "/v1/jobs",
    "QUERY_STRING": "x=1",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "10.0.0.7",
    "HTTP_USER_AGENT": 'curl/8 "quoted"',
    "HTTP_AUTHORIZATION": "Basic dXNlcjpwYXNz",  # user:pass: the %(u)s atom
}
REQUEST = SimpleNamespace(headers=[("USER-AGENT", 'curl/8 "quoted"'), ("PREFER", "wait=5")])


def _line(logger_class, access_log_format: str | None, sent) -> str:
    cfg = Config()
    if access_log_format:
        cfg.set("access_log_format", access_log_format)
    logger = logger_class(cfg)
    logger.now = lambda: "[06/Dec/2026:12:00:00 +0000]"  # the same instant for both
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.access_log.addHandler(handler)
    logger.access_log.setLevel(logging.INFO)
    logger._access_log_enabled = True
    response = SimpleNamespace(status="202 ACCEPTED", sent=sent, headers=[("X-Request-ID", "abc")])
    logger.access(response, REQUEST, ENVIRON, datetime.timedelta(microseconds=1500))
    (line,) = lines
    return line


@pytest.mark.parametrize("sent", [512, 0, None])
@pytest.mark.parametrize("access_log_format", [None, "%(m)s %(U)s %({x-request-id}o)s %(D)s"])
def test_the_access_line_is_gunicorns(access_log_format, sent):
    ours = _line(support.load_gunicorn_conf().AccessLogger, access_log_format, sent)
    assert ours == _line(Logger, access_log_format, sent)
    assert ours.startswith("10.0.0.7" if access_log_format is None else "POST /v1/jobs abc")
