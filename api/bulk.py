"""Submitting a bulk batch: validate every line, charge N in one transaction, enqueue in chunks.

Same order as single jobs (api/submission.py): nothing is written unless every
line is valid and the balance covers all of them; the broker is checked before
the transaction, and the job ids are sent only after the commit. Retrying a
batch's failed lines (``retry_batch``) follows the same order and the same
enqueue path (``_enqueue_or_undo``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select, update

from api.ratelimit import limits
from api.services import db, services
from api.submission import (
    forget_idempotent,
    forget_key,
    is_valid_url,
    replay,
    save_idempotent,
    validate_url,
)
from shared import batches, jobs, ledger, logs, webhook_events
from shared.db import bulk_insert
from shared.errors import Conflict, NotFound, ServiceUnavailable, ValidationFailed
from shared.models import Batch, IdempotencyRecord, Job, User, new_id, utcnow
from shared.queue import enqueue_bulk
from shared.status import JobStatus

log = logging.getLogger(__name__)

MAX_REPORTED_LINES = 100
MAX_CUSTOM_ID = 64
TOP_K_RANGE = range(1, 21)  # the batch-level top_k's range (api/schemas.py BatchOptions)
JSONL_KEYS = frozenset({"custom_id", "url", "top_k"})
# Bulk inserts bypass ORM defaults: every other column of a batch job.
JOB_DEFAULTS = {
    "status": JobStatus.QUEUED.value,
    "input_filename": None,
    "result": None,
    "error_code": None,
    "error_message": None,
    "attempts": 0,
    "retries": 0,
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
    # Per line, from JSON Lines or {"items": [...]} input; None for plain URL lists.
    custom_ids: tuple[str | None, ...] | None = None
    top_ks: tuple[int | None, ...] | None = None

    def fingerprint(self) -> str:
        payload: list = [self.model, self.top_k, self.webhook_url, self.urls]
        if self.custom_ids is not None:
            payload += [self.custom_ids, self.top_ks]
        return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


@dataclass(frozen=True)
class Unparsable:
    """A JSON Lines line that is not JSON: reported with the other invalid lines."""

    reason: str


def parse_lines(lines: Iterable[str], limit: int, comments: bool = True) -> list[tuple[int, str]]:
    """(line number, url) for each line that is not blank or (``comments``) a ``#`` comment.

    Stops after ``limit`` + 1 URLs: that is already too many, and reading on would
    hold every line of a huge body at once (10 million lines took 1 GB).
    """
    out = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if line and not (comments and line.startswith("#")):
            out.append((number, line))
            if len(out) > limit:
                break
    return out


def parse_jsonl(lines: Iterable[str], limit: int) -> list[tuple[int, object]]:
    """(line number, decoded object) for each non-blank JSON Lines line; a line that is
    not JSON comes as ``Unparsable``. Stops after ``limit`` + 1 lines, as parse_lines."""
    out: list[tuple[int, object]] = []
    for number, line in parse_lines(lines, limit, comments=False):
        try:
            out.append((number, json.loads(line)))
        except ValueError:
            out.append((number, Unparsable("not a JSON object")))
    return out


def line_problem(item: object, seen: dict[str, int]) -> str | None:
    """Why a JSON Lines item cannot be a batch line, or None; records its custom_id in
    ``seen`` (custom_id -> first line number) to find repeats."""
    if isinstance(item, Unparsable):
        return item.reason
    if not isinstance(item, dict):
        return "not a JSON object"
    if unknown := sorted(set(item) - JSONL_KEYS):
        return f"unknown field(s) {', '.join(map(repr, unknown))}; use custom_id, url, top_k"
    url = item.get("url")
    if not (isinstance(url, str) and is_valid_url(url.strip())):
        return "'url' must be an absolute http(s) URL"
    top_k = item.get("top_k")
    if top_k is not None and (type(top_k) is not int or top_k not in TOP_K_RANGE):
        return f"'top_k' must be an integer from {TOP_K_RANGE[0]} to {TOP_K_RANGE[-1]}"
    return _custom_id_problem(item.get("custom_id"), seen)


def _custom_id_problem(custom_id: object, seen: dict[str, int]) -> str | None:
    if custom_id is None:
        return None
    if not (isinstance(custom_id, str) and 0 < len(custom_id) <= MAX_CUSTOM_ID):
        return f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters"
    if not custom_id.isprintable():
        return "'custom_id' must be printable characters (no control or line breaks)"
    if custom_id in seen:
        return f"'custom_id' {custom_id!r} repeats line {seen[custom_id]}'s"
    return None


def _check_size(numbered: Sequence[tuple[int, object]]) -> None:
    limit = services().config.max_batch_urls
    if not numbered:
        raise ValidationFailed("The batch has no URLs.", code="empty_batch")
    if len(numbered) > limit:
        raise ValidationFailed(
            f"A batch takes at most {limit} URLs; this one has more.",
            code="too_many_urls",
        )


def build_item_batch_request(
    numbered: list[tuple[int, object]], model: str, top_k: int, webhook: str | None
) -> BatchRequest:
    """A batch from items ``{"custom_id", "url", "top_k"}`` (JSON Lines, or JSON "items"):
    every invalid line is refused at once, with its number and why."""
    _check_size(numbered)
    seen: dict[str, int] = {}
    problems: list[dict] = []
    for number, item in numbered:
        if problem := line_problem(item, seen):
            problems.append({"line": number, "problem": problem})
        elif isinstance(item, dict) and item.get("custom_id") is not None:
            seen[item["custom_id"]] = number
    if problems:
        shown = problems[:MAX_REPORTED_LINES]
        first = "; ".join(f"line {p['line']}: {p['problem']}" for p in shown[:3])
        raise ValidationFailed(
            f"{len(problems)} line(s) are invalid ({first}{' …' if len(problems) > 3 else ''}). "
            'Each line is {"custom_id": "...", "url": "https://...", "top_k": N}; '
            "custom_id and top_k are optional.",
            code="invalid_lines",
            details={
                "lines": [p["line"] for p in shown],
                "problems": shown,
                "count": len(problems),
            },
        )
    items = [item for _, item in numbered if isinstance(item, dict)]
    return BatchRequest(
        urls=tuple(item["url"].strip() for item in items),
        model=model,
        top_k=top_k,
        webhook_url=validate_url(webhook, "webhook") if webhook else None,
        custom_ids=tuple(item.get("custom_id") for item in items),
        top_ks=tuple(item.get("top_k") for item in items),
    )


def build_batch_request(
    numbered: list[tuple[int, object]], model: str, top_k: int, webhook: str | None
) -> BatchRequest:
    _check_size(numbered)
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
        custom_ids = req.custom_ids or (None,) * len(job_ids)
        top_ks = req.top_ks or (None,) * len(job_ids)
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
                    "custom_id": custom_id,
                    "model": req.model,
                    "top_k": line_top_k or req.top_k,
                    "input_url": url,
                    "created_at": now,
                    "request_id": request_id,
                }
                for i, (job_id, url, custom_id, line_top_k) in enumerate(
                    zip(job_ids, req.urls, custom_ids, top_ks, strict=True)
                )
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
    return 202, _enqueue_or_undo(batch_id, chunks, body, lambda: _undo(user.id, batch_id))


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


def _enqueue_or_undo(
    batch_id: str, chunks: list[list[str]], body: dict, undo: Callable[[], dict | None]
) -> dict:
    """Send the chunks; if a send fails, take back every job no worker has claimed yet.

    The one place a batch's committed jobs go to the queue, new and retried alike.

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
        kept = undo()
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


