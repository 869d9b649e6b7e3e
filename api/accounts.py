"""Accounts: sign-up (users and administrators), API keys and refills.

The v1 routes, the seed endpoints, the sign-up page and ``flask create-admin`` all
come here, so one set of rules (username, password, signup grant, first key) holds
for every way an account is made. Balances change only through shared/ledger.py.
"""

from __future__ import annotations

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
from api.services import db, services
from shared import ledger
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
    session = db()
    user = User(username=username, password_hash=hash_password(password), is_admin=admin, tokens=0)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"The username {username!r} is taken.", code="username_taken") from None
    ledger.grant(session, user.id, services().config.signup_tokens, ledger.SIGNUP)
    key_row, key = new_api_key(user.id, name="admin" if admin else "default")
    session.add(key_row)
    session.commit()
    session.refresh(user)
    return user, key_row, key


def promote(username: str) -> bool:
    """Make an existing user an administrator (password unchanged); False if none exists."""
    session = db()
    done = session.execute(
        update(User).where(User.username == username).values(is_admin=True)
    ).rowcount
    session.commit()
    return bool(done)


def refill(username: str, amount: int, admin: User) -> int:
    """An administrator adds ``amount`` tokens to ``username``'s balance; returns the new one."""
    session = db()
    user_id = session.scalars(select(User.id).where(User.username == username)).first()
    if user_id is None:
        raise NotFound(f"No user named {username!r}.", code="user_not_found")
    balance = ledger.grant(session, user_id, amount, ledger.REFILL, actor_id=admin.id)
    session.commit()
    return balance


def create_key(user: User, name: str) -> tuple[ApiKey, str]:
    """Another API key for ``user``: its row and the plain key, shown only once."""
    row, key = new_api_key(user.id, name=name)
    session = db()
    session.add(row)
    session.commit()
    return row, key


def active_keys(user: User) -> list[ApiKey]:
    """The user's keys not revoked, oldest first."""
    return list(
        db().scalars(
            select(ApiKey)
            .where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
            .order_by(ApiKey.created_at)
        )
    )


def revoke_key(user: User, key_id: str) -> None:
    """Revoke one of the user's keys at once; 404 if it is not theirs or already revoked."""
    session = db()
    done = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    ).rowcount
    session.commit()
    if not done:
        raise NotFound("No such API key.", code="key_not_found")
    # At once in this process; other API processes within API_KEY_CACHE_S (api/auth.py).
    key_cache().forget(key_id)
