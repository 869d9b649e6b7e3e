"""Webhook signing secret (show, rotate) and the delivery log of a job or a batch."""

from __future__ import annotations

import marshmallow as ma
from flask import g

from api import accounts, reads, schemas
from api.auth import login_required
from api.validation import Blueprint
from shared.jobs import iso
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


@blp.route("/webhook-secret", methods=["GET"])
@login_required
@blp.response(200, WebhookSecret)
def get_secret():
    """The secret your webhooks are signed with; created on first use."""
    return {"secret": accounts.webhook_secret(g.user)}


@blp.route("/webhook-secret/rotate", methods=["POST"])
@login_required
@blp.response(200, RotatedSecret)
def rotate_secret():
    """Replace the secret; the old one keeps signing (beside the new) for a grace period."""
    secret, until = accounts.rotate_webhook_secret(g.user)
    return {"secret": secret, "previous_valid_until": iso(until)}


# --- delivery logs ----------------------------------------------------------------------


@blp.route("/jobs/<job_id>/deliveries", methods=["GET"])
@login_required
@blp.response(200, DeliveryList)
@blp.alt_response(404, schema=schemas.ErrorSchema, description="job_not_found")
def job_deliveries(job_id: str):
    """Webhook events of a job and every attempt to deliver them."""
    return {"items": reads.job_deliveries(g.user, job_id)}


@blp.route("/batches/<batch_id>/deliveries", methods=["GET"])
@login_required
@blp.response(200, DeliveryList)
@blp.alt_response(404, schema=schemas.ErrorSchema, description="batch_not_found")
def batch_deliveries(batch_id: str):
    """Webhook events of a batch (batch.completed) and every attempt to deliver them."""
    return {"items": reads.batch_deliveries(g.user, batch_id)}
