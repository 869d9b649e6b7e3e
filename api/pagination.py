"""Keyset (cursor) pagination over (created_at, id), newest first."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Any

from sqlalchemy import Select, and_, or_

from shared.errors import ValidationFailed
from shared.models import is_row_id


def encode_cursor(row: Any) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """A cursor's place: the last row's creation time and id. A cursor whose id no job
    or batch can have is forged: ``invalid_cursor``, as PostgreSQL would refuse to
    compare it with the uuid column (``shared.models.is_row_id``)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, row_id = raw.split("|", 1)
        if not is_row_id(row_id):
            raise ValueError(row_id)
        return datetime.fromisoformat(created), row_id
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValidationFailed("The cursor is not valid.", code="invalid_cursor") from None


def page(session, stmt: Select, model: Any, query: dict) -> tuple[list, str | None]:
    """One page of ``stmt`` (a select of ``model``) after ``query["cursor"]``."""
    if "cursor" in query:
        created, last_id = decode_cursor(query["cursor"])
        stmt = stmt.where(
            or_(model.created_at < created, and_(model.created_at == created, model.id < last_id))
        )
    limit = query["limit"]
    rows = list(
        session.scalars(stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1))
    )
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor
