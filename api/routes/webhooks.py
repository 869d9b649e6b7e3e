"""Webhook signing secret (show, rotate) and the delivery log of a job or a batch."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import marshmallow as ma
from flask import g
from sqlalchemy import select

from api import schemas
from api.auth import login_required, owned
from api.services import db, services
from api.validation import Blueprint
from shared import webhook_secrets
from shared.jobs import iso
from shared.models import Batch, Job, User, WebhookAttempt, WebhookEvent
from shared.status import WebhookEventStatus

blp = Blueprint(
    "webhooks",
    __name__,
    url_prefix="/v1",
    description="Webhook signing secret and delivery logs (Standard Webhooks)",
)


# --- schemas (OpenAPI) --------------------------------------------------------------


class WebhookSecret(ma.Schema):
    secret = ma.fields.String(
        metadata={
            "example": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "description": "Verify webhook-signature with it (Standard Webhooks libraries).",
        }
    )


class RotatedSecret(WebhookSecret):
    previous_valid_until = ma.fields.String(
        allow_none=True,
        metadata={"description": "Until then deliveries are signed with the old secret too."},
    )


class DeliveryAttempt(ma.Schema):
    number = ma.fields.Integer()
    status_code = ma.fields.Integer(allow_none=True)
    error = ma.fields.String(allow_none=True)
    duration_ms = ma.fields.Integer()
    attempted_at = ma.fields.String()


class Delivery(ma.Schema):
    id = ma.fields.String(metadata={"description": "The webhook-id header of every attempt"})
    event_type = ma.fields.String(metadata={"example": "job.completed"})
    url = ma.fields.String()
    status = ma.fields.String(validate=ma.validate.OneOf([s.value for s in WebhookEventStatus]))
    attempts = ma.fields.Integer()
    next_attempt_at = ma.fields.String(allow_none=True)
    created_at = ma.fields.String()
    completed_at = ma.fields.String(allow_none=True)
    attempts_log = ma.fields.List(ma.fields.Nested(DeliveryAttempt))


class DeliveryList(ma.Schema):
    items = ma.fields.List(ma.fields.Nested(Delivery))


# --- secret -----------------------------------------------------------------------------


def _caller() -> User:
    """The caller's row in this request's session (g.user may come from another one)."""
    return db().get(User, g.user.id)


@blp.route("/webhook-secret", methods=["GET"])
@login_required
@blp.response(200, WebhookSecret)
def get_secret():
    """The secret your webhooks are signed with; created on first use."""
    session = db()
    secret = webhook_secrets.current_secret(session, _caller())
    session.commit()
    return {"secret": secret}


@blp.route("/webhook-secret/rotate", methods=["POST"])
@login_required
@blp.response(200, RotatedSecret)
def rotate_secret():
    """Replace the secret; the old one keeps signing (beside the new) for a grace period."""
    session = db()
    user = _caller()
    secret = webhook_secrets.rotate(session, user)
    session.commit()
    until = webhook_secrets.previous_valid_until(user, services().config)
    return {"secret": secret, "previous_valid_until": iso(until)}


# --- delivery logs ----------------------------------------------------------------------


@blp.route("/jobs/<job_id>/deliveries", methods=["GET"])
@login_required
@blp.response(200, DeliveryList)
@blp.alt_response(404, schema=schemas.ErrorSchema, description="job_not_found")
def job_deliveries(job_id: str):
    """Webhook events of a job and every attempt to deliver them."""
    owned(Job, job_id, "job")
    return {"items": _deliveries(WebhookEvent.job_id == job_id)}


@blp.route("/batches/<batch_id>/deliveries", methods=["GET"])
@login_required
@blp.response(200, DeliveryList)
@blp.alt_response(404, schema=schemas.ErrorSchema, description="batch_not_found")
def batch_deliveries(batch_id: str):
    """Webhook events of a batch (batch.completed) and every attempt to deliver them."""
    owned(Batch, batch_id, "batch")
    return {"items": _deliveries(WebhookEvent.batch_id == batch_id)}


def _deliveries(condition) -> list[dict[str, Any]]:
    session = db()
    events = list(
        session.scalars(
            select(WebhookEvent)
            .where(condition, WebhookEvent.user_id == g.user.id)
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
    session.commit()
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
