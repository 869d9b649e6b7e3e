"""What a caller reads: a job, a batch, their lists, their profile, webhook delivery logs,
and the web pages' history and user search.

Each read is one read-only unit of work (``api.services.unit_of_work``, ``read_only``: a
plain deferred BEGIN on SQLite, which reads a WAL snapshot instead of queueing behind a
writer), ended before the answer is serialized, so no request holds a transaction while
it writes its answer or waits. Someone else's row is as missing as one that does not
exist (``api.auth.owned``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from api.auth import owned
from api.bulk import result_lines
from api.pagination import page
from api.services import unit_of_work
from shared import batches
from shared.jobs import iso, job_to_dict
from shared.models import Batch, Job, User, WebhookAttempt, WebhookEvent
from shared.status import WebhookEventStatus

HISTORY_JOBS = 25
HISTORY_BATCHES = 10
ADMIN_RESULTS = 25


def job(user: User, job_id: str) -> Job:
    """The user's job (404 ``job_not_found`` otherwise)."""
    with unit_of_work(read_only=True):
        return owned(Job, job_id, "job", user)


def jobs_page(user: User, query: dict) -> dict[str, Any]:
    """A page of the user's jobs, newest first (``query``: cursor, limit, status)."""
    stmt = select(Job).where(Job.user_id == user.id)
    if "status" in query:
        stmt = stmt.where(Job.status == query["status"])
    with unit_of_work(read_only=True) as session:
        rows, next_cursor = page(session, stmt, Job, query)
    return {"items": [job_to_dict(j) for j in rows], "next_cursor": next_cursor}


def batch(user: User, batch_id: str) -> dict[str, Any]:
    """The user's batch with its counts (404 ``batch_not_found`` otherwise)."""
    with unit_of_work(read_only=True) as session:
        return batches.batch_to_dict(session, owned(Batch, batch_id, "batch", user))


def batches_page(user: User, query: dict) -> dict[str, Any]:
    """A page of the user's batches, newest first, each with its counts."""
    with unit_of_work(read_only=True) as session:
        rows, next_cursor = page(
            session, select(Batch).where(Batch.user_id == user.id), Batch, query
        )
        items = [batches.batch_to_dict(session, b) for b in rows]
    return {"items": items, "next_cursor": next_cursor}


def batch_results(user: User, batch_id: str) -> Iterator[dict[str, Any]]:
    """The user's batch's result lines, read page by page as they are sent
    (``api.bulk.result_lines``); 404 ``batch_not_found`` at once, before the first line."""
    with unit_of_work(read_only=True):
        total = owned(Batch, batch_id, "batch", user).total
    return result_lines(batch_id, total)


def profile(user: User) -> User:
    """The user's row as SQL has it now: a caller authenticated from the key cache carries
    no balance (api/auth.py)."""
    with unit_of_work(read_only=True) as session:
        return session.get_one(User, user.id)


def job_deliveries(user: User, job_id: str) -> list[dict[str, Any]]:
    """The webhook events of the user's job, each with its delivery attempts."""
    with unit_of_work(read_only=True) as session:
        owned(Job, job_id, "job", user)
        return _deliveries(session, user, WebhookEvent.job_id == job_id)


def batch_deliveries(user: User, batch_id: str) -> list[dict[str, Any]]:
    """The webhook events of the user's batch (batch.completed), with their attempts."""
    with unit_of_work(read_only=True) as session:
        owned(Batch, batch_id, "batch", user)
        return _deliveries(session, user, WebhookEvent.batch_id == batch_id)


def _deliveries(
    session: Session, user: User, condition: ColumnElement[bool]
) -> list[dict[str, Any]]:
    events = list(
        session.scalars(
            select(WebhookEvent)
            .where(condition, WebhookEvent.user_id == user.id)
            .order_by(WebhookEvent.created_at, WebhookEvent.id)
        )
    )
    attempts: dict[str, list[WebhookAttempt]] = defaultdict(list)
    if events:
        rows = session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.event_id.in_([e.id for e in events]))
            .order_by(WebhookAttempt.number, WebhookAttempt.id)
        )
        for row in rows:
            attempts[row.event_id].append(row)
    return [_delivery(e, attempts[e.id]) for e in events]


def _delivery(event: WebhookEvent, attempts: list[WebhookAttempt]) -> dict[str, Any]:
    waiting = WebhookEventStatus(event.status).is_waiting()
    return {
        "id": event.id,
        "event_type": event.event_type,
        "url": event.url,
        "status": event.status,
        "attempts": event.attempts,
        "next_attempt_at": iso(event.next_attempt_at) if waiting else None,
        "created_at": iso(event.created_at),
        "completed_at": iso(event.completed_at),
        "attempts_log": [
            {
                "number": a.number,
                "status_code": a.status_code,
                "error": a.error,
                "duration_ms": a.duration_ms,
                "attempted_at": iso(a.attempted_at),
            }
            for a in attempts
        ],
    }


def history(user: User) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The history page: the user's latest batches and latest single jobs, as answers
    show them."""
    with unit_of_work(read_only=True) as session:
        recent_batches = session.scalars(
            select(Batch)
            .where(Batch.user_id == user.id)
            .order_by(Batch.created_at.desc(), Batch.id.desc())
            .limit(HISTORY_BATCHES)
        ).all()
        recent_jobs = session.scalars(
            select(Job)
            .where(Job.user_id == user.id, Job.batch_id.is_(None))
            .order_by(Job.created_at.desc(), Job.id.desc())
            .limit(HISTORY_JOBS)
        ).all()
        return [batches.batch_to_dict(session, b) for b in recent_batches], [
            job_to_dict(j) for j in recent_jobs
        ]


def find_users(query: str) -> list[User]:
    """The administrators' page: the newest users whose name contains ``query``."""
    stmt = select(User).order_by(User.created_at.desc(), User.id.desc()).limit(ADMIN_RESULTS)
    if query:
        stmt = stmt.where(func.lower(User.username).contains(query.lower(), autoescape=True))
    with unit_of_work(read_only=True) as session:
        return list(session.scalars(stmt))
