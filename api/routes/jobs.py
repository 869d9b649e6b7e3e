"""Classification jobs: submit by URL or upload, read (with long-poll), list, cancel, delete."""

from __future__ import annotations

import time
from typing import Any

from flask import g, request, url_for

from api import cancel, deletion, idempotency, reads, schemas, validation
from api.auth import login_required
from api.services import services
from api.submission import JobRequest, build_request, submit, wait_within_caps
from api.validation import Blueprint
from api.waits import (
    PROCESS_LIMIT,
    SKIPPED_HEADER,
    SKIPPED_RETRY_AFTER_S,
    USER_LIMIT,
    prefer_wait,
    skipped_headers,
)
from shared import jobs
from shared.errors import ValidationFailed
from shared.status import JobStatus

blp = Blueprint("jobs", __name__, url_prefix="/v1/jobs", description="Classification jobs")

WAIT_SKIPPED_DOC = {
    SKIPPED_HEADER: {
        "description": "A requested wait was not honoured, past the caller's "
        "(user_limit) or the API process's (process_limit) cap on waits held at once; "
        "the answer shows the job as it is.",
        "schema": {"type": "string", "enum": [USER_LIMIT, PROCESS_LIMIT]},
    },
    "Retry-After": {
        "description": "With X-Wait-Skipped: seconds to wait before polling again "
        f"(currently {SKIPPED_RETRY_AFTER_S}); polling sooner is refused the same way.",
        "schema": {"type": "integer", "minimum": 0},
    },
}

PREFER_DOC = {
    "in": "header",
    "name": "Prefer",
    "schema": {"type": "string", "example": "wait=30"},
    "description": "RFC 7240. wait=N (delta-seconds, capped at MAX_WAIT_S, 60): answer "
    "200 with the finished job if it ends in time, else the usual 202; either way "
    "Preference-Applied: wait=N says the wait was honoured. Past the caps on waits held "
    "at once, 202 at once with X-Wait-Skipped and Retry-After (no Preference-Applied). "
    "An invalid wait (wait=abc) and preferences other than wait are ignored, as RFC "
    "7240 asks, not refused.",
}
PREFERENCE_APPLIED_DOC = {
    "Preference-Applied": {
        "description": "wait=N: the Prefer: wait was honoured (the request waited up to N s).",
        "schema": {"type": "string", "example": "wait=30"},
    }
}


def _job_request(body: dict) -> JobRequest:
    """The request from the JSON body (already loaded) or the multipart form (read here)."""
    if request.mimetype != "multipart/form-data":
        return build_request(**body)
    upload = request.files.get("file")
    if upload is None:
        raise ValidationFailed("The multipart form needs a 'file' field.", code="missing_input")
    form: dict[str, Any] = request.form.to_dict()
    if "webhook_events" in form:  # a form sends a list as repeated or comma-separated values
        form["webhook_events"] = [
            e.strip() for v in request.form.getlist("webhook_events") for e in v.split(",")
        ]
    fields = validation.load(schemas.JobCreate(), form)
    return build_request(upload=upload.read(), filename=upload.filename, **fields)


def _prefer_wait() -> int | None:
    # The WSGI server already joined repeated Prefer headers with commas, in order (as
    # RFC 9110 allows for list headers): one environ look-up, where getlist walks the
    # whole environ (~20 us a request, issue #22).
    value = request.headers.get("Prefer")
    return prefer_wait([value] if value else [], services().config.max_wait_s)


