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
from sqlalchemy.orm import Session

from shared.config import Config
from shared.models import WebhookEvent
from shared.queue import enqueue_webhooks

log = logging.getLogger(__name__)

JOB_STARTED, JOB_COMPLETED, BATCH_COMPLETED = "job.started", "job.completed", "batch.completed"
STARTED, COMPLETED = "started", "completed"
JOB_EVENT_CHOICES = (STARTED, COMPLETED)  # what a client may ask for in webhook_events


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
    """Whether a job asked for ``choice`` ("started" or "completed"); default: completed."""
    events = job_events if isinstance(job_events, list) else ["completed"]
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
