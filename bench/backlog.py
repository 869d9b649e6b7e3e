"""A million waiting jobs on a PostgreSQL database never analyzed (issue #26).

What a busy deployment sees after a restore or a big import: USERS users each with
one batch of PER_BATCH jobs waiting in SQL, and no planner statistics yet. Measured
side by side on that one database:

- the dispatcher's questions, today's queries beside the ones they replaced (kept
  here as literal SQL): which open batches have work waiting, a batch's next chunk;
- whole refills through ``shared.dispatch.refill`` (real Redis, real Celery
  messages), each followed by what a worker does to the chunks it sent;
- the reconciler's checks (stale queued, lost processing), today's and before;
- what ``GET /metrics`` still runs per scrape (jobs by status, ledger by reason:
  whole-table aggregates, left for a later change), for the record;
- storage: bytes per waiting job, the table and each index.

``python -m bench.backlog`` (about 3 minutes on 2 cores, most of it building the
rows), ``--quick`` for 20 x 2,000.
"""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import Select, text, update
from sqlalchemy.orm import sessionmaker

from bench import end_to_end
from bench.common import fmt, machine, main_json, median, photo_names, wait_done
from bench.null_model import NullStack
from harness import databases, stack_config
from shared import dispatch
from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.dispatch import FIRST_CHUNK
from shared.models import Job, utcnow
from shared.queue import make_celery
from shared.redis_client import make_redis
from worker import reconciler
from worker.reconciler import SCAN_LIMIT

FULL, QUICK = (100, 10_000), (20, 2_000)
REPEAT = 5
REFILLS = 20
OLD_TIMEOUT_MS = 120_000

WAITING = "status = 'queued' AND batch_id IS NOT NULL AND dispatched_at IS NULL"
# The queries as they stood before issue #26's change, as literal SQL; what runs now is
# built by the code itself (``now_queries``), so the "now" column cannot drift from it.
BEFORE = {
    "open batches with work waiting": "SELECT b.id FROM batches b WHERE b.completed_at IS "
    f"NULL AND EXISTS (SELECT jobs.id FROM jobs WHERE jobs.batch_id = b.id AND {WAITING}) "
    "ORDER BY b.created_at, b.id",
    "a batch's next chunk": f"SELECT min(chunk) FROM jobs WHERE batch_id = :batch AND {WAITING}",
    "reconciler: stale queued": "SELECT id FROM jobs WHERE status = 'queued' AND ((batch_id "
    "IS NULL AND created_at < now() - interval '1 minute') OR dispatched_at < now() - "
    "interval '1 minute') LIMIT 5000",
}
# What /metrics runs per scrape (api/metrics.py), for the record.
METRICS_SQL = (
    "SELECT status, count(*) FROM jobs GROUP BY status; "
    "SELECT reason, sum(delta) FROM token_ledger GROUP BY reason"
)


def now_queries(batch_id: str) -> dict[str, list[Select]]:
    """The dispatcher's and the reconciler's questions, as their modules build them."""
    cutoff = utcnow() - timedelta(minutes=1)
    return {
        "open batches with work waiting": [dispatch.waiting_batches_query()],
        "a batch's next chunk": [dispatch.next_chunk_query(batch_id)],
        "reconciler: stale queued": [
            q.limit(SCAN_LIMIT) for q in reconciler.stale_queued_queries(cutoff)
        ],
        "reconciler: lost processing": [
            reconciler.lost_query(Job.claimed_at < utcnow()).limit(SCAN_LIMIT)
        ],
    }