@blp.route("", methods=["POST"])
@login_required
@blp.arguments(schemas.JobCreate)
@blp.doc(
    requestBody={
        "content": {
            "application/json": {"schema": schemas.JobCreateDoc},
            "multipart/form-data": {"schema": "JobUpload", "encoding": schemas.IMAGE_ENCODING},
        }
    },
    parameters=[idempotency.HEADER_DOC, PREFER_DOC],
)
@blp.response(
    202,
    schemas.Job,
    description="Accepted and queued",
    headers={**schemas.location_header("job"), **WAIT_SKIPPED_DOC, **PREFERENCE_APPLIED_DOC},
)
@blp.alt_response(
    200,
    schema=schemas.Job,
    description="Finished within Prefer: wait",
    headers=PREFERENCE_APPLIED_DOC,
)
@blp.alt_response(402, schema=schemas.ErrorSchema, description="insufficient_tokens")
@blp.alt_response(409, schema=schemas.ErrorSchema, description="idempotency_key_reused")
@blp.alt_response(413, schema=schemas.ErrorSchema, description="payload_too_large, image_too_large")
@blp.alt_response(415, schema=schemas.ErrorSchema, description="unsupported_image_format")
@blp.alt_response(503, schema=schemas.ErrorSchema, description="service_unavailable")
def create_job(body: dict):
    """Submit one image by URL (JSON) or upload (multipart); costs one token."""
    wait_s = _prefer_wait()
    job_request = _job_request(body)
    key = idempotency.request_key()
    # A job submitted now did not exist before (unless a key replays an older one).
    created_after = None if key else time.monotonic()
    status, body = submit(g.user, job_request, key)
    if wait_s and status == 202:
        job, skipped = wait_within_caps(g.user.id, body["id"], wait_s, created_after)
        if skipped:
            return body, status, {**skipped_headers(skipped), **_location(body)}
        applied = {"Preference-Applied": f"wait={wait_s}"}
        if JobStatus(job["status"]).is_terminal():
            return job, 200, applied
        return job, status, {**applied, **_location(body)}
    return body, status, _location(body)


def _location(job: dict) -> dict[str, str]:
    return {"Location": url_for("jobs.get_job", job_id=job["id"])}


@blp.route("/<job_id>", methods=["GET"])
@login_required
@blp.arguments(schemas.WaitQuery, location="query")
@blp.response(200, schemas.Job, headers=WAIT_SKIPPED_DOC)
@blp.alt_response(404, schema=schemas.ErrorSchema, description="job_not_found")
def get_job(query, job_id: str):
    """A job; with ?wait=N, answer as soon as it is final or after N seconds.

    Past the caps on waits held at once the answer comes without waiting, with
    X-Wait-Skipped.
    """
    job = reads.job(g.user, job_id)
    wait_s = min(query["wait"], services().config.max_wait_s)
    if not wait_s or JobStatus(job.status).is_terminal():
        return jobs.job_to_dict(job), 200, {}
    body, skipped = wait_within_caps(g.user.id, job_id, wait_s)
    return body, 200, skipped_headers(skipped) if skipped else {}


@blp.route("", methods=["GET"])
@login_required
@blp.arguments(schemas.JobListQuery, location="query")
@blp.response(200, schemas.JobList)
def list_jobs(query):
    """The caller's jobs, newest first; follow next_cursor for the next page."""
    return reads.jobs_page(g.user, query)


@blp.route("/<job_id>/cancel", methods=["POST"])
@login_required
@blp.response(200, schemas.Job)
@blp.alt_response(409, schema=schemas.ErrorSchema, description="job_not_cancelable")
def cancel_job(job_id: str):
    """Cancel a queued job and refund its token; a job already processing finishes."""
    return jobs.job_to_dict(cancel.cancel_job(g.user, job_id))


@blp.route("/<job_id>", methods=["DELETE"])
@login_required
@blp.response(204, description="Deleted, with its input, result and webhook events")
@blp.alt_response(404, schema=schemas.ErrorSchema, description="job_not_found")
@blp.alt_response(409, schema=schemas.ErrorSchema, description="job_not_finished, job_in_batch")
@blp.alt_response(429, schema=schemas.ErrorSchema, description="rate_limited (RATE_LIMIT_DELETE)")
def delete_job(job_id: str):
    """Delete a finished job at once; its charge and refund stay in the ledger."""
    deletion.delete_job(g.user, job_id)
