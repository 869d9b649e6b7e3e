"""Submitting a bulk batch: validate every line, charge N in one transaction, enqueue in chunks.

Same order as single jobs (api/submission.py): nothing is written unless every
line is valid and the balance covers all of them; the broker is checked before
the transaction, and the job ids are sent only after the commit.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update

from api.ratelimit import limits
from api.services import db, services
from api.submission import (
    forget_idempotent,
    is_valid_url,
    replay,
    save_idempotent,
    validate_url,
)
from shared import batches, jobs, ledger, logs
from shared.db import bulk_insert
from shared.errors import ServiceUnavailable, ValidationFailed
from shared.models import Batch, IdempotencyRecord, Job, User, new_id, utcnow
from shared.queue import enqueue_bulk
from shared.status import JobStatus

log = logging.getLogger(__name__)

MAX_REPORTED_LINES = 100
# Bulk inserts bypass ORM defaults: every other column of a batch job.
JOB_DEFAULTS = {
    "status": JobStatus.QUEUED.value,
    "input_filename": None,
    "result": None,
    "error_code": None,
    "error_message": None,
    "attempts": 0,
    "webhook_url": None,
    "webhook_events": None,
    "started_at": None,
    "completed_at": None,
}


@dataclass(frozen=True)
class BatchRequest:
    urls: tuple[str, ...]
    model: str
    top_k: int
    webhook_url: str | None = None

    def fingerprint(self) -> str:
        payload = [self.model, self.top_k, self.webhook_url, self.urls]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def parse_lines(lines: Iterable[str], limit: int) -> list[tuple[int, str]]:
    """(line number, url) for each line that is not blank or a ``#`` comment.

    Stops after ``limit`` + 1 URLs: that is already too many, and reading on would
    hold every line of a huge body at once (10 million lines took 1 GB).
    """
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((number, line))
            if len(out) > limit:
                break
    return out


def build_batch_request(
    numbered: list[tuple[int, object]], model: str, top_k: int, webhook: str | None
) -> BatchRequest:
    limit = services().config.max_batch_urls
    if not numbered:
        raise ValidationFailed("The batch has no URLs.", code="empty_batch")
    if len(numbered) > limit:
        raise ValidationFailed(
            f"A batch takes at most {limit} URLs; this one has more.",
            code="too_many_urls",
        )
    bad = [n for n, url in numbered if not (isinstance(url, str) and is_valid_url(url.strip()))]
    if bad:
        shown = bad[:MAX_REPORTED_LINES]
        raise ValidationFailed(
            f"{len(bad)} line(s) are not absolute http(s) URLs: "
            f"{', '.join(map(str, shown))}{' …' if len(bad) > len(shown) else ''}.",
            code="invalid_urls",
            details={"lines": shown, "count": len(bad)},
        )
    return BatchRequest(
        urls=tuple(str(url).strip() for _, url in numbered),
        model=model,
        top_k=top_k,
        webhook_url=validate_url(webhook, "webhook") if webhook else None,
    )


def submit_batch(user: User, req: BatchRequest, idempotency_key: str | None) -> tuple[int, dict]:
    fingerprint = req.fingerprint()
    if idempotency_key and (found := replay(user.id, idempotency_key, fingerprint)):
        return found
    limits().check_submission(user.id)  # a batch is one submission; tokens bound its size
    svc = services()
    svc.redis.ping()  # a dead broker is a 503 before anything is written
    batch_id, job_ids = new_id(), [new_id() for _ in req.urls]
    session = db()
    try:
        ledger.charge_jobs(session, user.id, job_ids)
        session.add(
            Batch(
                id=batch_id,
                user_id=user.id,
                total=len(job_ids),
                model=req.model,
                top_k=req.top_k,
                webhook_url=req.webhook_url,
            )
        )
        session.flush()
        now, request_id = utcnow(), logs.request_id.get()
        bulk_insert(
            session,
            Job.__table__,
            [
                {
                    **JOB_DEFAULTS,
                    "id": job_id,
                    "user_id": user.id,
                    "batch_id": batch_id,
                    "batch_index": i,
                    "model": req.model,
                    "top_k": req.top_k,
                    "input_url": url,
                    "created_at": now,
                    "request_id": request_id,
                }
                for i, (job_id, url) in enumerate(zip(job_ids, req.urls, strict=True))
            ],
        )
        body = batches.batch_to_dict(session, session.get(Batch, batch_id))
        if idempotency_key:
            save_idempotent(user.id, idempotency_key, fingerprint, body)
        session.commit()
    except Exception:
        session.rollback()
        raise
    chunks = chunk(job_ids, req.urls, svc.config.batch_max)
    return 202, _enqueue_or_undo(user.id, batch_id, chunks, body)


def chunk(job_ids: list[str], urls: tuple[str, ...], size: int) -> list[list[str]]:
    """Messages of up to ``size`` job ids, never splitting one URL's duplicates, so the
    worker fetches and classifies each URL once for all of its lines."""
    by_url: dict[str, list[str]] = defaultdict(list)
    for job_id, url in zip(job_ids, urls, strict=True):
        by_url[url].append(job_id)
    chunks: list[list[str]] = [[]]
    for group in by_url.values():
        if chunks[-1] and len(chunks[-1]) + len(group) > size:
            chunks.append([])
        chunks[-1].extend(group)
    return chunks


def _enqueue_or_undo(user_id: int, batch_id: str, chunks: list[list[str]], body: dict) -> dict:
    """Send the chunks; if a send fails, take back every job no worker has claimed yet.

    A publish can raise after the broker took some messages, and workers may claim those
    jobs before the undo runs. If none was claimed the batch disappears and the answer is
    503 (nothing charged); otherwise the claimed jobs stay, charged, and the answer is the
    batch as it now stands (202; if some jobs were taken back, ``canceled_at`` is set and
    ``total`` counts the jobs kept).
    """
    svc = services()
    try:
        enqueue_bulk(svc.celery, svc.config, chunks)
    except Exception as exc:
        log.warning("enqueue of batch %s failed: %r; undoing it", batch_id, exc)
        kept = _undo(user_id, batch_id)
        if kept is None:
            raise ServiceUnavailable("The job queue is unavailable; nothing was charged.") from exc
        log.warning("batch %s: %d job(s) already claimed; kept", batch_id, kept["total"])
        return kept
    return body


def _undo(user_id: int, batch_id: str) -> dict | None:
    """Delete the batch's still-queued jobs and void their charges, in one transaction.

    Returns None when the whole batch is gone, else the batch as it stands: the jobs a
    worker claimed first (the conditional DELETE and the worker's claim are both status
    transitions, so exactly one wins per job) keep running and stay charged.
    """
    session = db()
    session.rollback()
    removed = jobs.withdraw_unstarted(session, user_id, Job.batch_id == batch_id)
    taken = session.scalar(select(func.count()).where(Job.batch_id == batch_id))
    if not taken:
        forget_idempotent(user_id, batch_id)
        session.execute(delete(Batch).where(Batch.id == batch_id))
        session.commit()
        return None
    if removed:
        session.execute(
            update(Batch).where(Batch.id == batch_id).values(canceled_at=utcnow(), total=taken)
        )
    body = batches.batch_to_dict(session, session.get(Batch, batch_id, populate_existing=True))
    # A retry with the same Idempotency-Key gets this answer, not the first one's total.
    session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.user_id == user_id,
            IdempotencyRecord.body["id"].as_string() == batch_id,
        )
        .values(body=body)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return body