@dataclass(frozen=True)
class Retried:
    """A committed retry: what the undo needs to put the lines back as they were."""

    batch_id: str
    runs: dict[str, int]  # job id -> the run just charged
    previous: dict[str, tuple[str | None, str | None, datetime | None]]  # its last failure
    completed_at: datetime | None  # the batch's, before the retry


def retry_batch(
    user: User, batch_id: str, codes: Sequence[str], idempotency_key: str | None
) -> tuple[int, dict]:
    """Re-queue a batch's failed lines (only ``codes``, if any), charging one token each.

    One transaction under the batch's row lock (cancel and completion take it too):
    failed -> queued is a conditional transition, so of two concurrent retries each line
    goes to one, and the charge covers exactly the lines this call moved, all or none.
    """
    payload = json.dumps(["retry", batch_id, sorted(set(codes))])
    fingerprint = hashlib.sha256(payload.encode()).hexdigest()
    if idempotency_key and (found := replay(user.id, idempotency_key, fingerprint)):
        return found
    limits().check_submission(user.id)  # a retry is a submission of its lines
    svc = services()
    svc.redis.ping()  # a dead broker is a 503 before anything is written
    session = db()
    try:
        retried, urls, batch = _requeue(session, user, batch_id, codes)
        body = {**batches.batch_to_dict(session, batch), "retried": len(retried.runs)}
        if idempotency_key:
            save_idempotent(user.id, idempotency_key, fingerprint, body)
        session.commit()
    except Conflict as exc:
        session.rollback()
        # The same key sent twice at once: the second waited on the batch lock and found
        # the lines taken by the first, whose answer is the one to give.
        retry_of_same_key = exc.code == "nothing_to_retry" and idempotency_key
        if retry_of_same_key and (found := replay(user.id, idempotency_key, fingerprint)):
            return found
        raise
    except Exception:
        session.rollback()
        raise
    ids = list(retried.runs)
    chunks = chunk(ids, tuple(urls[i] for i in ids), svc.config.batch_max)
    return 202, _enqueue_or_undo(
        batch_id, chunks, body, lambda: _undo_retry(user.id, retried, idempotency_key)
    )


