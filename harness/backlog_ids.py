"""The made-up batch ids of a built backlog (bench.backlog, tests/shared/test_backlog_plans.py):
user n's one batch, uuid-shaped, so the rows fit the id columns as PostgreSQL ``uuid``
(migration 0011) or as the text before it."""

from __future__ import annotations

_PREFIX = "00000000-0000-4000-8000-"


def batch_id(user_id: int) -> str:
    """User ``user_id``'s batch."""
    return f"{_PREFIX}{user_id:012d}"


def batch_id_sql(kind: str = "uuid") -> str:
    """``batch_id(u.id)`` in SQL, for a statement over ``users u``, as the SQL type
    ``kind`` (the id columns' type)."""
    return f"CAST('{_PREFIX}' || lpad(u.id::text, 12, '0') AS {kind})"
