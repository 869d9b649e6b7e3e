"""The PostgreSQL engine's connection checks, against a real server."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    any_,
    bindparam,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, OperationalError

from shared import db
from shared.results import StoredResult, pack
from tests import support


@pytest.fixture
def engine(postgres_url):
    engine = db.make_engine(support.test_config(postgres_url))
    yield engine
    engine.dispose()


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()


def _kill(engine, pid: int) -> None:
    # From a separate engine: as a server restart would, the pooled connection dies.
    other = db.make_engine(support.test_config(str(engine.url.render_as_string(False))))
    with other.connect() as conn:
        assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
    other.dispose()


def test_connection_idle_past_the_threshold_is_pinged_and_replaced(engine, monkeypatch):
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 0.2)
    dead = _backend_pid(engine)
    _kill(engine, dead)
    time.sleep(0.3)  # past PING_AFTER_IDLE_S: the checkout pings, finds it dead, reconnects
    assert _backend_pid(engine) != dead


def test_recently_used_connection_is_not_pinged_and_the_pool_recovers(engine, monkeypatch):
    monkeypatch.setattr(db, "PING_AFTER_IDLE_S", 60)
    dead = _backend_pid(engine)
    _kill(engine, dead)
    # Within the threshold there is no ping (that round trip is what is saved), so
    # the statement meets the dead connection; the pool is then invalidated ...
    with pytest.raises(OperationalError), engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    # ... and the next checkout reconnects without waiting for the threshold.
    assert _backend_pid(engine) != dead


def test_one_statement_runs_in_autocommit_and_the_pool_resets_it(engine, sqlite_url):
    """db.one_statement: the next transaction sends no BEGIN/COMMIT on PostgreSQL; the
    connection goes back to the pool with transactions on; SQLite is left as it is."""
    sessions = db.make_session_factory(engine)
    with sessions() as session:
        db.one_statement(session)
        driver = session.connection().connection.driver_connection
        assert driver.autocommit
        session.execute(text("SELECT 1"))
        session.commit()
        session.execute(text("SELECT 1"))  # a new transaction: the pool reset the level
        assert not session.connection().connection.driver_connection.autocommit
    lite = db.make_engine(support.test_config(sqlite_url))
    with db.make_session_factory(lite)() as session:
        db.one_statement(session)
        assert not session.in_transaction()
    lite.dispose()


def test_commits_async_holds_for_its_transaction_only(engine):
    """db.commits_async on a real server: the UPDATE carrying it writes its rows as any
    other, and ``synchronous_commit`` is off until that transaction ends, then on again."""
    table = Table("commits_async_probe", MetaData(), Column("id", Integer, primary_key=True))
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"id": 1}, {"id": 2}])
    show = text("SHOW synchronous_commit")
    with engine.connect() as conn:
        assert conn.execute(show).scalar_one() == "on"
        plain = conn.execute(update(table).where(table.c.id == 1).values(id=11))
        assert (plain.rowcount, conn.execute(show).scalar_one()) == (1, "on")
        stmt = update(table).where(table.c.id == 2, db.commits_async()).values(id=12)
        assert conn.execute(stmt.returning(table.c.id)).scalars().all() == [12]
        assert conn.execute(show).scalar_one() == "off"
        conn.commit()
        assert conn.execute(show).scalar_one() == "on"
        assert sorted(conn.execute(select(table.c.id)).scalars()) == [11, 12]
        conn.rollback()
    with engine.begin() as conn:
        table.drop(conn)


def _probe(engine) -> Table:
    table = Table(
        f"driver_probe_{time.monotonic_ns()}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("state", String(16)),
        Column("result", StoredResult()),
    )
    with engine.begin() as conn:
        table.create(conn)
        conn.execute(table.insert(), [{"id": 1, "state": "queued"}, {"id": 2, "state": "done"}])
    return table


@pytest.fixture
def probe(engine):
    table = _probe(engine)
    yield table
    with engine.begin() as conn:
        table.drop(conn)


def _finish(probe, dialect) -> db.DriverStatement:
    """UPDATE probe SET state = 'done', result = :result WHERE id = :id AND state = ANY
    (['queued']) RETURNING *: a fixed literal, a typed bind and a typed result."""
    stmt = (
        update(probe)
        .where(probe.c.id == bindparam("id"), probe.c.state == any_(literal(["queued"])))
        .values(state="done", result=bindparam("result", type_=StoredResult()))
        .returning(*probe.c)
    )
    return db.DriverStatement(stmt, dialect, list(probe.c))


def test_a_driver_statement_runs_alone_and_reads_as_core_does(engine, probe):
    """db.DriverStatement: the statement commits by itself (autocommit), its binds and
    rows go through their types (StoredResult packs and expands), rows read by
    attribute; the connection goes back to the pool with transactions on."""
    finish = _finish(probe, engine.dialect)
    result = {"predictions": [{"label": "macaw", "score": 0.5}]}
    [row] = finish.rows(engine, {"id": 1, "result": result})
    assert (row.id, row.state, row.result) == (1, "done", result)
    assert finish.rows(engine, {"id": 1, "result": result}) == []  # the condition holds
    with engine.connect() as conn:  # committed, and stored packed as the type stores it
        stored = conn.execute(select(probe.c.result).where(probe.c.id == 1)).scalar_one()
        raw = conn.execute(text(f"SELECT result FROM {probe.name} WHERE id = 1")).scalar_one()
        assert stored == result and raw == pack(result)
        assert not conn.connection.driver_connection.autocommit


def test_a_driver_statement_error_is_sqlalchemys_and_the_pool_recovers(engine, probe):
    finish = _finish(probe, engine.dialect)
    with pytest.raises(DBAPIError) as refused:  # not an integer: the server refuses it
        finish.rows(engine, {"id": "not a number", "result": None})
    assert not refused.value.connection_invalidated
    with engine.connect() as conn:  # the same connection, back out of autocommit
        assert not conn.connection.driver_connection.autocommit
    dead = _backend_pid(engine)
    _kill(engine, dead)
    with pytest.raises(OperationalError) as lost:  # what api/services.py maps to 503
        finish.rows(engine, {"id": 2, "result": None})
    assert lost.value.connection_invalidated
    assert finish.rows(engine, {"id": 2, "result": None}) == []  # a new connection
    assert _backend_pid(engine) != dead


def test_a_driver_statement_refuses_an_expanding_in(engine, probe):
    stmt = update(probe).where(probe.c.state.in_(["queued", "done"])).values(state="x")
    with pytest.raises(ValueError, match="expanding IN"):
        db.DriverStatement(stmt, engine.dialect, [])


class _Deadlock(Exception):
    sqlstate = "40P01"


class _Rollbacks:
    def __init__(self) -> None:
        self.count = 0

    def rollback(self) -> None:
        self.count += 1


def _failing(times: int, error: Exception):
    calls = []

    def transaction():
        calls.append(1)
        if len(calls) <= times:
            raise error
        return "done"

    return transaction, calls


def test_retry_deadlocks_runs_the_transaction_again_after_a_rollback():
    from sqlalchemy.exc import OperationalError as Wrapped

    session = _Rollbacks()
    transaction, calls = _failing(2, Wrapped("UPDATE users", {}, _Deadlock()))
    assert db.retry_deadlocks(session, transaction) == "done"
    assert len(calls) == 3 and session.count == 2


def test_retry_deadlocks_gives_up_and_leaves_other_errors_alone():
    from sqlalchemy.exc import OperationalError as Wrapped

    session = _Rollbacks()
    transaction, calls = _failing(5, Wrapped("UPDATE users", {}, _Deadlock()))
    with pytest.raises(Wrapped):
        db.retry_deadlocks(session, transaction, attempts=3)
    assert len(calls) == 3
    other = Wrapped("SELECT 1", {}, ConnectionError("server closed the connection"))
    transaction, calls = _failing(1, other)
    with pytest.raises(Wrapped):
        db.retry_deadlocks(session, transaction)
    assert len(calls) == 1


def test_a_server_without_autovacuum_is_reported_at_start(engine, sqlite_url, caplog):
    """db.warn_without_autovacuum warns exactly when the server's autovacuum is off (as
    on this project's CI machine; a developer's server may have it on), and never on
    SQLite."""
    with engine.connect() as conn:
        off = conn.execute(text("SHOW autovacuum")).scalar_one() == "off"
    with caplog.at_level("WARNING", logger="shared.db"):
        assert db.warn_without_autovacuum(db.make_session_factory(engine)) is off
        sqlite = db.make_engine(support.test_config(sqlite_url))
        assert db.warn_without_autovacuum(db.make_session_factory(sqlite)) is False
        sqlite.dispose()
    warned = [r for r in caplog.records if "autovacuum off" in r.getMessage()]
    assert len(warned) == (1 if off else 0)
