"""Administrator actions; every one checks is_admin on the server."""

from __future__ import annotations

from flask import g

from api import accounts, schemas
from api.auth import admin_required
from api.validation import Blueprint

blp = Blueprint("admin", __name__, url_prefix="/v1/admin", description="Administration")


@blp.route("/refill", methods=["POST"])
@admin_required
@blp.arguments(schemas.Refill)
@blp.response(200, schemas.Balance)
@blp.alt_response(403, schema=schemas.ErrorSchema, description="admin_required")
def refill(body):
    """Add tokens to a user's balance (admin only)."""
    tokens = accounts.refill(body["username"], body["amount"], g.user)
    return {"username": body["username"], "tokens": tokens}
