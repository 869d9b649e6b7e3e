"""Engine and session factory, built from the config (never at import time)."""

from __future__ import annotations

import collections
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast

import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    Engine,
    Result,
    Table,
    create_engine,
    event,
    insert,
    literal_column,
    select,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError, StatementError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

from shared.config import Config

log = logging.getLogger(__name__)

#: JSON columns are stored without the spaces ``json.dumps`` puts after separators: a
#: stored result is 114 bytes instead of 131 (issue #26). Every reader parses the value;
#: nothing sends the stored text out as it is.
dump_json = functools.partial(json.dumps, separators=(",", ":"))
_COMPACT_JSON = {"json_serializer": dump_json}


def make_engine(config: Config) -> Engine:
    url = config.database_url
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"timeout": 30, "check_same_thread": False},
            **_COMPACT_JSON,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN until the first write, so a
        # read-then-write transaction can fail with "database is locked" instead of
        # waiting; take the write lock at BEGIN instead, unless the caller said the
        # transaction only reads (``read_only``).
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    engine = create_engine(url, pool_size=10, max_overflow=20, **_COMPACT_JSON)
    event.listen(engine, "connect", _uuid_as_text)
    _ping_when_idle(engine)
    return engine


def _uuid_as_text(dbapi_conn, _record) -> None:
    """Read PostgreSQL ``uuid`` values (job and batch ids, shared.models.RowId) as the
    dashed text they are sent as, whatever the statement: typed columns would convert
    psycopg's ``uuid.UUID`` back to str anyway, and a raw ``text()`` query or a
    ``RETURNING`` without a type would hand one to code (JSON, Redis keys, Celery
    messages) that expects a str."""
    dbapi_conn.adapters.register_loader("uuid", TextLoader)


#: A pooled connection idle longer than this is pinged before use (see _ping_when_idle).
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, but only for connections that sat in the pool a while.

    The stock pre-ping is a round trip on every checkout: on the submission path that
    was one statement in six. A connection used less than PING_AFTER_IDLE_S ago is
    alive but for a restart in that instant; then the statement fails, SQLAlchemy
    invalidates every connection of the pool made before the failure, the request
    gets 503 (a restart is downtime anyway) and the next checkout reconnects.
    Raising DisconnectionError here makes the pool replace the dead connection and
    retry, as pre-ping does.
    """

    @event.listens_for(engine, "checkin")
    def _stamp(_dbapi_conn, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_conn, record, _proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError() from exc
        if not alive:
            raise DisconnectionError()


def _sqlite_begin(conn) -> None:
    read_only = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


#: The execution option ``read_only`` sets (SQLite only).
READ_ONLY = "imgclf_read_only"


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched. ``Session.execute`` is typed as returning any
    ``Result``; for those statements it is a ``CursorResult``, which has the count."""
    return cast(CursorResult[Any], result).rowcount


def read_only(session: Session) -> None:
    """Run the session's next transaction as a plain read on SQLite: ``BEGIN`` (deferred),
    which in WAL mode reads a snapshot without waiting for a writer, where
    ``BEGIN IMMEDIATE`` queued behind it (a 10,000-line batch held every user's
    ``GET /v1/me`` for seconds). Only for a transaction that writes nothing: a deferred
    one that writes after a commit elsewhere fails instead of waiting.

    Call before the transaction's first statement. PostgreSQL reads never wait for
    writers, so nothing changes there.
    """
    if session.get_bind().dialect.name == "sqlite" and not session.in_transaction():
        session.connection(execution_options={READ_ONLY: True})


def one_statement(session: Session) -> None:
    """Run the session's next transaction as autocommit on PostgreSQL, where the caller
    knows it is a single statement (atomic by itself): no BEGIN and COMMIT round trips.

    Call before the transaction's first statement. SQLite keeps its transaction (its
    ``BEGIN IMMEDIATE`` is the write lock, and in-process round trips cost little).
    The pool resets the isolation level when the connection goes back.
    """
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


