"""Every error leaves the API as ``{"error": {"code", "message"}}`` with the right status."""

from __future__ import annotations

import logging

import redis.exceptions
from flask import Flask, current_app, jsonify, request
from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from shared.errors import NotFound, ServiceError, ServiceUnavailable, ValidationFailed
from shared.models import is_row_id

log = logging.getLogger(__name__)

# Werkzeug's HTTP errors get stable codes too (routing, method, size limits).
HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
}

UNAVAILABLE = (
    OperationalError,
    PoolTimeout,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    BrokerError,
)


def error_response(err: ServiceError, body: dict | None = None):
    """The JSON error response; ``body`` replaces the standard one (the seed endpoints')."""
    response = jsonify(err.to_dict() if body is None else body)
    response.status_code = err.status
    response.headers.update(err.headers)
    if err.status == 401:
        response.headers["WWW-Authenticate"] = _auth_challenge()
    return response


def _auth_challenge() -> str:
    # RFC 9110: every 401 names the schemes that would work, whatever the cause. A
    # Basic challenge makes a browser pop up its own login box, so the web pages' calls
    # (session cookie, no Authorization header) are offered Bearer only.
    from_web_page = (
        "Authorization" not in request.headers
        and current_app.config["SESSION_COOKIE_NAME"] in request.cookies
    )
    return 'Bearer realm="imgclf"' if from_web_page else 'Basic realm="imgclf", Bearer'


def check_row_id(row_id: str, noun: str) -> None:
    """404 ``{noun}_not_found`` for a job or batch id no row can have, before it reaches
    SQL: PostgreSQL stores them as uuid and refuses to compare one with text that is
    not a uuid (a DataError, not a miss); SQLite found nothing. Same answer on both."""
    if not is_row_id(row_id):
        raise NotFound(f"No such {noun}.", code=f"{noun}_not_found")


def invalid_body(expected: str) -> ValidationFailed:
    """``invalid_body``, saying what was sent: ``curl -d`` without ``-H`` sends a form."""
    if request.mimetype == "application/json":
        sent = "the body is not a JSON object"
    elif request.mimetype:
        sent = f"this request's Content-Type is {request.mimetype}"
    else:
        sent = "this request has no Content-Type"
    return ValidationFailed(
        f"Send {expected}; {sent}. With curl, add -H 'Content-Type: application/json'.",
        code="invalid_body",
    )


def _http_error(exc: HTTPException):
    data = getattr(exc, "data", None) or {}
    details = data.get("messages") or data.get("errors")
    headers = dict(data.get("headers") or {})
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        headers["Allow"] = ", ".join(exc.valid_methods)  # RFC 9110: every 405 lists them
    err = ServiceError(
        _http_message(exc, data, details),
        code=HTTP_CODES.get(exc.code or 500, "http_error"),
        status=exc.code or 500,
        details={"fields": _flatten(details)} if details else None,
        headers=headers,
    )
    return error_response(err)


def _http_message(exc: HTTPException, data: dict, details) -> str:
    if details and exc.code == 422:
        return ValidationFailed.message  # one sentence, whichever layer found the fields
    if request.url_rule is None and exc.code in (404, 405):  # the path itself is wrong
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            return f"{request.method} is not allowed on {request.path}; use {', '.join(allowed)}."
        return f"No such path: {request.path}. The endpoints are listed at /docs/."
    return data.get("message") or exc.description or ""


def _flatten(messages):
    # webargs nests errors by location ({"json": {"url": [...]}}); clients want fields.
    if isinstance(messages, dict) and len(messages) == 1:
        (only,) = messages.values()
        if isinstance(only, dict):
            return only
    return messages


def _unavailable(exc: Exception):
    log.warning("dependency unavailable: %r", exc)
    return error_response(ServiceUnavailable())


def _bad_value(exc: DataError):
    # The database refused a value the validation let through (a NUL character in a
    # string, a number out of range): the client's input, never our fault.
    log.info("database refused an input value: %s", exc.orig)
    return error_response(
        ValidationFailed("A value in the request cannot be stored.", code="invalid_value")
    )


def _unexpected(exc: Exception):
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return _unavailable(exc)
    log.exception("unhandled error")
    return error_response(ServiceError())


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ServiceError, error_response)
    app.register_error_handler(DataError, _bad_value)
    app.register_error_handler(HTTPException, _http_error)
    for exc_type in UNAVAILABLE:
        app.register_error_handler(exc_type, _unavailable)
    app.register_error_handler(Exception, _unexpected)
