"""The leanest Flask + Celery glue that keeps the service's promise to a waiting client:
a measured floor under bookkeeping per image (issue #22 item 2).

A request charges a token and records its job in one SQL statement, sends the job's id
with Celery, and waits; a Celery task claims the job, writes a fixed result and
publishes it on Redis; the request wakes and answers with it. Nothing else: no
idempotency keys, rate limits, caps on waits, metrics, webhooks, batching, retries or
refunds, and no image (no fetch, decode or forward, which ``RUNTIME=null`` leaves out of
the service's bookkeeping too). Each statement is SQLAlchemy Core in autocommit on
tables with no triggers; each API process has one Redis listener for all its waiters
(redis-py's ``run_in_thread``), and an API key is looked up once per process.

Two more variants add, in steps, what the service must do besides (the rest of what it
adds is left out):

- ``guarded``: the two guards the service owes a waiting submission, taken from the
  service itself: the submission rate limit (api/ratelimit.py, one Redis round trip)
  and the caps on waits (api/waits.py: a script that takes the user's slot, a ZREM that
  gives it back). Without them one user's clients could flood the queue or hold every
  API thread.
- ``batching``: the guards, and the worker takes its jobs in batches, as the service
  must: a celery-batches task (``flush_every`` BATCH_MAX, ``flush_interval``
  FLUSH_INTERVAL_S) that claims a batch in one statement, writes it in one and
  publishes its results in one pipeline. Its timer holds a job up to 5 ms for company,
  where the service dispatches a job that finds its worker idle at once
  (``BATCH_WAIT_MS=0``); with no images to load, its batch is claimed as it runs, where
  the service claims each message before loading its images.
- ``schema``: ``batching`` on the service's own data: its ``users``, ``token_ledger``
  and ``jobs`` tables (their indexes, and the counters' triggers that keep /metrics
  from counting ``jobs``), through the service's own three statements
  (``shared.jobs.insert_charged``, ``claim_alone``, ``mark_all_succeeded_rows``, each
  one round trip on the driver), answering with ``job_to_dict`` of the written row.
  What it costs over ``batching`` is the price of the service's data model; what the
  service costs over it is the service's own code.

So what its processes spend per image (the API under the API's gunicorn.conf.py, the
Celery worker with a threads pool of WORKER_CONCURRENCY, PostgreSQL, Redis) is what
Flask, gunicorn, Celery, SQLAlchemy, PostgreSQL and Redis cost for these steps on this
machine, used as plainly as a competent engineer writing their own glue would: a floor
for the service's bookkeeping with wait. ``bench.bookkeeping`` runs it beside the
service's scenarios on the same stack::

    gunicorn -c gunicorn.conf.py bench.glue:api      # or bench.glue:guarded, :batching
    celery -A bench.glue:celery worker -P threads -Q <QUEUE_PREFIX>.glue
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import uuid
from typing import Any

import redis
from celery import Celery
from celery_batches import Batches
from flask import Flask, Response, request
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from api.ratelimit import Limits
from api.waits import WaitSlots, skipped_headers
from harness import accounts, processes
from shared import jobs
from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.errors import InsufficientTokens, RateLimited


def glue_queue(config: Config) -> str:
    """The queue the glue's API sends to and its worker consumes."""
    return f"{config.queue_prefix}.glue"


def batch_stats_key(config: Config) -> str:
    """A hash of the batching task's counts (fields ``batches`` and ``jobs``), bumped in
    the pipeline that publishes its results: no round trip of its own."""
    return f"{config.queue_prefix}:glue:batches"


_CONFIG = Config.from_env()
QUEUE = glue_queue(_CONFIG)
TASK = "glue.classify"
BATCH_TASK = "glue.classify_batch"
SCHEMA_TASK = "glue.classify_schema"
#: The batching glue's wait for more jobs: a few ms of a waiting client's latency.
FLUSH_INTERVAL_S = 0.005
VARIANTS = ("bare", "guarded", "batching", "schema")
#: The model the ``schema`` variant's jobs name (the service's default).
MODEL = "mobilenet"
DONE_CHANNEL = f"{_CONFIG.queue_prefix}:glue:done"
BATCH_STATS = batch_stats_key(_CONFIG)
WAIT_S = 60
TASKS = {"bare": TASK, "guarded": TASK, "batching": BATCH_TASK, "schema": SCHEMA_TASK}
#: What every job "predicts" (the null model's top 5 has the same shape).
RESULT = {"predictions": [{"label": f"class {i}", "score": 0.2 - i / 100} for i in range(5)]}
STORED_RESULT = json.dumps(RESULT)

