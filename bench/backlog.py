"""A million waiting jobs on a PostgreSQL database never analyzed (issue #26).

What a busy deployment sees after a restore or a big import: USERS users each with
one batch of PER_BATCH jobs waiting in SQL, and no planner statistics yet. Measured
side by side on that one database:

- the dispatcher's questions, today's queries beside the ones they replaced (kept
  here as literal SQL): which open batches have work waiting, a batch's next chunk;
- whole refills through ``shared.dispatch.refill`` (real Redis, real Celery
  messages), each followed by what a worker does to the chunks it sent, after
  ``dispatch.warm`` and ``gc.freeze()`` as a starting worker does (``--cold``,
  ``--no-freeze``: without): wall clock,
  and the CPU of this process and of its PostgreSQL backends (what a busy machine's
  wall clock hides), and Python's full garbage collections met on the way;
- the reconciler's checks (stale queued, lost processing), today's and before;
- what ``GET /metrics`` still runs per scrape (jobs by status, ledger by reason:
  whole-table aggregates, left for a later change), for the record;
- storage: bytes per waiting job, the table and each index.

``python -m bench.backlog`` (about 3 minutes on 2 cores, most of it building the
rows), ``--quick`` for 20 x 2,000, ``--refills-only`` for the queries and the refills,
``--users 1000`` for 1,000 users sharing the same million jobs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import Select, text, update
from sqlalchemy.exc import OperationalError

from api.metrics import read_counters
from bench import end_to_end
from bench.common import fmt, machine, median, photo_names, wait_done
from bench.null_model import NullStack
from harness import databases, stack_config
from harness.accounts import add_account
from harness.backlog_ids import batch_id, batch_id_sql
from shared import dispatch, ledger, migrate, results
from shared.config import Config
from shared.db import bulk_insert, dump_json, make_engine, make_session_factory
from shared.dispatch import FIRST_CHUNK
from shared.jobs import NEW_JOB
from shared.models import Job, new_id, utcnow
from shared.queue import make_celery
from shared.redis_client import make_redis
from worker import reconciler
from worker.reconciler import SCAN_LIMIT

FULL, QUICK = (100, 10_000), (20, 2_000)
REPEAT = 5
REFILLS = 20
OLD_TIMEOUT_MS = 30_000  # the old probe ran past it with 1,000 batches open

WAITING = "status = 'queued' AND batch_id IS NOT NULL AND dispatched_at IS NULL"
# Job ids in SQL: random (before) or UUIDv7 as shared.models.new_id makes them (now):
# clock_timestamp() is per row, so the build's rows get increasing milliseconds.
_MS = "lpad(to_hex((extract(epoch FROM clock_timestamp()) * 1000)::bigint), 12, '0')"
_R = "gen_random_uuid()::text"
_HEX = "md5(random()::text)"
IDS = {
    "v4": _R,
    # Inline, not a subquery: PostgreSQL would run an uncorrelated one once.
    "v7": f"substr({_MS}, 1, 8) || '-' || substr({_MS}, 9, 4) || '-7' || substr({_HEX}, 1, 3)"
    f" || '-' || substr('89ab', 1 + floor(random() * 4)::int, 1) || substr({_HEX}, 1, 3)"
    f" || '-' || substr({_HEX}, 1, 12)",
}
# A top-5 answer as the worker gives it (worker/models/base.py top_k) ...
PREDICTIONS = {
    "predictions": [
        {"label": label, "class_id": n, "score": score}
        for n, (label, score) in enumerate(
            [
                ("goldfish", 0.931204),
                ("great_white_shark", 0.031102),
                ("tiger_shark", 0.010215),
                ("hammerhead", 0.004417),
                ("electric_ray", 0.002108),
            ],
            start=1,
        )
    ]
}
# ... and as the column stores it: the code's own packing and JSON text, so the layout
# cannot drift from what the worker writes.
RESULT = dump_json(results.pack(PREDICTIONS))
# A worker instance's name (worker/liveness.py new_worker_id): the claim writes it.
WORKER_ID = "celery@bench-host/0a1b2c3d"
# The queries as they stood before issue #26's change, as literal SQL; what runs now is
# built by the code itself (``now_queries``), so the "now" column cannot drift from it.
BEFORE = {
    # Before: a LIMIT 1 probe per open batch (and before that an EXISTS, 8-30+ s; its
    # numbers are in docs/benchmarks.md). Now the batches alone, probed in turn.
    "open batches, the refill's order": "SELECT b.id FROM batches b WHERE b.completed_at IS"
    f" NULL AND (SELECT 1 FROM jobs WHERE jobs.batch_id = b.id AND {WAITING} LIMIT 1) IS NOT"
    " NULL ORDER BY b.created_at, b.id",
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
        "open batches, the refill's order": [dispatch.open_batches_query()],
        "a batch's next chunk": [
            dispatch.next_chunks_query().params(probe_batches=[batch_id], probe_after=[-1])
        ],
        "mark it (rolled back)": [
            (
                dispatch.mark_query(),
                {
                    "mark_batches": [batch_id],
                    "mark_lo": [0],
                    "mark_hi": [0],
                    "mark_loose": [],
                    "mark_now": utcnow(),
                },
            )
        ],
        "reconciler: stale queued": [
            q.limit(SCAN_LIMIT) for q in reconciler.stale_queued_queries(cutoff)
        ],
        "reconciler: lost processing": [
            reconciler.lost_query(Job.claimed_at < utcnow()).limit(SCAN_LIMIT)
        ],
    }


def _id_type(engine) -> str:
    """``jobs.id``'s SQL type: ``uuid`` from migration 0011, ``varchar`` before it."""
    with engine.connect() as conn:
        return conn.scalar(
            text(
                "SELECT CASE WHEN data_type = 'uuid' THEN 'uuid' ELSE 'varchar' END FROM"
                " information_schema.columns WHERE table_name = 'jobs' AND column_name = 'id'"
            )
        )