def build(engine, users: int, per: int, base_url: str = "https://images.example.com") -> float:
    """USERS users with a batch of PER_BATCH jobs each, all waiting, in one transaction;
    their URLs go round the real photos at ``base_url`` (each unique)."""
    names = photo_names()
    start = time.perf_counter()
    with engine.begin() as conn:
        for table in ("jobs", "batches", "users", "token_ledger"):
            conn.execute(text(f"ALTER TABLE {table} SET (autovacuum_enabled = false)"))
        conn.execute(
            text(
                "INSERT INTO users (username, password_hash, tokens, is_admin, created_at) "
                "SELECT 'backlog' || g, 'x', 0, false, now() FROM generate_series(1, :n) g"
            ),
            {"n": users},
        )
        conn.execute(
            text(
                "INSERT INTO batches (id, user_id, total, model, top_k, retries, created_at) "
                "SELECT 'b' || lpad(u.id::text, 8, '0'), u.id, :per, 'mobilenet', 5, 0,"
                " now() - (1000 - u.id) * interval '1 second' FROM users u"
                " WHERE u.username LIKE 'backlog%'"
            ),
            {"per": per},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, user_id, batch_id, batch_index, status, model, top_k,"
                " input_url, attempts, retries, chunk, created_at) "
                "SELECT gen_random_uuid()::text, u.id, 'b' || lpad(u.id::text, 8, '0'), i,"
                " 'queued', 'mobilenet', 5,"
                " :base || '/' || (CAST(:names AS text[]))[1 + i % :k] || '?n=backlog-'"
                " || u.id || '-' || i, 0, 0,"
                # numbered as api.bulk.chunk does: a short first chunk, then BATCH_MAX
                " CASE WHEN i < :first THEN 0 ELSE 1 + (i - :first) / 32 END, now()"
                " FROM users u, generate_series(0, :per - 1) i WHERE u.username LIKE 'backlog%'"
            ),
            {"per": per, "base": base_url, "names": names, "k": len(names), "first": FIRST_CHUNK},
        )
    return time.perf_counter() - start


def time_sql(engine, statements: list, params: dict) -> list[float]:
    """Wall seconds per run of ``statements`` (SQL text with ``params``, or the code's own
    Select objects), REPEAT runs; the old EXISTS probe once (it takes seconds)."""
    slow = any(isinstance(s, str) and "EXISTS" in s for s in statements)
    times = []
    for _ in range(1 if slow else REPEAT):
        with engine.connect() as conn:
            conn.execute(text(f"SET statement_timeout = {OLD_TIMEOUT_MS}"))
            start = time.perf_counter()
            for statement in statements:
                query = text(statement) if isinstance(statement, str) else statement
                conn.execute(query, params if isinstance(statement, str) else {}).all()
            times.append(time.perf_counter() - start)
    return times


def refills(config, sessions: sessionmaker) -> list[float]:
    """Whole refills, each followed by a worker's write of what it sent."""
    client, celery = make_redis(config), make_celery(config)
    times = []
    for _ in range(REFILLS):
        start = time.perf_counter()
        dispatch.refill(sessions, client, celery, config)
        times.append(time.perf_counter() - start)
        with sessions() as session:
            session.execute(
                update(Job)
                .where(text("status = 'queued' AND dispatched_at IS NOT NULL"))
                .values(status="succeeded", completed_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            session.commit()
    return times


def storage(engine, jobs: int) -> dict:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND (c.relname = 'jobs' OR c.oid IN "
                "(SELECT indexrelid FROM pg_index WHERE indrelid = 'jobs'::regclass))"
            )
        ).all()
        total = conn.scalar(text("SELECT pg_total_relation_size('jobs')"))
    return {"total_bytes_per_job": total / jobs, "relations": {n: b for n, b in rows}}


def service(quick: bool) -> dict:
    """The null-model service (worker, API, photo server) before and with the backlog:
    bulk images/s on an empty queue, then over a window with every user's batch
    waiting, and how long a new user's 30 URLs take behind them."""
    users, per = QUICK if quick else FULL
    n, window_s = (200, 10.0) if quick else (2000, 30.0)
    with NullStack() as stack, stack.running(1, Config().loader_processes):
        end_to_end.singles(stack, 16, 16, wait=True)  # warm-up
        empty = end_to_end.bulk(stack, n)
        engine = make_engine(stack.config)
        build(engine, users, per, stack.photos.base_url)
        sessions = make_session_factory(engine)
        dispatch.refill(sessions, make_redis(stack.config), make_celery(stack.config), stack.config)
        time.sleep(2.0)  # the window fills and the worker's batches run full
        before, start = _succeeded(engine), time.time()
        time.sleep(window_s)
        backlog_rate = (_succeeded(engine) - before) / (time.time() - start)
        newcomer = stack.user(30)
        posted = time.time()
        resp = stack.post_batch(newcomer, "\n".join(stack.urls(30)))
        resp.raise_for_status()
        counts, end = wait_done(stack.dsn, "batch_id = %s", (resp.json()["id"],), 30, 300)
        engine.dispose()
    return {
        "empty_images_per_s": empty["images_per_s"],
        "backlog_images_per_s": backlog_rate,
        "window_s": window_s,
        "newcomer_s": end - posted,
        "newcomer_counts": counts,
    }


def _succeeded(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))


