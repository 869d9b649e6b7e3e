"""The dispatcher's and the reconciler's queries use their indexes on a database never analyzed.

After a restore or a big import PostgreSQL has no statistics until ANALYZE runs, and
its guesses then decide the plan. The dispatcher's old EXISTS probe was planned as a
semi-join that read the whole waiting index once per open batch (1M waiting jobs:
27 s per refill); these tests read the plans themselves, not the clock, so they hold
on a busy machine. PostgreSQL only: SQLite has no planner statistics to lack.
"""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from psycopg import sql as pgsql
from sqlalchemy import text
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Executable

from harness.backlog_ids import batch_id, batch_id_sql
from shared.db import make_engine
from shared.dispatch import mark_query, next_chunk_query, next_chunks_query, open_batches_query
from shared.models import BULK_WAITING, Job, utcnow
from tests import support
from worker.reconciler import lost_query, stale_queued_queries

USERS, JOBS_PER_BATCH = 40, 1500


@pytest.fixture(scope="module")
def engine():
    url = support.create_postgres_database()
    config = support.migrated(support.test_config(url))
    engine = make_engine(config)
    with engine.begin() as conn:
        for table in ("jobs", "batches", "users"):
            # Never analyzed, even where autovacuum runs: the state after a restore.
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        conn.execute(
            text(
                "INSERT INTO users (username, password_hash, tokens, is_admin, created_at) "
                "SELECT 'plan' || g, 'x', 0, false, now() FROM generate_series(1, :n) g"
            ),
            {"n": USERS},
        )
        conn.execute(
            text(
                "INSERT INTO batches (id, user_id, total, model, top_k, retries, created_at) "
                f"SELECT {batch_id_sql()}, u.id, :per, 'mobilenet', 5, 0, now() FROM users u"
            ),
            {"per": JOBS_PER_BATCH},
        )
        # Every batch's jobs waiting in SQL, and one chunk of each out (dispatched).
        conn.execute(
            text(
                "INSERT INTO jobs (id, user_id, batch_id, batch_index, status, model, top_k,"
                " input_url, attempts, retries, chunk, dispatched_at, created_at) "
                f"SELECT gen_random_uuid(), u.id, {batch_id_sql()}, i, 'queued', 'mobilenet',"
                " 5, 'http://x/' || i, 0, 0, i / 32,"
                " CASE WHEN i < 32 THEN now() END, now() "
                "FROM users u, generate_series(0, :per - 1) i"
            ),
            {"per": JOBS_PER_BATCH},
        )
    yield engine
    engine.dispose()
    support.drop_postgres_database(url)


def plan(engine, query: Executable) -> dict:
    """The plan PostgreSQL would use (EXPLAIN without ANALYZE: an UPDATE is not run)."""
    sql = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    with engine.connect() as conn:
        (rows,) = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}")).one()
    return (rows if isinstance(rows, list) else json.loads(rows))[0]["Plan"]


def run_plan(engine, query: Executable, params: dict, generic: bool) -> dict:
    """The plan of ``query`` as the refill runs it (bound parameters), measured (EXPLAIN
    ANALYZE, rolled back): PostgreSQL's custom plan for these values, or its generic
    plan, the one it may keep for a statement prepared (psycopg prepares a statement
    run five times on a connection; its text no longer changes with the batches)."""
    compiled = query.compile(dialect=engine.dialect)
    names: list[str] = []

    def dollar(match: re.Match) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)s", dollar, compiled.string)
    values = compiled.construct_params(params)
    mode = "force_generic_plan" if generic else "force_custom_plan"
    with engine.connect() as conn:
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute(f"SET LOCAL plan_cache_mode = {mode}")  # until the rollback
        cursor.execute(f"PREPARE measured AS {sql}")
        try:
            args = pgsql.SQL(", ").join(pgsql.Literal(values[n]) for n in names)
            explain = pgsql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE measured({})")
            (rows,) = cursor.execute(explain.format(args)).fetchone()
        finally:
            conn.rollback()
            cursor.execute("DEALLOCATE measured")  # not transactional
    return (rows if isinstance(rows, list) else json.loads(rows))[0]["Plan"]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def job_scans(root: dict) -> list[dict]:
    return [n for n in nodes(root) if n.get("Relation Name") == "jobs" and "Scan" in n["Node Type"]]


def indexes_read(root: dict) -> set[str]:
    """The indexes the plan reads; fails on a sequential scan of jobs."""
    seq = [n for n in job_scans(root) if n["Node Type"] == "Seq Scan"]
    assert not seq, root
    return {n["Index Name"] for n in nodes(root) if "Index Name" in n}


