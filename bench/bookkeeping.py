"""What the service's bookkeeping costs per image, outside loading and the forward pass
(issue #22).

Two parts:

* ``steps``: the worker's claim, write and announce called in this process, on a
  fresh PostgreSQL database and Redis, at batch sizes 1 and 32: CPU ms of this
  process (thread CPU) and of the PostgreSQL backend per batch, wall ms per batch.
  No Celery, no model, no images: the SQL and Redis work alone.
* ``service``: the whole service on the null model (``RUNTIME=null``), bulk and
  singles with ``Prefer: wait`` (bench.null_model's scenarios) plus one user with 16
  waiting clients (past MAX_WAITS_PER_USER), CPU ms per image per process from /proc.

``python -m bench.bookkeeping [--quick] [--json PATH]``. The machine may be shared:
numbers are as measured.
"""

from __future__ import annotations

import time

from bench.common import cpu_seconds, fmt, main_json, median, pids_matching
from harness import databases, stack_config

STEP_SIZES = (1, 32)
STEP_BATCHES = 200  # per size (quick: 20)


def _user_and_jobs(session, n: int) -> tuple[int, list[str]]:
    from shared import ledger
    from shared.db import bulk_insert
    from shared.models import Job, User, new_id, utcnow

    user = User(username=f"b{new_id()[:12]}", password_hash="x", tokens=0)
    session.add(user)
    session.flush()
    ledger.grant(session, user.id, n, ledger.SIGNUP)
    ids = [new_id() for _ in range(n)]
    now = utcnow()
    rows = [
        {c.name: None for c in Job.__table__.columns}
        | {
            "id": j,
            "user_id": user.id,
            "model": "mobilenet",
            "top_k": 5,
            "input_url": f"http://photos.invalid/{j}.jpg",
            "status": "queued",
            "attempts": 0,
            "retries": 0,
            "created_at": now,
        }
        for j in ids
    ]
    ledger.charge_jobs(session, user.id, ids)
    bulk_insert(session, Job.__table__, rows)
    session.commit()
    return user.id, ids


def _backend_cpu(db_name: str) -> float:
    return sum(cpu_seconds(p) for p in pids_matching(f" {db_name} "))


def steps(quick: bool = False) -> dict:
    """claim / write / announce per batch, in this process (see the module docstring)."""
    import redis
    from sqlalchemy.engine import make_url

    from shared.db import make_engine, make_session_factory
    from shared.events import publish_done
    from worker import pipeline

    batches = 20 if quick else STEP_BATCHES
    url = databases.create_postgres_database()
    config = databases.migrated(stack_config.test_config(url))
    engine = make_engine(config)
    sessions = make_session_factory(engine)
    client = redis.Redis.from_url(config.redis_url)
    db_name = make_url(url).database
    out = {}
    try:
        for size in STEP_SIZES:
            with sessions() as s:
                _, ids = _user_and_jobs(s, size * (batches + 5))
            groups = [ids[i : i + size] for i in range(0, len(ids), size)]
            for g in groups[:5]:  # warm-up: statement caches, connections
                _one_batch(pipeline, sessions, client, config, g, publish_done)
            cpu = {"claim": 0.0, "write": 0.0, "announce": 0.0}
            wall = {"claim": [], "write": [], "announce": []}
            pg_before = _backend_cpu(db_name)
            for g in groups[5:]:
                for step, (c, w) in _one_batch(
                    pipeline, sessions, client, config, g, publish_done
                ).items():
                    cpu[step] += c
                    wall[step].append(w)
            pg = _backend_cpu(db_name) - pg_before
            n = len(groups) - 5
            out[str(size)] = {
                "batches": n,
                "cpu_ms_per_batch": {k: 1000 * v / n for k, v in cpu.items()},
                "wall_ms_per_batch_p50": {k: 1000 * median(v) for k, v in wall.items()},
                "postgres_cpu_ms_per_batch": 1000 * pg / n,
            }
    finally:
        engine.dispose()
        databases.delete_redis_prefix(config.queue_prefix)
        databases.drop_postgres_database(url)
    return out


def _timed(fn):
    c, w = time.thread_time(), time.perf_counter()
    result = fn()
    return result, (time.thread_time() - c, time.perf_counter() - w)


def _one_batch(pipeline, sessions, client, config, ids, publish_done) -> dict:
    def claim():
        with sessions() as s:
            return pipeline.claim(s, ids, "bench")

    (rows, _events), t_claim = _timed(claim)
    outcomes = [
        pipeline.JobOutcome(r, predictions=[{"label": "macaw", "score": 0.9}]) for r in rows
    ]

    def write():
        with sessions() as s:
            return pipeline.write(s, outcomes)

    _, t_write = _timed(write)
    _, t_announce = _timed(lambda: publish_done(client, config, ids))
    return {"claim": t_claim, "write": t_write, "announce": t_announce}


def run(quick: bool = False) -> dict:
    return {"steps": steps(quick)}


def report(result: dict) -> str:
    lines = [
        "Worker steps in process (PostgreSQL; CPU ms per batch: this process / PG backend):",
        "",
        "| batch | claim CPU | write CPU | announce CPU | PG backend CPU (all three) "
        "| claim wall p50 | write wall p50 | announce wall p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, s in result["steps"].items():
        c, w = s["cpu_ms_per_batch"], s["wall_ms_per_batch_p50"]
        lines.append(
            f"| {size} | {fmt(c['claim'])} | {fmt(c['write'])} | {fmt(c['announce'])} "
            f"| {fmt(s['postgres_cpu_ms_per_batch'])} | {fmt(w['claim'])} | {fmt(w['write'])} "
            f"| {fmt(w['announce'])} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main_json(run)