def _requeue(
    session, user: User, batch_id: str, codes: Sequence[str]
) -> tuple[Retried, dict[str, str], Batch]:
    batch = batches.lock(session, batch_id)
    if batch is None or batch.user_id != user.id:
        raise NotFound("No such batch.", code="batch_not_found")
    if batch.canceled_at is not None:
        raise Conflict(
            "The batch was canceled; submit its lines as a new batch instead.",
            code="batch_canceled",
        )
    where = [Job.batch_id == batch_id, Job.status == JobStatus.FAILED.value]
    if codes:
        where.append(Job.error_code.in_(list(codes)))
    # Read under the batch lock: only a retry turns a failed line into anything else.
    rows = session.execute(
        select(Job.id, Job.input_url, Job.error_code, Job.error_message, Job.completed_at).where(
            *where
        )
    ).all()
    runs = jobs.requeue_failed(session, batch_id, codes)
    if not runs:
        which = f" with error code {', '.join(codes)}" if codes else ""
        raise Conflict(
            f"The batch has no failed lines{which} to retry.",
            code="nothing_to_retry",
            details={"failed": batches.counts(session, batch_id)["failed"]},
        )
    ledger.charge_jobs(session, user.id, list(runs), runs)  # 402 rolls all of it back
    retried = Retried(
        batch_id=batch_id,
        runs=runs,
        previous={r.id: (r.error_code, r.error_message, r.completed_at) for r in rows},
        completed_at=batch.completed_at,
    )
    batches.reopen(session, batch)
    return retried, {r.id: r.input_url for r in rows}, batch


def _undo_retry(user_id: int, retried: Retried, key: str | None) -> dict | None:
    """Put the retried lines no worker claimed back to their failure, and void their charge.

    Returns None when every line went back (the batch is as before the retry: 503), else
    the batch as it stands with ``retried`` counting the lines kept.
    """
    session = db()
    session.rollback()
    batch = batches.lock(session, retried.batch_id)
    back = jobs.withdraw_requeued(session, user_id, retried.runs, retried.previous)
    if len(back) == len(retried.runs):
        batches.undo_reopen(session, batch, retried.completed_at)
    # The lines taken back may have been the last active ones of a running batch.
    events = batches.complete_finished(session, [retried.batch_id])
    body = {
        **batches.batch_to_dict(session, batch),
        "retried": len(retried.runs) - len(back),
    }
    if key:
        forget_key(user_id, key)
    session.commit()
    webhook_events.dispatch(services().celery, services().config, events)
    return None if len(back) == len(retried.runs) else body