def build(
    engine,
    users: int,
    per: int,
    base_url: str = "https://images.example.com",
    ids: str = "v7",
) -> float:
    """USERS users with a batch of PER_BATCH jobs each, all waiting, charged (a ledger
    row each), in one transaction; their URLs go round the real photos at ``base_url``
    (each unique); job ids as ``IDS[ids]`` makes them. Ids are cast to the column's
    type (PostgreSQL ``uuid`` from migration 0011, text before it)."""
    names = photo_names()
    kind = _id_type(engine)
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
                f"SELECT {batch_id_sql(kind)}, u.id, :per, 'mobilenet', 5, 0,"
                " now() - (1000 - u.id) * interval '1 second' FROM users u"
                " WHERE u.username LIKE 'backlog%'"
            ),
            {"per": per},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, user_id, batch_id, batch_index, status, model, top_k,"
                " input_url, attempts, retries, chunk, request_id, created_at) "
                f"SELECT CAST({IDS[ids]} AS {kind}), u.id, {batch_id_sql(kind)}, i,"
                " 'queued', 'mobilenet', 5,"
                " :base || '/' || (CAST(:names AS text[]))[1 + i % :k] || '?n=backlog-'"
                " || u.id || '-' || i, 0, 0,"
                # numbered as api.bulk.chunk does: a short first chunk, then BATCH_MAX
                " CASE WHEN i < :first THEN 0 ELSE 1 + (i - :first) / 32 END,"
                # the batch's request id on every line, as api/bulk.py writes it (uuid4 hex)
                " md5(u.id::text), now()"
                " FROM users u, generate_series(0, :per - 1) i WHERE u.username LIKE 'backlog%'"
            ),
            {"per": per, "base": base_url, "names": names, "k": len(names), "first": FIRST_CHUNK},
        )
        conn.execute(
            text(
                # One charge row per batch (shared.ledger.charge_batch).
                "INSERT INTO token_ledger (user_id, delta, reason, batch_id, retry, created_at)"
                " SELECT user_id, -total, 'charge', id, 0, now() FROM batches"
                " WHERE id::text LIKE '00000000-%'"
            )
        )
    return time.perf_counter() - start


def time_sql(engine, statements: list, params: dict) -> list[float]:
    """Wall seconds per run of ``statements`` (as ``_bound`` takes them), REPEAT runs;
    the old EXISTS probe once (it takes seconds)."""
    slow = any(isinstance(s, str) and "EXISTS" in s for s in statements)
    times = []
    for _ in range(1 if slow else REPEAT):
        with engine.connect() as conn:
            conn.execute(text(f"SET statement_timeout = {OLD_TIMEOUT_MS}"))
            start = time.perf_counter()
            try:
                for statement in statements:
                    conn.execute(*_bound(statement, params)).all()
            except OperationalError:  # statement_timeout: reported as "> OLD_TIMEOUT_MS"
                return [math.inf]
            times.append(time.perf_counter() - start)
    return times


def _bound(statement, params: dict) -> tuple:
    """SQL text with ``params``, or the code's own statement with its own parameters
    (a ``(statement, parameters)`` pair) or none."""
    if isinstance(statement, str):
        return text(statement), params
    return statement if isinstance(statement, tuple) else (statement, {})


def time_counters(engine) -> list[float]:
    """Milliseconds per ``api.metrics.read_counters`` (the fold and the read), REPEAT runs."""
    sessions, times = make_session_factory(engine), []
    for _ in range(REPEAT):
        with sessions() as session:
            start = time.perf_counter()
            read_counters(session)
            times.append((time.perf_counter() - start) * 1000)
    return times


def trigger_cost(engine, users: int = 1) -> dict:
    """What the counters' triggers add to writing jobs: a single submission's rows
    (charge, job: what api/submission.py writes) and a 10,000-line batch's (charge rows
    and COPY, as api/bulk.py), each with the triggers on and off, alternated."""
    sessions = make_session_factory(engine)
    with sessions() as session:
        user_id = add_account(session, tokens=10**9, prefix="trig").id
        session.commit()

    def single() -> None:
        with sessions() as session:
            job_id = new_id()
            ledger.charge_jobs(session, user_id, [job_id])
            session.add(Job(id=job_id, user_id=user_id, model="mobilenet", input_url="u"))
            session.commit()

    def bulk() -> None:
        with sessions() as session:
            ids = [new_id() for _ in range(BULK_LINES)]
            ledger.charge_batch(session, user_id, new_id(), BULK_LINES)
            rows = [
                {
                    **NEW_JOB,
                    "id": j,
                    "user_id": user_id,
                    "batch_id": None,
                    "batch_index": i,
                    "custom_id": None,
                    "model": "mobilenet",
                    "top_k": 5,
                    "input_url": f"https://images.example.com/{i}.jpg",
                    "chunk": i // 32,
                    "created_at": utcnow(),
                    "request_id": None,
                }
                for i, j in enumerate(ids)
            ]
            bulk_insert(session, Job.__table__, rows)
            session.commit()

    out: dict[str, dict[str, list[float]]] = {}
    for what, work, rounds, each in (("single", single, 10, 20), ("bulk", bulk, 3, 1)):
        out[what] = {"on": [], "off": []}
        for _ in range(rounds):
            for state in ("on", "off"):
                _triggers(engine, state == "on")
                for _ in range(each):
                    start = time.perf_counter()
                    work()
                    out[what][state].append((time.perf_counter() - start) * 1000)
    _triggers(engine, True)
    return out


def _triggers(engine, on: bool) -> None:
    with engine.begin() as conn:
        for table in ("jobs", "token_ledger"):
            conn.execute(text(f"ALTER TABLE {table} {'ENABLE' if on else 'DISABLE'} TRIGGER USER"))