SCHEMA = (
    # user_id: the service's user (``schema`` variant), whose tokens are in ``users``.
    "CREATE TABLE IF NOT EXISTS glue_users (id serial PRIMARY KEY, api_key text UNIQUE "
    "NOT NULL, tokens integer NOT NULL, user_id integer)",
    "CREATE TABLE IF NOT EXISTS glue_jobs (id uuid PRIMARY KEY, user_id integer NOT NULL "
    "REFERENCES glue_users (id), status text NOT NULL, input_url text NOT NULL, result "
    "jsonb, created_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)",
)
CHARGE_AND_INSERT = text(
    "WITH charged AS (UPDATE glue_users SET tokens = tokens - 1 WHERE id = :user_id "
    "AND tokens > 0 RETURNING id) INSERT INTO glue_jobs (id, user_id, status, input_url) "
    "SELECT :id, id, 'queued', :url FROM charged RETURNING id"
)
USER_BY_KEY = text("SELECT coalesce(user_id, id) FROM glue_users WHERE api_key = :key")
CLAIM = text(
    "UPDATE glue_jobs SET status = 'running' WHERE id = :id AND status = 'queued' "
    "RETURNING input_url"
)
WRITE = text(
    "UPDATE glue_jobs SET status = 'succeeded', result = :result, completed_at = now() "
    "WHERE id = :id AND status = 'running'"
)
CLAIM_MANY = text(
    "UPDATE glue_jobs SET status = 'running' WHERE id = ANY(CAST(:ids AS uuid[])) "
    "AND status = 'queued' RETURNING id::text"
)
WRITE_MANY = text(
    "UPDATE glue_jobs SET status = 'succeeded', result = :result, completed_at = now() "
    "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'running'"
)


@functools.cache
def _engine() -> Engine:
    # Built in each process on first use (gunicorn forks before any request).
    return create_engine(
        _CONFIG.database_url, pool_size=10, max_overflow=20, isolation_level="AUTOCOMMIT"
    )


@functools.cache
def _sessions() -> sessionmaker[Session]:
    """The service's own engine and sessions (``schema`` variant)."""
    return make_session_factory(make_engine(_CONFIG))


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(_CONFIG.redis_url)


@functools.cache
def _guards() -> tuple[Limits, WaitSlots]:
    return Limits(_CONFIG), WaitSlots(_redis(), _CONFIG)


# --- the API -------------------------------------------------------------------------


class _Listener:
    """One subscription per process; a finished job's message wakes its request."""

    def __init__(self) -> None:
        self._waiting: dict[str, list[Any]] = {}  # job id -> [event, body]
        self._lock = threading.Lock()
        pubsub = _redis().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(**{DONE_CHANNEL: self._done})
        pubsub.run_in_thread(sleep_time=1.0, daemon=True)

    def expect(self, job_id: str) -> list[Any]:
        slot = [threading.Event(), None]
        with self._lock:
            self._waiting[job_id] = slot
        return slot

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._waiting.pop(job_id, None)

    def _done(self, message: dict) -> None:
        job_id, _, body = message["data"].partition(b"\n")
        with self._lock:
            slot = self._waiting.pop(job_id.decode(), None)
        if slot is not None:
            slot[1] = body
            slot[0].set()


_keys: dict[str, int] = {}
_listener_lock = threading.Lock()
_the_listener: _Listener | None = None


def _listener() -> _Listener:
    """The process's listener, made by the first request (after gunicorn's fork)."""
    global _the_listener
    with _listener_lock:
        if _the_listener is None:
            _the_listener = _Listener()
        return _the_listener


def _user_id(key: str | None) -> int | None:
    if key and key not in _keys:
        with _engine().connect() as conn:
            found = conn.execute(USER_BY_KEY, {"key": key}).scalar()
        if found is None:
            return None
        _keys[key] = found
    return _keys.get(key or "")


def _create_job(variant: str):
    guarded = variant != "bare"
    user_id = _user_id(request.headers.get("X-API-Key"))
    if user_id is None:
        return {"error": {"code": "unauthorized"}}, 401
    url = (request.get_json(silent=True) or {}).get("url")
    if not isinstance(url, str):
        return {"error": {"code": "validation_error"}}, 400
    if guarded:
        try:
            _guards()[0].check_submission(user_id)
        except RateLimited as exc:
            return {"error": {"code": exc.code}}, 429, exc.headers
    row = _new_job(variant, user_id, url)
    job_id = row["id"]
    listener = _listener()
    slot = listener.expect(job_id)  # before the send: the answer cannot come first
    try:
        if not _charged(variant, row):
            return {"error": {"code": "insufficient_tokens"}}, 402
        celery.send_task(TASKS[variant], args=[job_id], queue=QUEUE, ignore_result=True)
        with _wait_slot(guarded, user_id) as skipped:
            if skipped:
                return {"id": job_id, "status": "queued"}, 202, skipped_headers(skipped)
            if not slot[0].wait(WAIT_S):
                return {"id": job_id, "status": "queued"}, 202
    finally:
        listener.forget(job_id)
    return Response(slot[1], status=200, mimetype="application/json")


def _new_job(variant: str, user_id: int, url: str) -> dict[str, Any]:
    if variant == "schema":  # the service's row: its id, defaults and created_at
        return jobs.new_row(user_id=user_id, model=MODEL, top_k=5, input_url=url)
    return {"id": str(uuid.uuid4()), "user_id": user_id, "url": url}