def run(quick: bool = False) -> dict:
    users, per = QUICK if quick else FULL
    url = databases.create_postgres_database()
    prefix = databases.new_prefix("bench-backlog")
    try:
        config = databases.migrated(stack_config.test_config(url, queue_prefix=prefix))
        engine = make_engine(config)
        built_s = build(engine, users, per)
        batch = f"b{users // 2:08d}"
        queries = {}
        for what, now in now_queries(batch).items():
            before = BEFORE.get(what)
            queries[what] = {
                "before_ms": [t * 1000 for t in time_sql(engine, [before], {"batch": batch})]
                if before
                else None,
                "now_ms": [t * 1000 for t in time_sql(engine, now, {})],
            }
        queries["/metrics: jobs by status + ledger by reason"] = {
            "before_ms": None,
            "now_ms": [t * 1000 for t in time_sql(engine, METRICS_SQL.split("; "), {})],
        }
        refill_ms = [t * 1000 for t in refills(config, make_session_factory(engine))]
        result = {
            "machine": machine(),
            "users": users,
            "per_batch": per,
            "jobs": users * per,
            "build_s": built_s,
            "queries": queries,
            "refill_ms": refill_ms,
            "storage": storage(engine, users * per),
        }
        engine.dispose()
    finally:
        databases.delete_redis_prefix(prefix)
        databases.drop_postgres_database(url)
    result["service"] = service(quick)
    return result


def report(r: dict) -> str:
    lines = [
        f"Backlog: {r['jobs']:,} jobs waiting ({r['users']} users x {r['per_batch']:,}), "
        f"PostgreSQL never analyzed; {r['machine']}; rows built in {r['build_s']:.0f} s",
        "",
        "| question | before (ms) | now, median of 5 (ms) |",
        "|---|---|---|",
    ]
    for what, q in r["queries"].items():
        before = fmt(median(q["before_ms"]), 1) if q["before_ms"] else "-"
        lines.append(f"| {what} | {before} | {fmt(median(q['now_ms']), 1)} |")
    refill = r["refill_ms"]
    lines += [
        "",
        f"Whole refills ({len(refill)}, each after a worker's write): "
        f"p50 {fmt(median(refill), 1)} ms, max {fmt(max(refill), 1)} ms",
        f"Storage: {fmt(r['storage']['total_bytes_per_job'], 0)} bytes per waiting job "
        "(jobs with its indexes and TOAST); by relation (bytes per job):",
    ]
    for name, size in sorted(r["storage"]["relations"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name}: {fmt(size / r['jobs'], 0)}")
    svc = r["service"]
    lines += [
        "",
        "The service on the null model (one worker, LOADER_PROCESSES at its default):",
        f"  bulk on an empty queue: {fmt(svc['empty_images_per_s'])} images/s",
        f"  with the backlog waiting ({svc['window_s']:.0f} s window): "
        f"{fmt(svc['backlog_images_per_s'])} images/s "
        f"({fmt(svc['backlog_images_per_s'] / svc['empty_images_per_s'], 2)}x the empty queue)",
        f"  a new user's 30 URLs behind it: {fmt(svc['newcomer_s'], 2)} s "
        f"({svc['newcomer_counts']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
