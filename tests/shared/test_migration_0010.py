"""Migration 0010 (a bulk charge is one ledger row) on a database of its own, PostgreSQL
and SQLite: the ledger written before it stays as it was, the counters' triggers keep
counting (SQLite would lose them to a copy of the table), and the downgrade either works
or says why it will not."""

import pytest
from alembic import command
from sqlalchemy import inspect

from api.metrics import read_counters
from shared import migrate
from shared.db import make_engine
from tests.migrations import database_config, sql

# Ids as shared.models.new_id makes them: 0011 makes the columns uuid on PostgreSQL.
B_OLD, B_NEW = "0190f5f4-0000-7000-8000-0000000000b0", "0190f5f4-0000-7000-8000-0000000000b1"
J1, J2, J3 = (f"0190f5f4-0000-7000-8000-00000000000{n}" for n in (1, 2, 3))


@pytest.fixture(params=["postgres", "sqlite"])
def config(request, tmp_path):
    with database_config(request.param, tmp_path) as config:
        yield config


def _tokens(engine) -> dict[str, int]:
    from sqlalchemy.orm import Session

    with Session(engine) as session:
        return read_counters(session).get("tokens", {})


def test_upgrade_keeps_the_ledger_and_downgrade_refuses_while_lines_wait(config):
    migrate.upgrade(config, "0009")
    engine = make_engine(config)
    sql(
        engine,
        "INSERT INTO users (id, username, password_hash, tokens, is_admin, created_at)"
        " VALUES (1, 'm', 'x', 1, false, CURRENT_TIMESTAMP)",
    )
    sql(
        engine,
        "INSERT INTO batches (id, user_id, total, model, top_k, retries, created_at)"
        " VALUES (:b, 1, 2, 'mobilenet', 5, 0, CURRENT_TIMESTAMP)",
        b=B_OLD,
    )
    # History from the previous release: signup, and a charge row per batch line.
    for job_id, delta, reason in (
        (None, 3, "signup"),
        (J1, -1, "charge"),
        (J2, -1, "charge"),
    ):
        sql(
            engine,
            "INSERT INTO token_ledger (user_id, delta, reason, job_id, retry, created_at)"
            " VALUES (1, :d, :r, :j, 0, CURRENT_TIMESTAMP)",
            d=delta,
            r=reason,
            j=job_id,
        )
    before = sql(engine, "SELECT id, delta, reason, job_id, retry FROM token_ledger ORDER BY id")

    migrate.upgrade(config)
    assert "batch_id" in {c["name"] for c in inspect(engine).get_columns("token_ledger")}
    after = sql(engine, "SELECT id, delta, reason, job_id, retry FROM token_ledger ORDER BY id")
    assert after == before
    # A batch charged with one row, one line still waiting unsent.
    sql(
        engine,
        "INSERT INTO batches (id, user_id, total, model, top_k, retries, created_at)"
        " VALUES (:b, 1, 1, 'mobilenet', 5, 0, CURRENT_TIMESTAMP)",
        b=B_NEW,
    )
    sql(
        engine,
        "INSERT INTO jobs (id, user_id, batch_id, batch_index, status, model, top_k,"
        " input_url, attempts, retries, chunk, created_at) VALUES (:j, 1, :b, 0,"
        " 'queued', 'mobilenet', 5, 'http://x/y.jpg', 0, 0, 0, CURRENT_TIMESTAMP)",
        j=J3,
        b=B_NEW,
    )
    sql(
        engine,
        "INSERT INTO token_ledger (user_id, delta, reason, batch_id, retry, created_at)"
        " VALUES (1, -1, 'charge', :b, 0, CURRENT_TIMESTAMP)",
        b=B_NEW,
    )
    assert _tokens(engine) == {"signup": 3, "charge": -3}  # one row of -1 per line charged

    alembic = migrate.alembic_config(config)
    with pytest.raises(RuntimeError, match=B_NEW):
        command.downgrade(alembic, "0009")
    assert "batch_id" in {c["name"] for c in inspect(engine).get_columns("token_ledger")}

    sql(engine, "UPDATE jobs SET dispatched_at = CURRENT_TIMESTAMP")  # sent: no longer at risk
    command.downgrade(alembic, "0009")
    engine.dispose()
    assert "batch_id" not in {c["name"] for c in inspect(engine).get_columns("token_ledger")}
    # The counters' triggers survived the column's round trip.
    sql(
        engine,
        "INSERT INTO token_ledger (user_id, delta, reason, job_id, retry, created_at)"
        " VALUES (1, 1, 'refund', :j, 0, CURRENT_TIMESTAMP)",
        j=J3,
    )
    assert _tokens(engine) == {"signup": 3, "charge": -3, "refund": 1}
    migrate.upgrade(config)  # and up again
    engine.dispose()
