"""Per-user webhook signing secrets (Standard Webhooks "whsec_" format) and their rotation.

A user has a current secret, created on first use, and after a rotation the
previous one, which stays valid for ``WEBHOOK_SECRET_GRACE_S``: deliveries are
signed with both meanwhile (one ``v1,<sig>`` each), so a receiver can switch
secrets without dropping a webhook. Only the latest previous secret is kept:
rotating twice within the grace period retires the first one at once.

Writes are single UPDATE statements, so two requests (or a request and the
webhook worker) creating the first secret at once agree on the same one. The
caller commits.
"""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.config import Config
from shared.models import User, as_utc, utcnow

PREFIX = "whsec_"
SECRET_BYTES = 24


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def current_secret(session: Session, user: User) -> str:
    """The user's current secret; the first call creates and stores it."""
    if user.webhook_secret:
        return user.webhook_secret
    session.execute(
        update(User)
        .where(User.id == user.id, User.webhook_secret.is_(None))
        .values(webhook_secret=new_secret())
        .execution_options(synchronize_session=False)
    )
    # Whoever wrote first won; read back what is stored, not what we generated.
    session.refresh(user, ["webhook_secret"])
    assert user.webhook_secret is not None  # set by the UPDATE above, ours or a racer's
    return user.webhook_secret


def rotate(session: Session, user: User) -> str:
    """Make a new current secret; the old one becomes ``previous`` for the grace period."""
    current_secret(session, user)
    fresh = new_secret()
    session.execute(
        update(User)
        .where(User.id == user.id)
        .values(
            webhook_secret_previous=User.webhook_secret,
            webhook_secret=fresh,
            webhook_secret_rotated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    session.refresh(
        user, ["webhook_secret", "webhook_secret_previous", "webhook_secret_rotated_at"]
    )
    return fresh


def previous_valid_until(user: User, config: Config) -> datetime | None:
    """When the previous secret stops being used to sign; None if there is none."""
    if not user.webhook_secret_previous or user.webhook_secret_rotated_at is None:
        return None
    return as_utc(user.webhook_secret_rotated_at) + timedelta(seconds=config.webhook_secret_grace_s)


def signing_secrets(user: User, config: Config, now: datetime | None = None) -> list[str]:
    """The secrets a delivery is signed with: the current one, plus the previous in its grace."""
    now = now or utcnow()
    found = [user.webhook_secret] if user.webhook_secret else []
    until = previous_valid_until(user, config)
    if until is not None and now < until and user.webhook_secret_previous:
        found.append(user.webhook_secret_previous)
    return found
