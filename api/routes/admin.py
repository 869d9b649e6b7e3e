"""Administrator actions; every one checks is_admin on the server."""

from __future__ import annotations

from flask import g
from flask_smorest import Blueprint
from sqlalchemy import select

from api import schemas
from api.auth import admin_required
from api.services import db
from shared import ledger
from shared.errors import NotFound
from shared.models import User

blp = Blueprint("admin", __name__, url_prefix="/v1/admin", description="Administration")


def refill_user(username: str, amount: int, admin: User) -> int:
    session = db()
    user_id = session.scalars(select(User.id).where(User.username == username)).first()
    if user_id is None:
        raise NotFound(f"No user named {username!r}.", code="user_not_found")
    balance = ledger.grant(session, user_id, amount, ledger.REFILL, actor_id=admin.id)
    session.commit()
    return balance


@blp.route("/refill", methods=["POST"])
@admin_required
@blp.arguments(schemas.Refill)
@blp.response(200, schemas.Balance)
@blp.alt_response(403, schema=schemas.ErrorSchema, description="admin_required")
def refill(body):
    """Add tokens to a user's balance (admin only)."""
    tokens = refill_user(body["username"], body["amount"], g.user)
    return {"username": body["username"], "tokens": tokens}
