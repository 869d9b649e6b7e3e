"""Accounts: sign-up (users and administrators), API keys, refills and the webhook
signing secret.

The v1 routes, the seed endpoints, the sign-up page and ``flask create-admin`` all
come here, so one set of rules (username, password, signup grant, first key) holds
for every way an account is made. Balances change only through shared/ledger.py.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api.auth import (
    hash_password,
    key_cache,
    new_api_key,
    validate_password,
    validate_username,
)
from api.ratelimit import limits
from api.services import services, unit_of_work
from shared import ledger, webhook_secrets
from shared.db import rowcount
from shared.errors import Conflict, NotFound
from shared.models import ApiKey, User, utcnow


def create_user(username: str, password: str, *, admin: bool = False) -> tuple[User, ApiKey, str]:
    """Insert a user with the signup grant and a first API key, committed together.

    Returns the user, the key's row and the plain key (shown once). A sign-up over
    HTTP counts against the per-address limit (each account brings free tokens); an
    administrator is made by the operator's command, outside any request, and is not.
    """
    validate_username(username)
    validate_password(password)
    if not admin:
        limits().check_signup()
    password_hash = hash_password(password)  # slow on purpose: before the transaction
    with unit_of_work() as session:
        user = User(username=username, password_hash=password_hash, is_admin=admin, tokens=0)
        session.add(user)
        try:
            session.flush()
        except IntegrityError:
            raise Conflict(f"The username {username!r} is taken.", code="username_taken") from None
        ledger.grant(session, user.id, services().config.signup_tokens, ledger.SIGNUP)
        key_row, key = new_api_key(user.id, name="admin" if admin else "default")
        session.add(key_row)
        session.refresh(user)  # the balance the grant wrote
    return user, key_row, key


def promote(username: str) -> bool:
    """Make an existing user an administrator (password unchanged); False if none exists."""
    with unit_of_work() as session:
        result = session.execute(
            update(User).where(User.username == username).values(is_admin=True)
        )
        done = rowcount(result)
    return bool(done)


def refill(username: str, amount: int, admin: User) -> int:
    """An administrator adds ``amount`` tokens to ``username``'s balance; returns the new one."""
    with unit_of_work() as session:
        user_id = session.scalars(select(User.id).where(User.username == username)).first()
        if user_id is None:
            raise NotFound(f"No user named {username!r}.", code="user_not_found")
        return ledger.grant(session, user_id, amount, ledger.REFILL, actor_id=admin.id)


def create_key(user: User, name: str) -> tuple[ApiKey, str]:
    """Another API key for ``user``: its row and the plain key, shown only once."""
    row, key = new_api_key(user.id, name=name)
    with unit_of_work() as session:
        session.add(row)
    return row, key


def active_keys(user: User) -> list[ApiKey]:
    """The user's keys not revoked, oldest first."""
    with unit_of_work(read_only=True) as session:
        return list(
            session.scalars(
                select(ApiKey)
                .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
                .order_by(ApiKey.created_at)
            )
        )


def revoke_key(user: User, key_id: str) -> None:
    """Revoke one of the user's keys at once; 404 if it is not theirs or already revoked."""
    with unit_of_work() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        done = rowcount(result)
    if not done:
        raise NotFound("No such API key.", code="key_not_found")
    # At once in this process; other API processes within API_KEY_CACHE_S (api/auth.py).
    key_cache().forget(key_id)


def webhook_secret(user: User) -> str:
    """The secret ``user``'s webhooks are signed with, created on first use."""
    with unit_of_work() as session:
        # The caller's row in this session (``user`` may come from another one).
        return webhook_secrets.current_secret(session, session.get_one(User, user.id))


def rotate_webhook_secret(user: User) -> tuple[str, datetime | None]:
    """A new signing secret; returns it and until when the previous one signs too."""
    with unit_of_work() as session:
        row = session.get_one(User, user.id)
        secret = webhook_secrets.rotate(session, row)
    return secret, webhook_secrets.previous_valid_until(row, services().config)
