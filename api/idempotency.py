"""Idempotency keys: the ``Idempotency-Key`` header and the first answer given for it.

A submission (job, batch, batch retry) with a key stores its 202 answer in the same
transaction that charges it; the same key with the same request gets that answer
again, charged once, and with another request a 409. Keys are remembered for
IDEMPOTENCY_TTL_S (worker/retention.py purges them later).
"""

from __future__ import annotations

from datetime import timedelta

from flask import request
from sqlalchemy import delete, select

from api.services import db, services, unit_of_work
from shared.errors import Conflict, ValidationFailed
from shared.models import IdempotencyRecord, as_utc, utcnow

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# The header's OpenAPI description, for every route that takes it.
HEADER_DOC = {
    "in": "header",
    "name": HEADER,
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH},
    "description": "The same key and body return the first response, charged once.",
}


def request_key() -> str | None:
    """The request's Idempotency-Key, if it sent one; 422 if it is empty or too long."""
    key = request.headers.get(HEADER)
    if key is not None and not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise ValidationFailed(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} characters.", code="invalid_header"
        )
    return key


def save(user_id: int, key: str, fingerprint: str, body: dict) -> None:
    """Remember the 202 answer for this key, in the caller's transaction."""
    db().add(
        IdempotencyRecord(
            user_id=user_id, key=key, fingerprint=fingerprint, status_code=202, body=body
        )
    )


def forget(user_id: int, resource_id: str) -> None:
    """Drop the answer naming ``resource_id`` (a submission taken back), in the caller's
    transaction."""
    db().execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.user_id == user_id,
            IdempotencyRecord.body["id"].as_string() == resource_id,
        )
    )


def replay_if_raced(user_id: int, key: str | None, fingerprint: str) -> tuple[int, dict] | None:
    """After this request's transaction failed (rolled back): the first answer, when a
    concurrent request with the same key committed first, else None (raise the failure).

    The twin's commit is what made this one fail: its idempotency row's unique key
    (uq_idempotency_keys_user_key), or its charge leaving too little for a second (402),
    or its retry taking the lines (409). Either way the client asked once, and gets the
    answer of the request that won.
    """
    if not key:
        return None
    with unit_of_work():
        return replay(user_id, key, fingerprint)


def replay(user_id: int, key: str, fingerprint: str) -> tuple[int, dict] | None:
    """The first answer for this key, or None; 409 if the key came with another request.

    In the caller's transaction (the submission's own, so the lookup costs no round trip
    of its own); a key past its TTL is deleted there, before the answer is stored again.
    """
    record = (
        db()
        .scalars(
            select(IdempotencyRecord).where(
                IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key
            )
        )
        .first()
    )
    if record is None:
        return None
    if as_utc(record.created_at) < utcnow() - timedelta(
        seconds=services().config.idempotency_ttl_s
    ):
        # Keys are remembered for IDEMPOTENCY_TTL_S; after that the key is free again.
        # Deleted at once (not at the flush, which inserts before it deletes): this
        # transaction may store a new answer for the same key.
        db().execute(delete(IdempotencyRecord).where(IdempotencyRecord.id == record.id))
        return None
    if record.fingerprint != fingerprint:
        raise Conflict(
            f"This {HEADER} was already used with a different request.",
            code="idempotency_key_reused",
        )
    return record.status_code, record.body