def _charged(variant: str, row: dict[str, Any]) -> bool:
    """Charge a token and insert the job, in one statement; False if the balance is short."""
    if variant == "schema":
        with _sessions()() as session:
            try:
                jobs.insert_charged(session, row, alone=True)
            except InsufficientTokens:
                return False
        return True
    with _engine().connect() as conn:
        return conn.execute(CHARGE_AND_INSERT, row).first() is not None


def _wait_slot(guarded: bool, user_id: int):
    if not guarded:
        return contextlib.nullcontext()
    return _guards()[1].hold(user_id, WAIT_S)


def _app(variant: str) -> Flask:
    app = Flask(__name__)
    app.add_url_rule("/healthz", "healthz", lambda: {"status": "ok"})
    app.add_url_rule(
        "/v1/jobs", "create_job", functools.partial(_create_job, variant), methods=["POST"]
    )
    return app


api, guarded, batching, schema = (_app(variant) for variant in VARIANTS)


# --- the worker ----------------------------------------------------------------------

celery = Celery("glue", broker=_CONFIG.effective_broker_url, set_as_current=False)
celery.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_default_queue=QUEUE,
    # Enough messages at hand to fill a batch while another runs (as the service).
    worker_prefetch_multiplier=2 * _CONFIG.batch_max,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@celery.task(name=TASK)
def classify(job_id: str) -> None:
    with _engine().connect() as conn:
        if conn.execute(CLAIM, {"id": job_id}).first() is None:
            return  # already claimed (a redelivery)
        conn.execute(WRITE, {"id": job_id, "result": STORED_RESULT})
    _redis().publish(DONE_CHANNEL, _done_message(job_id))


#: A celery-batches task of the glue: flushed at BATCH_MAX jobs or FLUSH_INTERVAL_S.
_batch_task = functools.partial(
    celery.task,
    base=Batches,
    flush_every=_CONFIG.batch_max,
    flush_interval=FLUSH_INTERVAL_S,
    acks_late=True,
)


@_batch_task(name=BATCH_TASK)
def classify_batch(requests: list) -> None:
    ids = [request.args[0] for request in requests]
    with _engine().connect() as conn:
        claimed = conn.execute(CLAIM_MANY, {"ids": ids}).scalars().all()
        if claimed:  # the others were claimed already (redeliveries)
            conn.execute(WRITE_MANY, {"ids": claimed, "result": STORED_RESULT})
    _announce({job_id: _done_body(job_id) for job_id in claimed})


@_batch_task(name=SCHEMA_TASK)
def classify_schema(requests: list) -> None:
    """``classify_batch`` through the service's own statements on its own tables."""
    ids = [request.args[0] for request in requests]
    with _sessions()() as session:
        claimed = jobs.claim_alone(session, ids, "glue")
        results = {row.id: RESULT for row in claimed}
        rows = jobs.mark_all_succeeded_rows(session, results, commit_async=True, alone=True)
    _announce({job_id: json.dumps(jobs.job_to_dict(row)) for job_id, row in rows.items()})


def _announce(bodies: dict[str, str]) -> None:
    """Publish each finished job's answer, in one pipeline with the batch's count."""
    pipe = _redis().pipeline(transaction=False)
    # Counted before any result is out: a client that has its answer finds it counted.
    pipe.hincrby(BATCH_STATS, "batches", 1).hincrby(BATCH_STATS, "jobs", len(bodies))
    for job_id, body in bodies.items():
        pipe.publish(DONE_CHANNEL, f"{job_id}\n{body}")
    pipe.execute()


def _done_body(job_id: str) -> str:
    return json.dumps({"id": job_id, "status": "succeeded", "result": RESULT})


def _done_message(job_id: str) -> str:
    return f"{job_id}\n{_done_body(job_id)}"


# --- the driver (bench.bookkeeping) ---------------------------------------------------


class GlueWorker(processes.WorkerProcess):
    """``celery -A bench.glue:celery worker`` with a threads pool, as the service's."""

    app_module = "bench.glue:celery"

    def pool_args(self) -> list[str]:
        return [
            "-P", "threads", "-c", str(self.config.worker_concurrency),
            "-Q", glue_queue(self.config),
        ]  # fmt: skip


def create_users(
    database_url: str, count: int, tokens: int, service: bool = False
) -> list[dict[str, str]]:
    """The tables, and ``count`` funded users; their request headers. ``service``: each
    is also a user of the service, funded in its ledger (the ``schema`` variant)."""
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    keys = [uuid.uuid4().hex for _ in range(count)]
    try:
        with engine.connect() as conn:
            for statement in SCHEMA:
                conn.execute(text(statement))
            for key in keys:
                user_id = (
                    accounts.new_account(lambda: Session(engine), tokens, prefix="glue")
                    if service
                    else None
                )
                conn.execute(
                    text(
                        "INSERT INTO glue_users (api_key, tokens, user_id) "
                        "VALUES (:key, :tokens, :user_id)"
                    ),
                    {"key": key, "tokens": 0 if service else tokens, "user_id": user_id},
                )
    finally:
        engine.dispose()
    return [{"X-API-Key": key} for key in keys]