# Index layouts compared on a small database each (bench.backlog's storage section).
LAYOUT_BATCHES, BULK_LINES = 5, 10_000
#: The schema "before" is built at: text ids (varchar(36)), the last revision before
#: migration 0011 made them PostgreSQL ``uuid``.
BEFORE_REVISION = "0010"


def layouts() -> dict:
    """Bytes per finished job, ledger included, and per canceled line, before (ids as
    text, migration 0010) and now (ids as ``uuid``, the latest schema): LAYOUT_BATCHES
    batches of 10,000 lines with UUIDv7 ids, accepted one after the other, then taken
    and finished by two UPDATEs (a worker's claim and its result), then VACUUM as
    autovacuum would; and the same rows compacted (VACUUM FULL), the floor."""
    out = {}
    for name, revision in (("before", BEFORE_REVISION), ("now", "head")):
        url = databases.create_postgres_database()
        try:
            config = stack_config.test_config(url, queue_prefix="x")
            migrate.upgrade(config, revision)
            engine = make_engine(config)
            out[name] = _layout(engine, "v7")
            engine.dispose()
        finally:
            databases.drop_postgres_database(url)
    return out


def _layout(engine, ids: str) -> dict:
    jobs = LAYOUT_BATCHES * BULK_LINES
    build(engine, LAYOUT_BATCHES, BULK_LINES, ids=ids)
    accepted = _sizes(engine)
    with engine.begin() as conn:
        # The worker's two updates (shared/jobs.py claim, then mark_all_succeeded).
        conn.execute(
            text(
                "UPDATE jobs SET status = 'processing', claimed_at = now(), claimed_by = :w,"
                " started_at = now(), attempts = 1, dispatched_at = now()"
            ),
            {"w": WORKER_ID},
        )
        conn.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', completed_at = now(), claimed_by = NULL,"
                " result = CAST(:r AS json)"
            ),
            {"r": RESULT},
        )
    _vacuum(engine, "VACUUM")
    finished = _sizes(engine)
    _vacuum(engine, "VACUUM FULL")
    compact = _sizes(engine)
    with engine.begin() as conn:  # a canceled line's refund row
        conn.execute(
            text(
                "INSERT INTO token_ledger (user_id, delta, reason, job_id, retry, created_at)"
                " SELECT user_id, 1, 'refund', id, 0, now() FROM jobs"
            )
        )
    refunded = _sizes(engine)
    return {
        "accepted": {k: v / jobs for k, v in accepted.items()},
        "finished": {k: v / jobs for k, v in finished.items()},
        "compact": {k: v / jobs for k, v in compact.items()},
        "refund_row_bytes": (refunded["token_ledger"] - compact["token_ledger"]) / jobs,
    }


def _vacuum(engine, what: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"{what} jobs"))
        conn.execute(text(f"{what} token_ledger"))