class DriverStatement:
    """A Core statement that runs alone (autocommit) on PostgreSQL, compiled once and
    executed on a pooled psycopg connection, past SQLAlchemy's per-execution work.

    For the few statements that run once per job on the hot path (the submission's
    charge-and-insert, the worker's claim and write; issue #22): through a Session, one
    such statement cost 0.5-0.65 CPU ms of Python, of which psycopg's own execution was
    0.15; the checkout, the autocommit switch, the compiled-cache lookup, the expanding
    ``IN``'s re-rendering and the result's set-up were the rest. The statement is still
    written in Core, and compiled by SQLAlchemy once; its binds are processed by their
    types (``bind_processor``), and the ``returning`` columns by theirs
    (``result_processor``), as SQLAlchemy would.

    Rows come back as named tuples, read by attribute as Core rows are. A driver error
    is raised as SQLAlchemy's ``DBAPIError`` (``OperationalError`` for a database that
    is down: what callers catch); a lost connection empties the pool, as SQLAlchemy's
    own disconnect handling does. PostgreSQL only: SQLite keeps the Session.
    """

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, returning: Iterable[ColumnElement[Any]]
    ) -> None:
        compiled = _compiled(statement, dialect)
        if "POSTCOMPILE" in compiled.string:
            raise ValueError("an expanding IN is rendered per call: bind an array instead")
        self.sql = str(compiled)
        self._binds = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect))
        }
        #: Every bind's compiled value (literals such as a status); a call's replace them.
        unset = {name: None for name, bind in compiled.binds.items() if bind.required}
        self._fixed = self._processed(compiled.construct_params(unset))
        columns = list(returning)
        #: Rows as named tuples, read by attribute as Core rows are.
        names = [str(c.key) for c in columns]
        row_type: Any = collections.namedtuple("DriverRow", names)  # type: ignore[misc]
        self._make: Callable[[Iterable[Any]], Any] = row_type._make
        self._results = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]

    def rows(self, engine: Engine, params: Mapping[str, Any]) -> list[Any]:
        """Run the statement with ``params`` (values as Core takes them); its rows."""
        fetched = _run_alone(engine, self.sql, {**self._fixed, **self._processed(params)})
        make, results = self._make, self._results
        return [
            make(p(v) if p else v for p, v in zip(results, row, strict=True)) for row in fetched
        ]

    def _processed(self, params: Mapping[str, Any]) -> dict[str, Any]:
        binds = self._binds
        return {
            name: binds[name](value) if name in binds and value is not None else value
            for name, value in params.items()
        }


def _compiled(statement: ClauseElement, dialect: Dialect, **kw: Any) -> SQLCompiler:
    return cast(SQLCompiler, statement.compile(dialect=dialect, compile_kwargs=kw))


def _run_alone(engine: Engine, sql: str, values: dict[str, Any]) -> list[tuple[Any, ...]]:
    """``sql`` on a pooled connection in autocommit, its rows fetched. A driver error is
    raised as SQLAlchemy would raise it, and a connection it broke leaves the pool."""

    def wrapped(exc: psycopg.Error, lost: bool) -> StatementError:
        return DBAPIError.instance(sql, values, exc, psycopg.Error, connection_invalidated=lost)

    try:
        pooled = engine.raw_connection()
    except psycopg.Error as exc:  # could not connect: the pool raises the driver's error
        raise wrapped(exc, False) from exc
    driver = pooled.driver_connection
    assert isinstance(driver, psycopg.Connection)
    try:
        driver.autocommit = True
        return driver.execute(sql, values).fetchall()
    except psycopg.Error as exc:
        lost = driver.broken or driver.closed
        if lost:
            # As SQLAlchemy does after a disconnect: this connection and every pooled
            # one older than it go (a restart killed them all); the next checkout
            # reconnects.
            pooled.invalidate(exc)
            engine.dispose()
        raise wrapped(exc, lost) from exc
    finally:
        _give_back(pooled, driver)


def _give_back(pooled: PoolProxiedConnection, driver: psycopg.Connection[Any]) -> None:
    """Back to the pool out of autocommit, as every other user of the pool expects it;
    a connection that cannot be switched back is dropped instead."""
    try:
        if not (driver.broken or driver.closed):
            driver.autocommit = False
    except psycopg.Error as exc:
        pooled.invalidate(exc)
    finally:
        pooled.close()


#: ``set_config(name, value, is_local => true)`` is ``SET LOCAL`` as an expression: it
#: holds until the current transaction ends, the implicit one of an autocommit statement
#: included, and PostgreSQL reads ``synchronous_commit`` when that transaction commits.
#: As an uncorrelated scalar subquery in the WHERE clause it is an InitPlan, run once as
#: the statement's one-time filter, before any row is read or written (a subquery in
#: FROM did the same, but SQLAlchemy warned of a cartesian product on every statement).
_ASYNC_COMMIT = select(
    literal_column("set_config('synchronous_commit', 'off', true)")
).scalar_subquery()


