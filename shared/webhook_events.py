"""Recording webhook events, inside the transaction that causes them.

An event row is written in the same transaction as the status change it
reports, so an event exists exactly when its cause committed. Delivery happens
later, in the webhook worker (worker/webhook_app.py); the event id is the
``webhook-id`` header, the same on every retry.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import ColumnElement, delete, or_
from sqlalchemy.orm import Session

from shared.config import Config
from shared.db import rowcount
from shared.models import WebhookEvent
from shared.queue import enqueue_webhooks
from shared.status import WebhookEventStatus

log = logging.getLogger(__name__)

BATCH_COMPLETED = "batch.completed"
# What a client may ask for in a job's webhook_events; each is sent as job.<choice>.
STARTED, COMPLETED = "started", "completed"
JOB_EVENT_CHOICES = (STARTED, COMPLETED)


def record(
    session: Session,
    *,
    user_id: int,
    url: str,
    event_type: str,
    data: dict[str, Any],
    job_id: str | None = None,
    batch_id: str | None = None,
    batch_retry: int = 0,
) -> str:
    event_id = f"msg_{uuid.uuid4().hex}"
    session.add(
        WebhookEvent(
            id=event_id,
            user_id=user_id,
            job_id=job_id,
            batch_id=batch_id,
            batch_retry=batch_retry,
            event_type=event_type,
            url=url,
            payload={"type": event_type, "data": data},
        )
    )
    return event_id


def wants(job_events: Any, choice: str) -> bool:
    """Whether a job asked for ``choice`` (STARTED or COMPLETED); default: COMPLETED."""
    events = job_events if isinstance(job_events, list) else [COMPLETED]
    return choice in events


def dispatch(app: Celery, config: Config, event_ids: Sequence[str]) -> None:
    """After the commit: wake the webhook worker. Its sweep finds any event this misses."""
    if not event_ids:
        return
    try:
        enqueue_webhooks(app, config, event_ids)
    except Exception as exc:
        log.warning(
            "could not enqueue %d webhook event(s), the sweep will: %r", len(event_ids), exc
        )


def forget(session: Session, job_ids: Sequence[str] = (), batch_ids: Sequence[str] = ()) -> int:
    """Delete the events of these jobs and batches, with their attempts; returns how many.

    An event being delivered right now stays (its attempt row is about to be written);
    retention purges it once it has ended. One not yet delivered is dropped: what it
    reports was deleted. The caller commits.
    """
    owner = or_(WebhookEvent.job_id.in_(list(job_ids)), WebhookEvent.batch_id.in_(list(batch_ids)))
    return _delete_settled(session, owner)


def delete_events(session: Session, event_ids: Sequence[str]) -> int:
    """Delete these events unless one is being delivered; returns how many went."""
    return _delete_settled(session, WebhookEvent.id.in_(list(event_ids))) if event_ids else 0


def _delete_settled(session: Session, which: ColumnElement[bool]) -> int:
    # The attempts go with their event in the same statement (ON DELETE CASCADE, on
    # SQLite too: shared/db.py turns foreign keys on), and the status check is in the
    # DELETE itself, so a delivery claiming the event meanwhile keeps it whole.
    result = session.execute(
        delete(WebhookEvent)
        .where(which, WebhookEvent.status != WebhookEventStatus.DELIVERING.value)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result)