def test_the_database_has_no_statistics(engine):
    with engine.connect() as conn:
        analyzed = conn.scalar(
            text(
                "SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL "
                "FROM pg_stat_user_tables WHERE relname = 'jobs'"
            )
        )
    assert not analyzed


def test_the_refill_orders_users_from_the_batches_alone(engine):
    root = plan(engine, open_batches_query())
    assert not job_scans(root), root  # no probe per open batch


@pytest.mark.parametrize("after", [-1, 3])
def test_a_batch_next_chunk_is_two_steps_into_the_waiting_index(engine, after):
    root = plan(engine, next_chunk_query(batch_id(7), after))
    scans = job_scans(root)
    assert len(scans) == 2, root  # the lowest chunk number, then that chunk's jobs
    for scan in scans:
        assert scan["Index Name"] == "ix_jobs_bulk_waiting", scan
        assert "batch_id" in scan.get("Index Cond", ""), scan
    # Not min(): an aggregate over every waiting entry of the batch.
    assert not [n for n in nodes(root) if n["Node Type"] == "Aggregate"], root


BATCHES = [batch_id(u) for u in range(1, 25)]


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize("batches", [1, 24])
def test_a_refill_probes_each_batch_two_steps_into_the_waiting_index(engine, batches, generic):
    # Batch ids as an array: one statement text for any number of batches.
    ids = BATCHES[:batches]
    params = {"probe_batches": ids, "probe_after": [-1] * batches}
    root = run_plan(engine, next_chunks_query(), params, generic)
    assert root["Actual Rows"] == 32 * batches, root  # each batch's next chunk
    scans = job_scans(root)
    assert len(scans) == 2, root  # the lowest chunk number, then that chunk's jobs ...
    for scan in scans:
        assert scan["Index Name"] == "ix_jobs_bulk_waiting", scan
        assert "batch_id" in scan.get("Index Cond", ""), scan
        assert scan["Actual Loops"] == batches, scan  # ... once per batch, parameterized
    assert not joins_other_than_nested_loops(root), root


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize("batches", [1, 24])
def test_marking_a_refill_chunks_reads_a_range_per_batch_then_the_primary_key(
    engine, batches, generic
):
    ids = BATCHES[:batches]
    with engine.connect() as conn:  # and three jobs by id, as jobs with no chunk number go
        loose = conn.scalars(
            # A literal: a bound string would be cast to VARCHAR, not to the column's type.
            text(
                f"SELECT id FROM jobs WHERE batch_id = '{batch_id(30)}' AND {BULK_WAITING} LIMIT 3"
            )
        ).all()
    params = {
        "mark_batches": ids,
        "mark_lo": [1] * batches,
        "mark_hi": [2] * batches,
        "mark_loose": loose,
        "mark_now": utcnow(),
    }
    root = run_plan(engine, mark_query(), params, generic)
    assert root["Actual Rows"] == 64 * batches + 3, root  # every job marked, once
    scans = job_scans(root)
    (waiting,) = [n for n in scans if n.get("Index Name") == "ix_jobs_bulk_waiting"]
    assert "batch_id" in waiting["Index Cond"] and "chunk" in waiting["Index Cond"], waiting
    assert waiting["Actual Loops"] == batches, root  # one range per batch
    assert waiting["Actual Rows"] * waiting["Actual Loops"] == 64 * batches, root
    (rest,) = [n for n in scans if n is not waiting]
    assert rest.get("Index Name") == "pk_jobs" and "id" in rest["Index Cond"], root
    assert not joins_other_than_nested_loops(root), root


def joins_other_than_nested_loops(root: dict) -> list[dict]:
    """Hash or merge joins: without statistics, those read a whole index to join."""
    return [n for n in nodes(root) if n["Node Type"] in ("Hash Join", "Merge Join", "Hash")]


def test_the_stale_queued_check_reads_small_indexes(engine):
    single, bulk = stale_queued_queries(utcnow() - timedelta(seconds=60))
    assert indexes_read(plan(engine, single)) == {"ix_jobs_batch_status"}
    assert indexes_read(plan(engine, bulk)) == {"ix_jobs_bulk_out"}


def test_the_lost_check_reads_the_processing_index(engine):
    root = plan(engine, lost_query(Job.claimed_at < utcnow()))
    assert indexes_read(root) == {"ix_jobs_processing"}
