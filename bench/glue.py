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

So what its processes spend per image (the API under the API's gunicorn.conf.py, the
Celery worker with a threads pool of WORKER_CONCURRENCY, PostgreSQL, Redis) is what
Flask, gunicorn, Celery, SQLAlchemy, PostgreSQL and Redis cost for these steps on this
machine, used as plainly as a competent engineer writing their own glue would: a floor
for the service's bookkeeping with wait. ``bench.bookkeeping`` runs it beside the
service's scenarios on the same stack::

    gunicorn -c gunicorn.conf.py bench.glue:api
    celery -A bench.glue:celery worker -P threads -Q <QUEUE_PREFIX>.glue
"""

from __future__ import annotations

import functools
import json
import threading
import uuid
from typing import Any

import redis
from celery import Celery
from flask import Flask, request
from sqlalchemy import Engine, create_engine, text

from harness import processes
from shared.config import Config


def glue_queue(config: Config) -> str:
    """The queue the glue's API sends to and its worker consumes."""
    return f"{config.queue_prefix}.glue"


_CONFIG = Config.from_env()
QUEUE = glue_queue(_CONFIG)
TASK = "glue.classify"
DONE_CHANNEL = f"{_CONFIG.queue_prefix}:glue:done"
WAIT_S = 60
#: What every job "predicts" (the null model's top 5 has the same shape).
RESULT = {"predictions": [{"label": f"class {i}", "score": 0.2 - i / 100} for i in range(5)]}
STORED_RESULT = json.dumps(RESULT)

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS glue_users (id serial PRIMARY KEY, api_key text UNIQUE "
    "NOT NULL, tokens integer NOT NULL)",
    "CREATE TABLE IF NOT EXISTS glue_jobs (id uuid PRIMARY KEY, user_id integer NOT NULL "
    "REFERENCES glue_users (id), status text NOT NULL, input_url text NOT NULL, result "
    "jsonb, created_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz)",
)
CHARGE_AND_INSERT = text(
    "WITH charged AS (UPDATE glue_users SET tokens = tokens - 1 WHERE id = :user_id "
    "AND tokens > 0 RETURNING id) INSERT INTO glue_jobs (id, user_id, status, input_url) "
    "SELECT :id, id, 'queued', :url FROM charged RETURNING id"
)
USER_BY_KEY = text("SELECT id FROM glue_users WHERE api_key = :key")
CLAIM = text(
    "UPDATE glue_jobs SET status = 'running' WHERE id = :id AND status = 'queued' "
    "RETURNING input_url"
)
WRITE = text(
    "UPDATE glue_jobs SET status = 'succeeded', result = :result, completed_at = now() "
    "WHERE id = :id AND status = 'running'"
)


@functools.cache
def _engine() -> Engine:
    # Built in each process on first use (gunicorn forks before any request).
    return create_engine(
        _CONFIG.database_url, pool_size=10, max_overflow=20, isolation_level="AUTOCOMMIT"
    )


@functools.cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(_CONFIG.redis_url)


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


api = Flask(__name__)


@api.get("/healthz")
def healthz():
    return {"status": "ok"}


@api.post("/v1/jobs")
def create_job():
    user_id = _user_id(request.headers.get("X-API-Key"))
    if user_id is None:
        return {"error": {"code": "unauthorized"}}, 401
    url = (request.get_json(silent=True) or {}).get("url")
    if not isinstance(url, str):
        return {"error": {"code": "validation_error"}}, 400
    job_id = str(uuid.uuid4())
    listener = _listener()
    slot = listener.expect(job_id)  # before the send: the answer cannot come first
    try:
        with _engine().connect() as conn:
            charged = conn.execute(
                CHARGE_AND_INSERT, {"user_id": user_id, "id": job_id, "url": url}
            ).first()
        if charged is None:
            return {"error": {"code": "insufficient_tokens"}}, 402
        celery.send_task(TASK, args=[job_id], queue=QUEUE, ignore_result=True)
        if not slot[0].wait(WAIT_S):
            return {"id": job_id, "status": "queued"}, 202
    finally:
        listener.forget(job_id)
    return api.response_class(slot[1], status=200, mimetype="application/json")


# --- the worker ----------------------------------------------------------------------

celery = Celery("glue", broker=_CONFIG.effective_broker_url, set_as_current=False)
celery.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_default_queue=QUEUE,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
)


@celery.task(name=TASK)
def classify(job_id: str) -> None:
    with _engine().connect() as conn:
        if conn.execute(CLAIM, {"id": job_id}).first() is None:
            return  # already claimed (a redelivery)
        conn.execute(WRITE, {"id": job_id, "result": STORED_RESULT})
    body = json.dumps({"id": job_id, "status": "succeeded", "result": RESULT})
    _redis().publish(DONE_CHANNEL, f"{job_id}\n{body}")


# --- the driver (bench.bookkeeping) ---------------------------------------------------


class GlueWorker(processes.WorkerProcess):
    """``celery -A bench.glue:celery worker`` with a threads pool, as the service's."""

    app_module = "bench.glue:celery"

    def pool_args(self) -> list[str]:
        return [
            "-P", "threads", "-c", str(self.config.worker_concurrency),
            "-Q", glue_queue(self.config),
        ]  # fmt: skip


def create_users(database_url: str, count: int, tokens: int) -> list[dict[str, str]]:
    """The tables, and ``count`` funded users; their request headers."""
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    keys = [uuid.uuid4().hex for _ in range(count)]
    try:
        with engine.connect() as conn:
            for statement in SCHEMA:
                conn.execute(text(statement))
            for key in keys:
                conn.execute(
                    text("INSERT INTO glue_users (api_key, tokens) VALUES (:key, :tokens)"),
                    {"key": key, "tokens": tokens},
                )
    finally:
        engine.dispose()
    return [{"X-API-Key": key} for key in keys]
