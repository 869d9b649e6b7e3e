"""Accounts, the caller's profile and API keys."""

from __future__ import annotations

from flask import g
from flask_smorest import Blueprint
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from api import schemas
from api.auth import (
    hash_password,
    login_required,
    new_api_key,
    validate_password,
    validate_username,
)
from api.ratelimit import limits
from api.services import db, services
from shared import ledger
from shared.errors import Conflict, NotFound
from shared.jobs import iso
from shared.models import ApiKey, User, utcnow

blp = Blueprint("users", __name__, url_prefix="/v1", description="Accounts and API keys")


def create_user(username: str, password: str) -> tuple[User, ApiKey, str]:
    """Insert a user with the signup grant and a first API key, committed together.

    Every sign-up path comes here, so the username rule and the per-address sign-up
    limit (each account brings free tokens) hold for all of them.
    """
    validate_username(username)
    validate_password(password)
    limits().check_signup()
    session = db()
    user = User(username=username, password_hash=hash_password(password), tokens=0)
    session.add(user)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"The username {username!r} is taken.", code="username_taken") from None
    ledger.grant(session, user.id, services().config.signup_tokens, ledger.SIGNUP)
    key_row, key = new_api_key(user.id, name="default")
    session.add(key_row)
    session.commit()
    session.refresh(user)
    return user, key_row, key


def key_to_dict(row: ApiKey) -> dict:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": iso(row.created_at),
        "last_used_at": iso(row.last_used_at),
    }


@blp.route("/users", methods=["POST"])
@blp.doc(security=[])
@blp.arguments(schemas.Credentials)
@blp.response(201, schemas.UserCreated)
@blp.alt_response(409, schema=schemas.ErrorSchema, description="username_taken")
@blp.alt_response(429, schema=schemas.ErrorSchema, description="rate_limited (SIGNUP_LIMIT_PER_IP)")
def register(body):
    """Sign up: 5 free tokens and an API key, shown once."""
    user, key_row, key = create_user(body["username"], body["password"])
    return {
        "username": user.username,
        "tokens": user.tokens,
        "api_key": key,
        "api_key_id": key_row.id,
    }


@blp.route("/me", methods=["GET"])
@login_required
@blp.response(200, schemas.Me)
def me():
    """The authenticated user and their token balance."""
    user = g.user
    return {
        "username": user.username,
        "tokens": user.tokens,
        "is_admin": user.is_admin,
        "created_at": iso(user.created_at),
    }


@blp.route("/keys", methods=["POST"])
@login_required
@blp.arguments(schemas.KeyCreate)
@blp.response(201, schemas.KeyCreated)
def create_key(body):
    """Create another API key; the key itself is shown only in this response."""
    row, key = new_api_key(g.user.id, name=body["name"])
    session = db()
    session.add(row)
    session.commit()
    return {**key_to_dict(row), "key": key}


@blp.route("/keys", methods=["GET"])
@login_required
@blp.response(200, schemas.KeyList)
def list_keys():
    """The caller's active keys (prefix only)."""
    rows = db().scalars(
        select(ApiKey)
        .where(ApiKey.user_id == g.user.id, ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return {"items": [key_to_dict(r) for r in rows]}


@blp.route("/keys/<key_id>", methods=["DELETE"])
@login_required
@blp.response(204)
def revoke_key(key_id: str):
    """Revoke a key at once; requests using it get 401 from then on."""
    session = db()
    done = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.user_id == g.user.id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    ).rowcount
    session.commit()
    if not done:
        raise NotFound("No such API key.", code="key_not_found")
