"""Bulk batches: representation, counts derived from the jobs, and completion.

A batch stores no counters: its counts are a GROUP BY over its jobs, so they
always agree with them. ``completed_at`` is set exactly once per run, by the
transaction that ends the batch's last active job, which is also where the
``batch.completed`` webhook event is recorded. A retry of its failed lines
(``reopen``) clears it and starts a new run: ``retries`` goes up by one, and the
retried lines' end sets ``completed_at`` and records ``batch.completed`` again,
keyed by that run.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared import webhook_events
from shared.jobs import iso
from shared.models import Batch, Job, utcnow
from shared.status import ACTIVE, JobStatus


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


def batch_to_dict(session: Session, batch: Batch) -> dict[str, Any]:
    job_counts = counts(session, batch.id)
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
    active = [s.value for s in ACTIVE]
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
        won = session.execute(
            update(Batch)
            .where(Batch.id == batch_id, Batch.completed_at.is_(None))
            .values(completed_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
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


def reopen(session: Session, batch: Batch) -> None:
    """Start a new run of a locked batch whose failed lines are being retried."""
    batch.completed_at = None
    batch.retries += 1
    session.flush()


def undo_reopen(session: Session, batch: Batch, completed_at: datetime | None) -> None:
    """Back to the run before ``reopen``, when every retried line was taken back unstarted."""
    batch.completed_at = completed_at
    batch.retries -= 1
    session.flush()
