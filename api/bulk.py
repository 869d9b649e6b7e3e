"""Submitting a bulk batch: validate every line, charge N in one transaction, then dispatch.

Same order as single jobs (api/submission.py): nothing is written unless every
line is valid and the balance covers all of them, and Redis is checked before the
transaction. The jobs are committed numbered in chunks and waiting in SQL; after the
commit, ``shared.dispatch.refill`` sends as many chunks as the bulk window has room
for, round-robin over the users with work waiting. A send that fails leaves the jobs
waiting (charged, as accepted) for the next refill, not undone: the batch is the
durable record, and the broker is only told about a few chunks at a time anyway.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from api.ratelimit import limits
from api.services import db, services
from api.submission import is_valid_url, replay, save_idempotent, validate_url
from shared import batches, dispatch, ledger, logs
from shared.db import bulk_insert
from shared.errors import ValidationFailed
from shared.models import Batch, Job, User, new_id, utcnow
from shared.status import JobStatus

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
    "dispatched_at": None,  # waiting in SQL until shared.dispatch sends its chunk
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
    chunk_of = {
        job_id: n
        for n, ids in enumerate(chunk(job_ids, req.urls, svc.config.batch_max))
        for job_id in ids
    }
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
                    "chunk": chunk_of[job_id],
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
    dispatch.refill(svc.sessions, svc.redis, svc.celery, svc.config)
    return 202, body


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
