"""Bulk batches: many URLs in one request, with progress, streamed results, cancel, delete."""

from __future__ import annotations

import csv
import functools
import io
import json
from collections.abc import Callable, Iterator

from flask import Response, g, request, stream_with_context, url_for

from api import cancel, deletion, idempotency, reads, schemas, validation
from api.auth import login_required
from api.bulk import (
    BatchDeleted,
    BatchRequest,
    Utf8Lines,
    build_batch_request,
    build_item_batch_request,
    parse_jsonl,
    parse_lines,
    retry_batch,
    submit_batch,
)
from api.errors import invalid_body
from api.ratelimit import limits
from api.services import services
from api.submission import checked_model
from api.validation import Blueprint
from shared.errors import RateLimited

blp = Blueprint("batches", __name__, url_prefix="/v1/batches", description="Bulk URL batches")

# New columns go at the end: readers that index columns by position keep working.
CSV_COLUMNS = [
    "index",
    "url",
    "status",
    "top_label",
    "top_class_id",
    "top_score",
    "error_code",
    "error_message",
    "custom_id",
    "retries",
]
JSONL_EXAMPLE = (
    '{"custom_id": "sku-1", "url": "https://example.com/a.jpg"}\n'
    '{"custom_id": "sku-2", "url": "https://example.com/b.jpg", "top_k": 3}\n'
)
TEXT_EXAMPLES = {
    "text/plain": "# one URL per line\nhttps://example.com/a.jpg\n",
    "application/jsonl": JSONL_EXAMPLE,
    "application/x-ndjson": JSONL_EXAMPLE,
}
# The JSON body is schemas.BatchCreate (@blp.arguments); a text body is read here, line
# by line, with its options (schemas.BatchOptions) in the query string, which is checked
# for every body.
BATCH_CREATE_DOC = {
    "requestBody": {
        "content": {
            mimetype: {**doc, "example": TEXT_EXAMPLES[mimetype]}
            if mimetype in TEXT_EXAMPLES
            else doc
            for mimetype, doc in schemas.batch_body_doc().items()
        },
    },
    "parameters": [
        {"in": "query", "schema": schemas.BatchOptions},
        idempotency.HEADER_DOC,
    ],
}


def _batch_request(body: dict) -> BatchRequest:
    # The query's options are checked whatever the body: a bad one is never ignored.
    query = validation.load(schemas.BatchOptions(), request.args.to_dict())
    if request.mimetype in schemas.BATCH_TEXT_TYPES:
        return _text_batch_request(query)
    fields = [f for f in ("urls", "items") if f in body]
    if len(fields) != 1:
        raise invalid_body(schemas.BatchCreate.EXPECTED)
    field = fields[0]
    numbered = list(enumerate(body[field], start=1))
    build = build_item_batch_request if field == "items" else build_batch_request
    # A JSON body's own options win over the query's.
    return _build(build, numbered, {**query, **{k: v for k, v in body.items() if k != field}})


def _text_batch_request(options: dict) -> BatchRequest:
    # Read line by line from the stream, never the whole body as one string.
    limit = services().config.max_batch_urls
    lines = Utf8Lines(request.stream)
    numbered: list[tuple[int, str]] | list[tuple[int, object]]
    if request.mimetype == "text/plain":
        build, numbered = build_batch_request, parse_lines(lines, limit)
    else:
        build, numbered = build_item_batch_request, parse_jsonl(lines, limit)
    lines.check()
    return _build(build, numbered, options)


def _build(build: Callable[..., BatchRequest], numbered: list, options: dict) -> BatchRequest:
    top_k = options.get("top_k", services().config.default_top_k)
    return build(numbered, checked_model(options.get("model")), top_k, options.get("webhook"))


def _bulk_room_first(view: Callable) -> Callable:
    """Refuse a user with no batch line left in RATE_LIMIT_BULK_LINES's window before
    the body is read: a client resubmitting 10,000 lines at once after each 429 would
    otherwise cost the parsing of every line, every time (api/ratelimit.py)."""

    @functools.wraps(view)
    def wrapper(*args, **kwargs):
        try:
            limits().check_bulk_room(g.user.id)
        except RateLimited:
            # Read (not parse) the rest of the body: answered before its end, an HTTP
            # client still sending it sees the connection reset, not the 429.
            while request.stream.read(1 << 16):
                pass
            raise
        return view(*args, **kwargs)

    return wrapper


@blp.route("", methods=["POST"])
@login_required
@_bulk_room_first
@blp.arguments(schemas.BatchCreate)
@blp.doc(**BATCH_CREATE_DOC)
@blp.response(202, schemas.BatchSchema, headers=schemas.location_header("batch"))
@blp.alt_response(402, schema=schemas.ErrorSchema, description="insufficient_tokens")
@blp.alt_response(
    400, schema=schemas.ErrorSchema, description="invalid_json (a JSON Lines line: details.lines)"
)
@blp.alt_response(
    429, schema=schemas.ErrorSchema, description="rate_limited (RATE_LIMIT_BULK_LINES)"
)
@blp.alt_response(
    422,
    schema=schemas.ErrorSchema,
    description="invalid_urls, invalid_lines, invalid_encoding (details.lines, 1-based)",
)
def create_batch(body: dict):
    """Submit up to 10,000 URLs (or JSON Lines items); charges one token each, all or nothing.

    A JSON body carries its options; a text/plain or JSON Lines body takes them from the
    query string (with a JSON body, options given in both places: the body's win).
    """
    status, body = submit_batch(g.user, _batch_request(body), idempotency.request_key())
    return body, status, {"Location": url_for("batches.get_batch", batch_id=body["id"])}