def _sizes(engine) -> dict[str, int]:
    """Bytes of jobs' heap and each index, and the ledger with its indexes."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT c.relname, pg_relation_size(c.oid) FROM pg_class c WHERE c.relname ="
                " 'jobs' OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid ="
                " 'jobs'::regclass)"
            )
        ).all()
        sizes = {name: size for name, size in rows}
        sizes["jobs TOAST"] = conn.scalar(
            text(
                "SELECT pg_total_relation_size('jobs') - pg_indexes_size('jobs')"
                " - pg_relation_size('jobs')"
            )
        )
        sizes["token_ledger"] = conn.scalar(text("SELECT pg_total_relation_size('token_ledger')"))
    return sizes


def refills(config, engine, warm: bool = True, freeze: bool = True) -> dict[str, list[float]]:
    """Whole refills, each followed by a worker's write of what it sent: milliseconds
    of wall clock, of this process's CPU and of its PostgreSQL backends' CPU (the
    machine may be busy: the CPU times are what the refill itself cost). ``warm``:
    ``dispatch.warm`` first, as a process does when its dispatcher starts (its cost:
    ``warm``, one entry); ``freeze``: then ``gc.freeze()``, as a worker does at the end
    of its start (worker/runtime.py), so that a full collection no longer walks what it
    holds since."""
    client, celery = make_redis(config), make_celery(config)
    sessions = make_session_factory(engine)
    out: dict[str, list[float]] = {"wall": [], "cpu": [], "pg_cpu": [], "warm": [], "gc": []}
    # Outside any transaction: pg_stat_activity is read once per transaction.
    with (
        engine.connect().execution_options(isolation_level="AUTOCOMMIT") as meter,
        _full_collections() as collecting,
    ):
        if warm:  # on the connection the refills get: the meter has its own
            start = time.perf_counter()
            dispatch.warm(sessions, client, celery, config)
            out["warm"].append((time.perf_counter() - start) * 1000)
        if freeze:
            gc.freeze()
        for _ in range(REFILLS):
            backends = _backends_on_cpu_ns(meter)
            start, cpu, gc_ms = time.perf_counter(), time.process_time(), sum(collecting)
            dispatch.refill(sessions, client, celery, config)
            out["wall"].append((time.perf_counter() - start) * 1000)
            out["gc"].append(sum(collecting) - gc_ms)
            out["cpu"].append((time.process_time() - cpu) * 1000)
            after = _backends_on_cpu_ns(meter)
            out["pg_cpu"].append(sum(ns - backends.get(pid, 0) for pid, ns in after.items()) / 1e6)
            with sessions() as session:
                session.execute(
                    update(Job)
                    .where(text("status = 'queued' AND dispatched_at IS NOT NULL"))
                    .values(status="succeeded", completed_at=utcnow())
                    .execution_options(synchronize_session=False)
                )
                session.commit()
    return out


@contextlib.contextmanager
def _full_collections():
    """Milliseconds (CPU) of each of Python's full garbage collections meanwhile: one
    walks every object of the process, and a refill that meets one pays for it."""
    spent: list[float] = []
    began = [0.0]

    def note(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                began[0] = time.process_time()
            else:
                spent.append((time.process_time() - began[0]) * 1000)

    gc.callbacks.append(note)
    try:
        yield spent
    finally:
        gc.callbacks.remove(note)


def _backends_on_cpu_ns(meter) -> dict[int, int]:
    """Nanoseconds on CPU of each PostgreSQL backend of this database but ``meter``'s
    own (/proc/<pid>/schedstat: finer than /proc/<pid>/stat's 10 ms ticks)."""
    pids = meter.scalars(
        text(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    ).all()
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return out


def storage(engine, jobs: int) -> dict:
    """Bytes per waiting job: jobs with its indexes and TOAST, and the ledger's charge
    rows with theirs."""
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
        ledger_bytes = conn.scalar(text("SELECT pg_total_relation_size('token_ledger')"))
    return {
        "total_bytes_per_job": total / jobs,
        "ledger_bytes_per_job": ledger_bytes / jobs,
        "relations": {n: b for n, b in rows},
    }


def service(quick: bool, users: int | None = None) -> dict:
    """The null-model service (worker, API, photo server) before and with the backlog:
    bulk images/s on an empty queue, then over a window with every user's batch
    waiting, and how long a new user's 30 URLs take behind them: until the first
    result, and until the last."""
    users, per = _shape(quick, users)
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
        first = wait_done(stack.dsn, "batch_id = %s", (resp.json()["id"],), 1, 300)[1]
        counts, end = wait_done(stack.dsn, "batch_id = %s", (resp.json()["id"],), 30, 300)
        engine.dispose()
    return {
        "empty_images_per_s": empty["images_per_s"],
        "backlog_images_per_s": backlog_rate,
        "window_s": window_s,
        "newcomer_s": end - posted,
        "newcomer_first_s": first - posted,
        "newcomer_counts": counts,
    }


def _succeeded(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(text("SELECT count(*) FROM jobs WHERE status = 'succeeded'"))


def run(
    quick: bool = False,
    users: int | None = None,
    refills_only: bool = False,
    warm: bool = True,
    freeze: bool = True,
) -> dict:
    """``users``: that many users share the same total backlog (1,000 x 1,000 = 1M);
    ``refills_only``: the queries and the refills, not storage, triggers or the service;
    ``warm``: the dispatcher warmed up before its first refill (``dispatch.warm``);
    ``freeze``: ``gc.freeze()`` before the refills (after the warm-up)."""
    users, per = _shape(quick, users)
    url = databases.create_postgres_database()
    prefix = databases.new_prefix("bench-backlog")
    try:
        config = databases.migrated(stack_config.test_config(url, queue_prefix=prefix))
        engine = make_engine(config)
        built_s = build(engine, users, per)
        batch = batch_id(users // 2)
        queries = {}
        for what, now in now_queries(batch).items():
            before = BEFORE.get(what)
            queries[what] = {
                "before_ms": [t * 1000 for t in time_sql(engine, [before], {"batch": batch})]
                if before
                else None,
                "now_ms": [t * 1000 for t in time_sql(engine, now, {})],
            }
        queries["/metrics: jobs by status + tokens by reason"] = {
            "before_ms": [t * 1000 for t in time_sql(engine, METRICS_SQL.split("; "), {})],
            "now_ms": time_counters(engine),
        }
        refill = refills(config, engine, warm, freeze)
        triggers = None if refills_only else trigger_cost(engine)
        result = {
            "machine": machine(),
            "users": users,
            "per_batch": per,
            "jobs": users * per,
            "build_s": built_s,
            "queries": queries,
            "refill_ms": refill["wall"],
            "refill_cpu_ms": refill["cpu"],
            "refill_pg_cpu_ms": refill["pg_cpu"],
            "warm_ms": refill["warm"],
            "refill_gc_ms": refill["gc"],
            "gc_frozen": freeze,
            "storage": storage(engine, users * per),
            "triggers_ms": triggers,
        }
        engine.dispose()
    finally:
        databases.delete_redis_prefix(prefix)
        databases.drop_postgres_database(url)
    if not refills_only:
        result["layouts"] = layouts()
        result["service"] = service(quick, users)
    return result


def _shape(quick: bool, users: int | None) -> tuple[int, int]:
    default_users, per = QUICK if quick else FULL
    if users is None:
        return default_users, per
    return users, default_users * per // users


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
        if q["before_ms"] and math.isinf(q["before_ms"][0]):
            before = f"> {OLD_TIMEOUT_MS:,}"
        lines.append(f"| {what} | {before} | {fmt(median(q['now_ms']), 1)} |")
    refill = r["refill_ms"]
    lines += [
        "",
        f"Whole refills ({len(refill)}, each after a worker's write): "
        f"p50 {fmt(median(refill), 1)} ms, max {fmt(max(refill), 1)} ms; the first, a "
        f"process's first ({_first_refill(r)}): "
        f"{fmt(refill[0], 1)} ms, the others' max {fmt(max(refill[1:]), 1)} ms",
        *_cpu_report(r),
        f"Storage: {fmt(r['storage']['total_bytes_per_job'], 0)} bytes per waiting job "
        "(jobs with its indexes and TOAST); by relation (bytes per job):",
    ]
    for name, size in sorted(r["storage"]["relations"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name}: {fmt(size / r['jobs'], 0)}")
    lines.append(
        f"  token_ledger (one charge row per batch): {fmt(r['storage']['ledger_bytes_per_job'], 0)}"
    )
    if "service" not in r:  # --refills-only
        return "\n".join(lines)
    lines += ["", _layout_report(r["layouts"]), "", _trigger_report(r["triggers_ms"])]
    svc = r["service"]
    lines += [
        "",
        "The service on the null model (one worker, LOADER_PROCESSES at its default):",
        f"  bulk on an empty queue: {fmt(svc['empty_images_per_s'])} images/s",
        f"  with the backlog waiting ({svc['window_s']:.0f} s window): "
        f"{fmt(svc['backlog_images_per_s'])} images/s "
        f"({fmt(svc['backlog_images_per_s'] / svc['empty_images_per_s'], 2)}x the empty queue)",
        f"  a new user's 30 URLs behind it: first result {fmt(svc['newcomer_first_s'], 2)} s, "
        f"all {fmt(svc['newcomer_s'], 2)} s ({svc['newcomer_counts']})",
    ]
    return "\n".join(lines)


def _first_refill(r: dict) -> str:
    if r.get("warm_ms"):
        return f"after dispatch.warm, which took {fmt(r['warm_ms'][0], 1)} ms"
    return "cold: Celery's first send, each statement's first compile"


def _cpu_report(r: dict) -> list[str]:
    """CPU per refill, the first apart (absent from results older than the meter)."""
    lines = []
    for key, whose in (("refill_cpu_ms", "this process"), ("refill_pg_cpu_ms", "PostgreSQL")):
        if key in r:
            ms = r[key]
            lines.append(
                f"  CPU per refill, {whose}: p50 {fmt(median(ms), 1)} ms, the first "
                f"{fmt(ms[0], 1)} ms, the others' max {fmt(max(ms[1:]), 1)} ms"
            )
    if r.get("gc_frozen"):
        lines.append("  (gc.freeze() before the refills)")
    if any(r.get("refill_gc_ms", [])):
        met = [f"#{i + 1}: {fmt(ms, 1)} ms" for i, ms in enumerate(r["refill_gc_ms"]) if ms]
        lines.append(f"  refills that met a full garbage collection (its CPU): {', '.join(met)}")
    return lines


def _layout_report(layouts: dict) -> str:
    kinds = ("accepted", "finished", "compact")
    lines = [
        f"Bytes per job, {LAYOUT_BATCHES} x {BULK_LINES:,} lines (jobs + indexes + TOAST"
        " + ledger): before = ids as text (migration 0010), now = ids as uuid (0011)",
        "| | " + " | ".join(f"{k} before | {k} now" for k in kinds) + " |",
        "|---|" + "---|" * (2 * len(kinds)),
    ]
    names = sorted({n for lay in layouts.values() for k in kinds for n in lay[k]})
    for name in [*names, "total"]:
        cells = []
        for k in kinds:
            for which in ("before", "now"):
                sizes = layouts[which][k]
                value = sum(sizes.values()) if name == "total" else sizes.get(name)
                cells.append(fmt(value, 0) if value is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "A canceled line's refund row: "
        + ", ".join(f"{w} {fmt(layouts[w]['refund_row_bytes'], 0)}" for w in ("before", "now"))
        + " bytes"
    )
    return "\n".join(lines)


def _trigger_report(t: dict) -> str:
    def cell(what: str) -> str:
        on, off = median(t[what]["on"]), median(t[what]["off"])
        return f"{fmt(off, 2)} -> {fmt(on, 2)} ms ({fmt(on - off, 2)} ms)"

    return (
        "The counters' triggers (median, off -> on, with the backlog in place): a single "
        f"submission's rows {cell('single')}; a 10,000-line batch's {cell('bulk')}"
    )


if __name__ == "__main__":
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--users", type=int, help="users sharing the same total backlog")
    parser.add_argument("--refills-only", action="store_true", help="skip storage, service")
    parser.add_argument("--json", help="write the raw result here too")
    parser.add_argument("--cold", action="store_true", help="no dispatch.warm before the refills")
    parser.add_argument(
        "--no-freeze", action="store_true", help="no gc.freeze() before the refills"
    )
    args = parser.parse_args()
    result = run(args.quick, args.users, args.refills_only, not args.cold, not args.no_freeze)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print(report(result))
