"""Canceling: a queued job, or a batch's queued lines, refunded; running work finishes.

The transitions themselves are shared.jobs.cancel and shared.batches.cancel; this
module adds the caller's checks and what follows a committed cancel (webhooks,
waking long polls, dropping uploads, freeing the bulk window).
"""

from __future__ import annotations

from sqlalchemy import select

from api.auth import owned
from api.bulk import locked_batch
from api.services import db, services, unit_of_work
from shared import batches, dispatch, events, jobs, webhook_events
from shared.db import retry_deadlocks
from shared.errors import Conflict
from shared.models import Batch, Job, User


def cancel_job(user: User, job_id: str) -> Job:
    """Cancel the user's queued job and refund its token; 409 once it has started."""
    with unit_of_work() as session:
        job = owned(Job, job_id, "job", user)
        if job.batch_id is not None:
            # A batch line: its batch row first, as every writer of a batch's rows
            # locks them (the refill, batch cancel, completion); job first could
            # deadlock with a refill marking this line's chunk.
            batches.lock(session, job.batch_id)
        if not jobs.cancel(session, job):
            status = session.scalar(select(Job.status).where(Job.id == job_id))
            raise Conflict(
                f"The job is {status}; only queued jobs can be canceled.",
                code="job_not_cancelable",
            )
        event_ids = [jobs.record_webhook(session, job, webhook_events.COMPLETED)]
        event_ids += batches.complete_finished(session, [job.batch_id])
    after_cancel([job_id], [e for e in event_ids if e])
    with unit_of_work(read_only=True) as session:
        session.refresh(job)
    return job


def cancel_batch(user: User, batch_id: str) -> dict:
    """Cancel the user's batch: its queued lines are refunded (those never sent are
    withdrawn, see shared.batches.cancel); 409 if it already ended. A deadlock with a
    worker writing the same batch runs the transaction again, never a 503. Returns the
    batch as answers show it."""

    def transaction() -> tuple[Batch, list[str], list[str]]:
        with unit_of_work() as session:
            batch = locked_batch(session, user, batch_id)
            if batch.completed_at is not None or batch.canceled_at is not None:
                raise Conflict("The batch has already ended.", code="batch_not_cancelable")
            canceled, event_ids = batches.cancel(session, batch)
            return batch, canceled, event_ids

    batch, canceled, event_ids = retry_deadlocks(db(), transaction)
    after_cancel(canceled, event_ids)
    # Its chunks out at the broker no longer count: other users' work takes the room.
    svc = services()
    dispatch.refill(svc.sessions, svc.redis, svc.celery, svc.config)
    with unit_of_work(read_only=True) as session:
        return batches.batch_to_dict(session, batch)


def after_cancel(job_ids: list[str], event_ids: list[str]) -> None:
    """Wake long-pollers, drop uploads, send webhooks. Best effort: SQL already says it all."""
    svc = services()
    webhook_events.dispatch(svc.celery, svc.config, event_ids)
    try:
        svc.uploads.delete(*job_ids)
        events.publish_done(svc.redis, svc.config, job_ids)
    except Exception:  # waiters re-check SQL; an upload's TTL removes it
        pass
