"""Bulk batches: representation, counts derived from the jobs, and completion.

A batch stores no counters: its counts are a GROUP BY over its jobs, so they
always agree with them. ``completed_at`` is set exactly once per run, by the
transaction that ends the batch's last active job, which is also where the
``batch.completed`` webhook event is recorded. A retry of its failed lines
(``reopen``) clears it and starts a new run: ``retries`` goes up by one, and the
retried lines' end sets ``completed_at`` and records ``batch.completed`` again,
keyed by that run.

This module owns every batch-level transition (``cancel``, ``complete_finished``,
``reopen``, ``delete_ended``); the jobs' own status changes go through shared/jobs.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from shared import jobs, webhook_events
from shared.db import rowcount
from shared.errors import Conflict
from shared.jobs import iso
from shared.models import Batch, Job, as_utc, utcnow
from shared.status import ACTIVE, TERMINAL, JobStatus

ACTIVE_VALUES = [s.value for s in ACTIVE]


def counts(session: Session, batch_id: str) -> dict[str, int]:
    rows = session.execute(
        select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
    )
    result = {s.value: 0 for s in JobStatus}
    result.update({status: n for status, n in rows})
    return result


def status_of(batch: Batch, job_counts: dict[str, int]) -> str:
    if batch.canceled_at is not None:
        return "canceled"
    if batch.completed_at is not None:
        return "completed"
    if job_counts[JobStatus.QUEUED.value] < batch.total:
        return "running"
    return "queued"


def batch_counts(session: Session, batch: Batch) -> dict[str, int]:
    """``counts``, with the lines a cancel withdrew (deleted unsent, see ``cancel``)
    counted canceled: only a canceled batch has fewer lines than its total, as long as
    retention has not begun to purge it."""
    job_counts = counts(session, batch.id)
    if batch.canceled_at is not None:
        job_counts[JobStatus.CANCELED.value] += max(0, batch.total - sum(job_counts.values()))
    return job_counts


def batch_to_dict(session: Session, batch: Batch) -> dict[str, Any]:
    job_counts = batch_counts(session, batch)
    return {
        "id": batch.id,
        "status": status_of(batch, job_counts),
        "total": batch.total,
        "counts": job_counts,
        "model": batch.model,
        "top_k": batch.top_k,
        "webhook": batch.webhook_url,
        "retries": batch.retries,
        "created_at": iso(batch.created_at),
        "completed_at": iso(batch.completed_at),
        "canceled_at": iso(batch.canceled_at),
    }


def complete_finished(session: Session, batch_ids: Iterable[str]) -> list[str]:
    """Mark batches with no active job left as completed; returns new webhook event ids.

    Locks each batch row first (sorted, so concurrent callers cannot deadlock), so two
    workers ending a batch's last two jobs at once cannot both miss the completion.
    """
    events = []
    active = ACTIVE_VALUES
    for batch_id in sorted(set(b for b in batch_ids if b)):
        batch = session.execute(
            select(Batch).where(Batch.id == batch_id).with_for_update()
        ).scalar_one_or_none()
        if batch is None or batch.completed_at is not None:
            continue
        left = session.scalar(
            select(func.count()).where(Job.batch_id == batch_id, Job.status.in_(active))
        )
        if left:
            continue
        now = utcnow()
        result = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.completed_at.is_(None))
            .values(completed_at=now)
            .execution_options(synchronize_session=False)
        )
        won = rowcount(result)
        if won and batch.webhook_url:
            batch.completed_at = now
            events.append(
                webhook_events.record(
                    session,
                    user_id=batch.user_id,
                    url=batch.webhook_url,
                    event_type=webhook_events.BATCH_COMPLETED,
                    data=batch_to_dict(session, batch),
                    batch_id=batch.id,
                    batch_retry=batch.retries,
                )
            )
    return events


def lock(session: Session, batch_id: str) -> Batch | None:
    """The batch row, locked until the commit: cancel, retry and completion serialise on it."""
    return session.execute(
        select(Batch)
        .where(Batch.id == batch_id)
        .with_for_update()
        .execution_options(populate_existing=True)  # the locked row, not a cached copy
    ).scalar_one_or_none()


def cancel(session: Session, batch: Batch) -> tuple[list[str], list[str]]:
    """Cancel a locked batch (see ``lock``): its queued jobs are canceled and refunded,
    running ones finish. Returns (the job ids canceled, new webhook event ids); the
    caller checks the batch has not ended, and commits.

    Its lines still waiting in SQL on their first run (never sent: ``dispatched_at``
    NULL) are withdrawn instead: deleted with their charge rows, their tokens back
    (``jobs.withdraw_unstarted``). No worker can hold them (the dispatcher marks a
    chunk under this batch's lock before sending it), and so a canceled 10,000-line
    batch leaves no row per line behind: a submit-and-cancel loop cannot grow the
    database. ``batch_counts`` counts them canceled; the results list only the lines
    that remain."""
    withdrawn = jobs.withdraw_unstarted(
        session,
        batch.user_id,
        Job.batch_id == batch.id,
        Job.dispatched_at.is_(None),
        Job.retries == 0,  # a retried line's earlier runs stay in the ledger
    )
    canceled = withdrawn + jobs.cancel_queued(session, batch.user_id, Job.batch_id == batch.id)
    batch.canceled_at = utcnow()
    session.flush()
    return canceled, complete_finished(session, [batch.id])


def reopen(session: Session, batch: Batch) -> None:
    """Start a new run of a locked batch whose failed lines are being retried."""
    batch.completed_at = None
    batch.retries += 1
    session.flush()


def check_whole(session: Session, batch: Batch) -> None:
    """Refuse to change a locked batch that retention has begun to purge (some of its
    lines are gone): it is purged whole, never reopened half empty. A canceled batch may
    have fewer lines (see ``cancel``), and cannot be reopened anyway."""
    if batch.canceled_at is not None:
        return
    lines = session.scalar(select(func.count()).where(Job.batch_id == batch.id)) or 0
    if lines < batch.total:
        raise Conflict(
            "The batch ended more than RETENTION_DAYS ago and is being purged; "
            "submit its lines as a new batch instead.",
            status=410,
            code="batch_expired",
        )


def delete_ended(
    session: Session,
    batch_id: str,
    chunk: int | None = None,
    with_events: bool = True,
    ended_before: datetime | None = None,
) -> bool:
    """Delete an ended batch (``completed_at`` set: all its jobs are final) and its jobs.

    Without ``chunk`` all goes at once. With it, at most that many jobs go in this call
    and the batch row only once none is left: the caller commits and calls again while
    this returns False, so a 10,000-job batch never holds its locks in one long
    transaction. ``ended_before`` (retention): each call first locks the batch and goes
    on only if it still ended before then, so a retry (``check_whole``, under the same
    lock) either reopens the batch before its first line goes, and this deletes
    nothing, or finds lines gone and is refused. True: done (the batch is gone, or was
    not deletable). ``with_events`` as in ``jobs.delete_finished``. The caller commits.
    """
    if ended_before is not None:
        batch = lock(session, batch_id)
        ended = batch.completed_at if batch is not None else None
        if ended is None or as_utc(ended) >= ended_before:  # gone, or reopened meanwhile
            return True
    which = Job.batch_id == batch_id
    if chunk:  # by id: a DELETE cannot take a LIMIT on both databases
        final = Job.status.in_([s.value for s in TERMINAL])
        which = Job.id.in_(list(session.scalars(select(Job.id).where(which, final).limit(chunk))))
    deleted = jobs.delete_finished(session, which, with_events=with_events)
    if deleted and chunk:
        return False
    if with_events:
        webhook_events.forget(session, batch_ids=[batch_id])
    # Never with an active job left (the FK would cascade to it): completed_at says
    # there is none, and the DELETE checks it again.
    active = select(Job.id).where(Job.batch_id == batch_id, Job.status.in_(ACTIVE_VALUES))
    session.execute(
        delete(Batch)
        .where(Batch.id == batch_id, Batch.completed_at.is_not(None), ~active.exists())
        .execution_options(synchronize_session=False)
    )
    return True
