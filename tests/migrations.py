"""What the migration tests share: a database of each kind to migrate, and raw SQL on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import text

from shared.config import Config
from tests import support


@contextmanager
def database_config(kind: str, tmp_path: Path) -> Iterator[Config]:
    """A fresh, empty database's config: ``kind`` is "postgres" or "sqlite"."""
    if kind == "sqlite":
        yield support.test_config(f"sqlite:///{tmp_path / 'm.db'}")
        return
    url = support.create_postgres_database()
    try:
        yield support.test_config(url)
    finally:
        support.drop_postgres_database(url)


def sql(engine, statement: str, **params: Any) -> list:
    """Run ``statement`` in its own transaction; its rows, if it returns any."""
    with engine.begin() as conn:
        result = conn.execute(text(statement), params)
        return result.all() if result.returns_rows else []