def commits_async() -> ColumnElement[bool]:
    """A WHERE condition (PostgreSQL only) that makes the transaction of the UPDATE it is
    added to commit without waiting for its WAL flush: ``SET LOCAL synchronous_commit =
    off`` carried by the statement itself (``(SELECT set_config(...)) = 'off'``), so
    a one-statement transaction in autocommit stays one round trip.

    Only for a transaction whose loss in a PostgreSQL crash is recoverable: such a commit
    is visible at once but reaches the disk up to 3 x ``wal_writer_delay`` later (or with
    the next synchronous commit, which flushes the WAL before it). docs/reliability.md
    ("Commits that do not wait for the disk") says which transactions may, and why.
    """
    return literal_column("'off'") == _ASYNC_COMMIT


T = TypeVar("T")

#: SQLSTATEs after which the whole transaction may simply run again: deadlock_detected
#: and serialization_failure (PostgreSQL rolled the transaction back; nothing was written).
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
DEADLOCK_ATTEMPTS = 3


def is_retryable(exc: BaseException) -> bool:
    """A deadlock (or serialization failure) PostgreSQL broke by aborting this transaction."""
    return isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) in (
        RETRYABLE_SQLSTATES
    )


def retry_deadlocks(
    session: Session, transaction: Callable[[], T], attempts: int = DEADLOCK_ATTEMPTS
) -> T:
    """Run ``transaction`` (it does its own writes and commit) again, after a rollback
    and a short random pause, when PostgreSQL aborted it to break a deadlock: two
    transactions locking the same rows in different orders (a batch cancel and a
    worker's refund, say) is normal under load, and nothing of the aborted one was
    written, so the caller's answer should not be a 503. Other errors, and the last
    attempt's, go to the caller. SQLite never deadlocks (BEGIN IMMEDIATE serialises).
    """
    for attempt in range(1, attempts + 1):
        try:
            return transaction()
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            session.rollback()
            time.sleep(random.uniform(0, 0.05 * attempt))  # let the other one finish
    raise AssertionError("unreachable")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # Let SQLAlchemy emit BEGIN itself (see make_engine) instead of pysqlite.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def warn_without_autovacuum(sessions: sessionmaker[Session]) -> bool:
    """Log a warning, once at a worker's start, when PostgreSQL runs without autovacuum.

    psycopg prepares a statement after five runs, and each connection then keeps its
    plan. The claim's plan, made while ``jobs`` held a few rows, reads the whole table,
    and only an ANALYZE of the table replaces it: without autovacuum a worker gets
    slower as the table grows, until it restarts (docs/deploy.md, "Keep autovacuum on").
    Returns whether it warned.
    """
    with sessions() as session:
        if session.get_bind().dialect.name != "postgresql":
            return False
        if session.execute(text("SHOW autovacuum")).scalar_one() != "off":
            return False
    log.warning(
        "PostgreSQL runs with autovacuum off: the jobs table is never analyzed, and "
        "claims get slower as it grows; turn it on (docs/deploy.md, 'Keep autovacuum on')"
    )
    return True


# Below this many rows a plain INSERT is cheaper than setting up a COPY stream.
COPY_MIN_ROWS = 32


def bulk_insert(session: Session, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows fast, in the session's transaction. Rows must give every column.

    PostgreSQL: COPY, one stream for all rows (10,000 rows in tens of ms, where
    executemany sends one statement per row), from ``COPY_MIN_ROWS`` rows up.
    Otherwise (and on SQLite, already fast in-process) a Core INSERT, which skips
    the ORM's unit of work: the hot path of a single submission.
    """
    if not rows:
        return
    connection = session.connection()
    if connection.dialect.name != "postgresql" or len(rows) < COPY_MIN_ROWS:
        session.execute(insert(table), list(rows))
        return
    columns = list(rows[0])
    dbapi = connection.connection.driver_connection
    assert dbapi is not None  # a live connection: session.connection() just checked it out
    with (
        dbapi.cursor() as cursor,
        cursor.copy(f"COPY {table.name} ({', '.join(columns)}) FROM STDIN") as copy,
    ):
        for row in rows:
            copy.write_row([_copy_value(row[c]) for c in columns])


def _copy_value(value: Any) -> Any:
    # JSON columns: COPY takes their text form.
    return dump_json(value) if isinstance(value, dict | list) else value
