"""Migration 0011 (job and batch ids become PostgreSQL uuid) on a database of its own,
PostgreSQL and SQLite: rows written by the previous schema keep their ids (read back as
the same dashed text), the foreign key still cascades, the counters' triggers still
count, ids that are not uuids stop it before anything changes, and the downgrade
brings the text back."""

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from api.metrics import read_counters
from shared import migrate
from shared.db import make_engine
from tests.migrations import database_config, sql

USER = 1
BATCH = "0190f5f4-1b2c-7d3e-8f40-5a6b7c8d9e0f"
JOBS = ("0190f5f4-1b2c-7d3e-8f40-000000000001", "0190f5f4-1b2c-7d3e-8f40-000000000002")
SINGLE = "4b3c2d1e-0f9a-4b8c-9d7e-6f5a4b3c2d1e"  # a uuid4, as ids were before UUIDv7
# Every column the migration changes, as (table, column).
ID_COLUMNS = [
    ("batches", "id"),
    ("jobs", "id"),
    ("jobs", "batch_id"),
    ("token_ledger", "job_id"),
    ("token_ledger", "batch_id"),
    ("webhook_events", "job_id"),
    ("webhook_events", "batch_id"),
]


@pytest.fixture(params=["postgres", "sqlite"])
def config(request, tmp_path):
    with database_config(request.param, tmp_path) as config:
        yield config


def _old_rows(engine) -> None:
    """A batch of two lines, a single job, their ledger rows and webhook events, written
    as the previous release wrote them (text ids)."""
    sql(
        engine,
        "INSERT INTO users (id, username, password_hash, tokens, is_admin, created_at)"
        " VALUES (:u, 'm', 'x', 0, false, CURRENT_TIMESTAMP)",
        u=USER,
    )
    sql(
        engine,
        "INSERT INTO batches (id, user_id, total, model, top_k, retries, created_at)"
        " VALUES (:b, :u, 2, 'mobilenet', 5, 0, CURRENT_TIMESTAMP)",
        b=BATCH,
        u=USER,
    )
    for index, (job_id, batch_id) in enumerate(
        [(JOBS[0], BATCH), (JOBS[1], BATCH), (SINGLE, None)]
    ):
        sql(
            engine,
            "INSERT INTO jobs (id, user_id, batch_id, batch_index, status, model, top_k,"
            " input_url, attempts, retries, created_at) VALUES (:j, :u, :b, :i, 'queued',"
            " 'mobilenet', 5, 'http://x/y.jpg', 0, 0, CURRENT_TIMESTAMP)",
            j=job_id,
            u=USER,
            b=batch_id,
            i=index,
        )
    for job_id, batch_id, delta in ((None, BATCH, -2), (SINGLE, None, -1), (None, None, 3)):
        sql(
            engine,
            "INSERT INTO token_ledger (user_id, delta, reason, job_id, batch_id, retry,"
            " created_at) VALUES (:u, :d, :r, :j, :b, 0, CURRENT_TIMESTAMP)",
            u=USER,
            d=delta,
            r="charge" if delta < 0 else "signup",
            j=job_id,
            b=batch_id,
        )
    for n, (job_id, batch_id) in enumerate([(SINGLE, None), (None, BATCH)]):
        sql(
            engine,
            "INSERT INTO webhook_events (id, user_id, job_id, batch_id, batch_retry,"
            " event_type, url, payload, status, attempts, next_attempt_at, created_at)"
            " VALUES (:e, :u, :j, :b, 0, 'job.completed', 'http://hook', '{}', 'pending', 0,"
            " CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
            e=f"evt_{n}",
            u=USER,
            j=job_id,
            b=batch_id,
        )


def _ids(engine) -> dict[str, list]:
    return {
        f"{table}.{column}": [
            row[0] for row in sql(engine, f"SELECT {column} FROM {table} ORDER BY 1")
        ]
        for table, column in ID_COLUMNS
    }


def _types(engine) -> set[str]:
    columns = {
        table: {c["name"]: c["type"] for c in inspect(engine).get_columns(table)}
        for table, _ in ID_COLUMNS
    }
    return {type(columns[table][column]).__name__ for table, column in ID_COLUMNS}


def test_upgrade_keeps_every_id_and_the_cascade_and_downgrade_brings_text_back(config):
    migrate.upgrade(config, "0010")
    engine = make_engine(config)
    _old_rows(engine)
    before = _ids(engine)

    migrate.upgrade(config)
    engine.dispose()
    postgres = engine.dialect.name == "postgresql"
    assert _types(engine) == ({"UUID"} if postgres else {"VARCHAR"})
    assert _ids(engine) == before  # the same dashed text, read through raw SQL
    with Session(engine) as session:  # the counters' triggers survived the rewrite
        counters = read_counters(session)
    assert counters["jobs"] == {"queued": 3}
    assert counters["tokens"] == {"charge": -3, "signup": 3}

    sql(engine, "DELETE FROM batches WHERE id = :b", b=BATCH)  # the foreign key cascades
    assert sql(engine, "SELECT id FROM jobs") == [(SINGLE,)]

    command.downgrade(migrate.alembic_config(config), "0010")
    engine.dispose()
    assert _types(engine) == {"VARCHAR"}
    assert _ids(engine)["jobs.id"] == [SINGLE]
    assert _ids(engine)["token_ledger.batch_id"] == before["token_ledger.batch_id"]
    migrate.upgrade(config)  # and up again
    engine.dispose()


def test_an_id_that_is_no_uuid_stops_the_upgrade_before_any_change(config):
    migrate.upgrade(config, "0010")
    engine = make_engine(config)
    _old_rows(engine)
    sql(engine, "UPDATE token_ledger SET job_id = 'not-a-uuid' WHERE job_id = :j", j=SINGLE)
    if engine.dialect.name != "postgresql":
        migrate.upgrade(config)  # SQLite keeps text: nothing to convert, nothing refused
        return
    with pytest.raises(RuntimeError, match=r"token_ledger\.job_id 'not-a-uuid'"):
        migrate.upgrade(config)
    engine.dispose()
    assert _types(engine) == {"VARCHAR"}
    with engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == "0010"
