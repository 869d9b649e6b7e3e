"""Accounts, the caller's profile and API keys."""

from __future__ import annotations

from flask import g

from api import accounts, reads, schemas
from api.auth import login_required
from api.validation import Blueprint
from shared.jobs import iso
from shared.models import ApiKey

blp = Blueprint("users", __name__, url_prefix="/v1", description="Accounts and API keys")


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
    user, key_row, key = accounts.create_user(body["username"], body["password"])
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
    user = reads.profile(g.user)
    return {
        "username": user.username,
        "tokens": user.tokens,
        "is_admin": user.is_admin,
        "created_at": iso(user.created_at),
    }


@blp.route("/keys", methods=["POST"])
@login_required
@blp.arguments(schemas.KeyCreate)
@blp.doc(requestBody={"required": False})  # no body: a key without a name
@blp.response(201, schemas.KeyCreated)
def create_key(body):
    """Create another API key; the key itself is shown only in this response."""
    row, key = accounts.create_key(g.user, body["name"])
    return {**key_to_dict(row), "key": key}


@blp.route("/keys", methods=["GET"])
@login_required
@blp.response(200, schemas.KeyList)
def list_keys():
    """The caller's active keys (prefix only)."""
    rows = accounts.active_keys(g.user)
    return {"items": [key_to_dict(r) for r in rows]}


@blp.route("/keys/<key_id>", methods=["DELETE"])
@login_required
@blp.response(204)
def revoke_key(key_id: str):
    """Revoke a key; requests using it get 401 at once on this API process, and within
    API_KEY_CACHE_S (5 s) on the others."""
    accounts.revoke_key(g.user, key_id)