@blp.route("/<batch_id>", methods=["GET"])
@login_required
@blp.response(200, schemas.BatchSchema)
def get_batch(batch_id: str):
    """Progress: status and counts per job status (always consistent with the jobs)."""
    return reads.batch(g.user, batch_id)


@blp.route("", methods=["GET"])
@login_required
@blp.arguments(schemas.PageQuery, location="query")
@blp.response(200, schemas.BatchList)
def list_batches(query):
    """The caller's batches, newest first."""
    return reads.batches_page(g.user, query)


@blp.route("/<batch_id>/results", methods=["GET"])
@login_required
@blp.arguments(schemas.ResultsQuery, location="query")
@blp.doc(
    responses={
        "200": {
            "description": "One line per URL, in input order; `index` counts from 0 over "
            "the URLs (errors' `details.lines` count body lines from 1). If the batch is "
            "deleted while they stream, a JSON Lines stream ends with an error line "
            '({"error": {"code": "batch_deleted", ...}}) and a CSV stream is cut.',
            "content": {"application/x-ndjson": {}, "text/csv": {}},
        }
    }
)
def batch_results(query, batch_id: str):
    """Results so far, streamed: JSON Lines, or CSV with ?format=csv.

    If the batch is deleted while its results stream, a JSON Lines stream ends with an
    error line, ``{"error": {"code": "batch_deleted", ...}}``; a CSV stream is cut (the
    chunked transfer ends without its last chunk, which HTTP clients report).
    """
    results = reads.batch_results(g.user, batch_id)  # 404 before the stream starts
    if query["format"] == "csv":
        lines, mimetype = _csv_lines(results), "text/csv"
    else:
        lines, mimetype = _jsonl_lines(results), "application/x-ndjson"
    return Response(stream_with_context(lines), mimetype=mimetype)


def _jsonl_lines(rows: Iterator[dict]) -> Iterator[str]:
    try:
        for row in rows:
            yield json.dumps(row) + "\n"
    except BatchDeleted as exc:
        yield json.dumps(exc.to_dict()) + "\n"


def _csv_lines(rows: Iterator[dict]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)

    def flush() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(CSV_COLUMNS)
    yield flush()
    for row in rows:
        top = (row["predictions"] or [{}])[0]
        error = row["error"] or {}
        writer.writerow(
            [
                row["index"],
                row["url"],
                row["status"],
                top.get("label"),
                top.get("class_id"),
                top.get("score"),
                error.get("code"),
                error.get("message"),
                row["custom_id"],
                row["retries"],
            ]
        )
        yield flush()


@blp.route("/<batch_id>/cancel", methods=["POST"])
@login_required
@blp.response(200, schemas.BatchSchema)
@blp.alt_response(409, schema=schemas.ErrorSchema, description="batch_not_cancelable")
def cancel_batch(batch_id: str):
    """Cancel the jobs that have not started (refunded); running ones finish."""
    return cancel.cancel_batch(g.user, batch_id)


@blp.route("/<batch_id>/retry", methods=["POST"])
@login_required
@blp.doc(parameters=[idempotency.HEADER_DOC])
@blp.arguments(schemas.BatchRetry, required=False)
@blp.response(202, schemas.BatchRetried)
@blp.alt_response(402, schema=schemas.ErrorSchema, description="insufficient_tokens")
@blp.alt_response(409, schema=schemas.ErrorSchema, description="batch_canceled, nothing_to_retry")
@blp.alt_response(410, schema=schemas.ErrorSchema, description="batch_expired (being purged)")
@blp.alt_response(
    422,
    schema=schemas.ErrorSchema,
    description="invalid_body (not a JSON object), unknown_error_code (details.known)",
)
def retry_failed(args: dict, batch_id: str):
    """Re-queue the lines that failed (optionally only some error codes); one token each."""
    status, body = retry_batch(
        g.user, batch_id, args.get("error_codes") or [], idempotency.request_key()
    )
    return body, status


@blp.route("/<batch_id>", methods=["DELETE"])
@login_required
@blp.response(204, description="Deleted, with all its jobs and webhook events")
@blp.alt_response(404, schema=schemas.ErrorSchema, description="batch_not_found")
@blp.alt_response(409, schema=schemas.ErrorSchema, description="batch_running")
@blp.alt_response(429, schema=schemas.ErrorSchema, description="rate_limited (RATE_LIMIT_DELETE)")
def delete_batch(batch_id: str):
    """Delete an ended batch and all its jobs at once; the ledger keeps their charges."""
    deletion.delete_batch(g.user, batch_id)
