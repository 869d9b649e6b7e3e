"""The statements a PostgreSQL engine's connections send, as psycopg sends them."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
from sqlalchemy import Engine, event


class DriverLog:
    """While open, ``record(statement, autocommit)`` for every statement that a
    connection of ``engine`` (PostgreSQL) checked out meanwhile sends: through
    SQLAlchemy or past it on the driver (``shared.db.DriverStatement``), which
    SQLAlchemy's ``before_cursor_execute`` event never sees. It sets the connection's
    psycopg ``cursor_factory``, and sets it back at check-in. psycopg in autocommit sends
    no BEGIN or COMMIT; otherwise psycopg begins implicitly and SQLAlchemy commits, and
    neither is a statement here (SQLAlchemy's ``begin`` and ``commit`` events see them).
    """

    def __init__(self, engine: Engine, record: Callable[[str, bool], None]) -> None:
        self.engine = engine

        class Recording(psycopg.Cursor):
            def execute(self, query, *args, **kwargs):
                record(str(query), self.connection.autocommit)
                return super().execute(query, *args, **kwargs)

        self._cursor = Recording

    def _checkout(self, dbapi_conn: psycopg.Connection, _record: object, _proxy: object) -> None:
        dbapi_conn.cursor_factory = self._cursor

    def _checkin(self, dbapi_conn: psycopg.Connection | None, _record: object) -> None:
        if dbapi_conn is not None:  # None: the connection was invalidated
            dbapi_conn.cursor_factory = psycopg.Cursor

    def __enter__(self) -> DriverLog:
        event.listen(self.engine, "checkout", self._checkout)
        event.listen(self.engine, "checkin", self._checkin)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "checkout", self._checkout)
        event.remove(self.engine, "checkin", self._checkin)
