"""Submitting a job: validate, charge and insert in one transaction, then enqueue.

Order matters for "nothing half-written":
1. an upload goes to Redis first (Redis down: 503 before any SQL write);
2. one SQL transaction charges the token, inserts the job and the idempotency record;
3. only after the commit is the job id sent to the broker; if that fails, a
   compensating transaction deletes the job and voids its charge (shared/ledger.py) and
   returns 503, unless a worker already claimed the job (a publish can fail after the
   broker took the message): then the job stays, charged, and the answer is 202.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from api import idempotency
from api.ratelimit import limits
from api.services import services, unit_of_work
from api.waits import skipped_headers, wait_slots
from shared import jobs, logs
from shared.config import BUILTIN_MODELS, TRAINED_MODEL_FILE, TRAINED_MODEL_NAME
from shared.db import one_statement
from shared.errors import (
    NotAnImage,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from shared.events import Waiter
from shared.image_header import probe
from shared.images import ALLOWED_FORMATS, pixel_limit_message
from shared.jobs import JOBS, JobRow, job_to_dict
from shared.models import Job, User
from shared.queue import enqueue_jobs
from shared.status import TERMINAL, JobStatus
from shared.webhook_events import COMPLETED

log = logging.getLogger(__name__)

# Built once: a long-poll reads its job with it on each wake-up.
READ_JOB = select(*JOBS.c).where(JOBS.c.id == bindparam("job_id"))
TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


@dataclass(frozen=True)
class JobRequest:
    model: str
    top_k: int
    url: str | None = None
    upload: bytes | None = None
    filename: str | None = None
    webhook_url: str | None = None
    webhook_events: tuple[str, ...] | None = None

    def fingerprint(self) -> str:
        payload = {
            "model": self.model,
            "top_k": self.top_k,
            "url": self.url,
            "webhook": [self.webhook_url, self.webhook_events],
        }
        if self.upload is not None:
            payload["upload"] = hashlib.sha256(self.upload).hexdigest()
            payload["filename"] = self.filename
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def validate_upload(data: bytes, filename: str | None) -> None:
    """Checks that do not look inside the file; its header is read after the rate limit."""
    config = services().config
    if len(data) > config.max_image_bytes:
        raise PayloadTooLarge(
            f"The file is {len(data):,} bytes; the limit is {config.max_image_bytes:,} bytes "
            "(MAX_IMAGE_BYTES)."
        )
    if not data:
        raise ValidationFailed("The uploaded file is empty.", code="empty_file")


def check_image_header(data: bytes) -> None:
    """Format and size from a bounded walk of the header (shared/image_header.py), never a decode.

    Runs after authentication and the rate limit, so even this small cost is not free
    to repeat; the worker decodes under its pixel budget.
    """
    try:
        header = probe(data)
    except NotAnImage as exc:
        reason = "" if exc.message == NotAnImage.message else f" {exc.message}"
        raise UnsupportedMediaType(
            "The file is not an image in a supported format "
            f"({', '.join(sorted(ALLOWED_FORMATS))}).{reason}",
            code="unsupported_image_format",
        ) from None
    max_pixels = services().config.max_image_pixels
    if header.pixels > max_pixels:
        raise PayloadTooLarge(
            pixel_limit_message(header.width, header.height, max_pixels), code="image_too_large"
        )


def checked_model(model: str | None) -> str:
    config = services().config
    model = model or config.default_model
    if model in config.models:
        return model
    available = ", ".join(config.models)
    if model in BUILTIN_MODELS or _is_trained_model(config.model_dir, model):
        raise ValidationFailed(
            f"Model {model!r} exists but is not enabled on this service (enabled: {available}). "
            "An administrator enables it by adding it to the MODELS setting.",
            code="model_not_enabled",
        )
    raise ValidationFailed(
        f"Unknown model {model!r}; available: {available}.", code="unknown_model"
    )


def _is_trained_model(model_dir: str, name: str) -> bool:
    # Only names the training pipeline can give: a job's model name never walks the disk.
    return (
        bool(TRAINED_MODEL_NAME.fullmatch(name))
        and (Path(model_dir) / name / TRAINED_MODEL_FILE).is_file()
    )


def build_request(
    *,
    url: str | None = None,
    upload: bytes | None = None,
    filename: str | None = None,
    model: str | None = None,
    top_k: int | None = None,
    webhook: str | None = None,
    webhook_events: list[str] | None = None,
) -> JobRequest:
    """A job request from fields the schemas already checked (api/schemas.py ``JobCreate``):
    the model must be enabled, and there must be one input, a url or an upload."""
    model = checked_model(model)
    top_k = services().config.default_top_k if top_k is None else top_k
    events = tuple(dict.fromkeys(webhook_events or [COMPLETED])) if webhook else None
    request = functools.partial(
        JobRequest, model=model, top_k=top_k, webhook_url=webhook or None, webhook_events=events
    )
    if upload is not None:
        if url:
            raise ValidationFailed("Send either a url or a file, not both.", code="ambiguous_input")
        validate_upload(upload, filename)
        return request(upload=upload, filename=filename or "upload")
    if not url:
        raise ValidationFailed("A 'url' or a 'file' upload is required.", code="missing_input")
    return request(url=url)


def submit(user: User, req: JobRequest, idempotency_key: str | None = None) -> tuple[int, dict]:
    """Charge, insert, commit, enqueue. Returns (HTTP status, job body)."""
    # Only a request with a key is compared with another (a hash of its JSON).
    fingerprint = req.fingerprint() if idempotency_key else ""
    row = _new_row(user.id, req)
    try:
        with unit_of_work() as session:
            if idempotency_key and (
                found := idempotency.replay(user.id, idempotency_key, fingerprint)
            ):
                return found
            _admit(user.id, row["id"], req)
            body = _charge_and_insert(session, row, idempotency_key, fingerprint)
    except Exception:
        _forget_upload(row["id"], req)
        # A concurrent request with the same idempotency key may have committed first.
        if found := idempotency.replay_if_raced(user.id, idempotency_key, fingerprint):
            return found
        raise
    return 202, _enqueue_or_undo(user.id, row["id"], req, body)


def _new_row(user_id: int, req: JobRequest) -> dict:
    return jobs.new_row(
        user_id=user_id,
        model=req.model,
        top_k=req.top_k,
        input_url=req.url,
        input_filename=req.filename if req.upload is not None else None,
        webhook_url=req.webhook_url,
        webhook_events=list(req.webhook_events) if req.webhook_events else None,
        request_id=logs.request_id.get(),
    )


def _admit(user_id: int, job_id: str, req: JobRequest) -> None:
    """The rate limit, then an upload's header and its bytes to Redis: before the charge,
    so a refusal or Redis down charges nothing."""
    limits().check_submission(user_id)
    if req.upload is not None:
        check_image_header(req.upload)
        services().uploads.put(job_id, req.upload)


def _charge_and_insert(session: Session, row: dict, key: str | None, fingerprint: str) -> dict:
    # Core, no ORM unit of work (flush), on the hottest write path: charge, ledger row and
    # job in one statement on PostgreSQL (shared/jobs.py insert_charged). Without a key it
    # is the transaction's only statement: alone, it runs on the driver and commits itself.
    jobs.insert_charged(session, row, alone=not key)
    body = job_to_dict(row)
    if key:
        idempotency.save(row["user_id"], key, fingerprint, body)
    return body


def _forget_upload(job_id: str, req: JobRequest) -> None:
    if req.upload is not None:
        try:
            services().uploads.delete(job_id)
        except Exception:  # the TTL removes it anyway
            log.warning("could not delete upload of job %s", job_id)


def _enqueue_or_undo(user_id: int, job_id: str, req: JobRequest, body: dict) -> dict:
    """Send the job; if the send fails, take the job back unless a worker already has it.

    A publish can raise after the broker took the message, and a worker may claim the job
    before the undo runs. Then the job is running and rightly charged: it is answered as
    accepted, not as a 503 that would claim nothing was charged.
    """
    svc = services()
    try:
        enqueue_jobs(svc.celery, svc.config, [job_id])
    except Exception as exc:
        log.warning("enqueue failed for job %s: %r; undoing the submission", job_id, exc)
        if not _undo(user_id, job_id):
            log.warning("job %s was already claimed by a worker; answering it as accepted", job_id)
            return body
        _forget_upload(job_id, req)
        raise ServiceUnavailable("The job queue is unavailable; nothing was charged.") from exc
    return body


def _undo(user_id: int, job_id: str) -> bool:
    """Withdraw the job and its charge, in one transaction, only if it is still queued.

    Returns False (and changes nothing) when a worker claimed the job first.
    """
    with unit_of_work() as session:
        if not jobs.withdraw_unstarted(session, user_id, Job.id == job_id):
            return False
        idempotency.forget(user_id, job_id)
    return True


def wait_within_caps(
    user_id: int, job_id: str, timeout_s: float, created_after: float | None = None
) -> tuple[dict[str, Any], str | None]:
    """The job as answers show it (``job_to_dict``) once it is final or ``timeout_s``
    passed, if the caller's wait caps allow the wait; else as it is now.

    The second item is None when the wait was honoured, else the cap that refused it
    (api/waits.py), for the ``X-Wait-Skipped`` header. The wait registers for its job's
    notification in the same Redis round trip as it takes the caller's slot. Woken by
    a notification that carries the finished job (shared/events.py), it answers with
    that and reads no SQL; otherwise as ``wait_for``.
    """
    with (
        services().done.waiter(job_id) as waiter,
        wait_slots().hold(user_id, timeout_s, waiter) as skipped,
    ):
        if skipped:
            return job_to_dict(wait_for(job_id, 0)), skipped
        latest: list[dict[str, Any]] = []

        def finished() -> bool:
            sent = waiter.finished_job()
            if sent is not None and sent.get("status") in TERMINAL_VALUES:
                latest[:] = [sent]
                return True
            job = _existing_job(job_id)
            latest[:] = [job_to_dict(job)]
            return job.status in TERMINAL_VALUES

        waiter.wait(timeout_s, finished, created_after)
        return latest[0], None


def wait_for(
    job_id: str,
    timeout_s: float,
    created_after: float | None = None,
    waiter: Waiter | None = None,
) -> JobRow:
    """Long-poll: return the job once final, or as it is when the timeout passes.

    ``created_after``: see ``Waiter.wait`` (a job this request just submitted is read
    from SQL only once it is done); ``waiter``: the wait's, if the caller made it
    (``DoneListener.waiter``). Each read is one Core SELECT outside any transaction: a
    waiter never holds one (SQLite would keep the worker from writing), and no ORM
    object is loaded per wake-up.
    """
    latest: list[JobRow] = []

    def finished() -> bool:
        job = _existing_job(job_id)
        latest[:] = [job]
        return job.status in TERMINAL_VALUES

    if timeout_s <= 0:
        finished()
    elif waiter is not None:
        waiter.wait(timeout_s, finished, created_after)
    else:
        services().done.wait(job_id, timeout_s, finished, created_after)
    return latest[0]


def _existing_job(job_id: str) -> JobRow:
    job = read_job(job_id)
    if job is None:  # deleted (DELETE /v1/jobs/{id}) the moment it finished
        raise NotFound("No such job.", code="job_not_found")
    return job


def read_job(job_id: str) -> JobRow | None:
    """The job's row, in one statement (autocommit on PostgreSQL, a plain read on
    SQLite), then the request's session ends its transaction: it holds none while the
    request waits."""
    with unit_of_work(read_only=True) as session:
        one_statement(session)
        return session.connection().execute(READ_JOB, {"job_id": job_id}).one_or_none()


class TooManyWaits(ServiceError):
    status, code = 429, "too_many_waits"


class Timeout(ServiceError):
    status, code = 504, "timeout"


def submit_and_wait(user: User, **job_fields: Any) -> JobRow:
    """Submit through the queue and wait for the result, as the seed's synchronous call did.

    The job succeeded, or this raises: its failure (422), a 504 past MAX_WAIT_S, or a 429
    before anything is charged when the caps on waits held at once are reached.
    """
    wait_s = services().config.max_wait_s
    with wait_slots().hold(user.id, wait_s) as skipped:
        if skipped:
            # Checked before submitting: a seed client expects the answer or nothing
            # charged, and this call could not wait for the answer.
            raise TooManyWaits(
                "Too many requests waiting for results at once; retry shortly.",
                headers=skipped_headers(skipped),
            )
        created_after = time.monotonic()
        _, job_body = submit(user, build_request(**job_fields))
        job = wait_for(job_body["id"], wait_s, created_after)
    if job.status == JobStatus.SUCCEEDED:
        return job
    if job.status == JobStatus.FAILED:
        raise ServiceError(job.error_message, code=job.error_code, status=422)
    raise Timeout(f"The job {job.id} is still {job.status}; poll GET /v1/jobs/{job.id}.")
