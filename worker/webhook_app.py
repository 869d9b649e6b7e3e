"""The webhook worker: its own process and queue, so receivers never slow classification.

    celery -A worker.webhook_app worker --pool threads --concurrency 8 -Q <QUEUE_PREFIX>.webhooks

(The app consumes only the webhook queue anyway; ``-Q`` just says so.) A thread
pool fits the work: every delivery waits on a receiver for up to
``WEBHOOK_TIMEOUT_S``, so one slow receiver holds one thread, not the worker.

Two ways in, one delivery function (worker/webhook_delivery.py):

- the ``imgclf.deliver_webhook`` task, sent right after the commit that recorded
  an event: the immediate first attempt;
- the sweep, a loop (``worker.periodic``) started when the worker is ready, which every
  ``SWEEP_INTERVAL_S`` asks SQL for due events and delivers them on its own
  small thread pool. It performs every retry (no Celery countdown/ETA
  messages: on Redis a countdown longer than the visibility timeout is
  redelivered, hence duplicated, and ETA messages hold prefetch slots), and it
  catches events whose enqueue failed, once they are ``SWEEP_PENDING_GRACE_S``
  old, and events whose worker died mid-attempt (expired ``locked_until``).

Several webhook workers may run against the same database: each attempt starts
with a conditional UPDATE, so only one of them gets a given due slot.

``create_app(config)`` builds the app from a Config (tests build one in-process);
the module's ``app``, which the celery command loads, is built from the environment
on first access, never at import.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from celery import Celery, signals

from shared import logs
from shared.config import Config
from shared.queue import (
    DELIVER_WEBHOOK_TASK,
    make_celery,
    service_queue,
    webhook_queue,
    webhook_worker_ready_key,
)
from shared.redis_client import make_redis
from worker import webhook_delivery
from worker.periodic import Periodic
from worker.webhook_delivery import DeliveryRuntime

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
SWEEP_THREADS = 8  # deliveries the sweep runs at once, besides the task pool
SWEEP_PENDING_GRACE_S = 2.0  # a fresh event belongs to its task first
SWEEP_MAX_BACKOFF_S = 8.0  # after failed sweeps in a row (the database away)
DEFAULT_CONCURRENCY = 8  # task threads, unless --concurrency says otherwise
PREFETCH_PER_THREAD = 4

#: Built from the environment on first access (module ``__getattr__`` below), for the
#: celery command; everything else builds its app with ``create_app``.
app: Celery


@dataclass
class WebhookWorker:
    """One webhook app's settings, and what its worker process holds."""

    config: Config
    _runtime: DeliveryRuntime | None = None
    _runtime_lock: threading.Lock = field(default_factory=threading.Lock)
    sweeper: Sweeper | None = None

    def runtime(self) -> DeliveryRuntime:
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = DeliveryRuntime.build(self.config)
            return self._runtime


_workers: weakref.WeakKeyDictionary[Celery, WebhookWorker] = weakref.WeakKeyDictionary()
# The app whose worker runs in this process, set at worker_init.
_serving: WebhookWorker | None = None


def create_app(config: Config) -> Celery:
    """The webhook worker's Celery app, configured by ``config``."""
    app = make_celery(config, main="imgclf-webhooks")
    app.conf.update(
        task_queues=[service_queue(config, webhook_queue(config))],
        task_default_queue=webhook_queue(config),
        worker_concurrency=DEFAULT_CONCURRENCY,
        worker_prefetch_multiplier=PREFETCH_PER_THREAD,
    )
    worker = WebhookWorker(config)
    _workers[app] = worker

    # shared=False: else Celery adds the task, with this app's closure, to every app
    # finalized later in the process.
    @app.task(name=DELIVER_WEBHOOK_TASK, shared=False)
    def deliver_webhook(event_id: str) -> str:
        """One attempt for a freshly recorded event (nothing happens if it is not due)."""
        return webhook_delivery.deliver(worker.runtime(), event_id)

    return app


def worker_of(app: Celery | None) -> WebhookWorker | None:
    """The state of an app that ``create_app`` built (None for any other app)."""
    return _workers.get(app) if app is not None else None


def __getattr__(name: str) -> Celery:
    # Only the celery command reads the module's app.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = create_app(Config.from_env())
    globals()["app"] = built
    return built


class Sweeper:
    """Finds due events in SQL every ``interval_s`` and delivers them on a thread pool."""

    def __init__(
        self,
        rt: DeliveryRuntime,
        interval_s: float = SWEEP_INTERVAL_S,
        threads: int = SWEEP_THREADS,
        pending_grace_s: float = SWEEP_PENDING_GRACE_S,
    ) -> None:
        self.rt = rt
        self.interval_s = interval_s
        self.threads = threads
        self.pending_grace_s = pending_grace_s
        self.stopping = threading.Event()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="webhook-sweep")
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()
        # Every webhook worker sweeps (a conditional UPDATE gives each due slot to one),
        # so no election; a database away for a while backs the sweep off to 8 s.
        self._loop = Periodic(
            "webhook-sweeper",
            interval_s,
            self.sweep_once,
            self.stopping,
            max_backoff_s=SWEEP_MAX_BACKOFF_S,
        )

    def start(self) -> Sweeper:
        log.info("webhook sweep every %g s", self.interval_s)
        self._loop.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def sweep_once(self) -> int:
        """Start deliveries for the due events there is room for; returns how many started."""
        with self._lock:
            busy = set(self._in_flight)
        free = self.threads - len(busy)
        if free <= 0:
            return 0
        due = webhook_delivery.due_event_ids(self.rt, free + len(busy), self.pending_grace_s)
        started = 0
        for event_id in (e for e in due if e not in busy):
            if started == free or self.stopping.is_set():
                break
            with self._lock:
                self._in_flight.add(event_id)
            future = self._pool.submit(webhook_delivery.deliver, self.rt, event_id)
            future.add_done_callback(functools.partial(self._done, event_id))
            started += 1
        return started

    def _done(self, event_id: str, future: Future) -> None:
        with self._lock:
            self._in_flight.discard(event_id)
        if not future.cancelled() and future.exception() is not None:
            log.error("webhook %s: delivery raised", event_id, exc_info=future.exception())


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# --- signal handlers (process-wide: each acts for an app create_app built) -----------


@signals.worker_init.connect
def _start_serving(sender=None, **_kwargs) -> None:
    global _serving
    worker = worker_of(getattr(sender, "app", None))
    if worker is not None:  # else another app's worker in this process
        _serving = worker


@signals.worker_ready.connect
def _start_sweeper(sender=None, **_kwargs) -> None:
    worker = worker_of(getattr(sender, "app", None))
    if worker is None:
        return
    if worker.sweeper is None:
        worker.sweeper = Sweeper(worker.runtime()).start()
    try:  # tests and operators read this to know the worker consumes and sweeps
        make_redis(worker.config).hset(
            webhook_worker_ready_key(worker.config), _worker_name(), time.time()
        )
    except Exception as exc:
        log.warning("could not mark the webhook worker ready in Redis: %r", exc)


@signals.worker_shutting_down.connect
def _stop_sweeping(**_kwargs) -> None:
    # Runs in the signal handler: only raise the flag; deliveries under way finish.
    if _serving is not None and _serving.sweeper is not None:
        _serving.sweeper.stopping.set()


@signals.worker_shutdown.connect
def _stop_sweeper(sender=None, **_kwargs) -> None:
    worker = worker_of(getattr(sender, "app", None))
    if worker is None:
        return
    if worker.sweeper is not None:
        worker.sweeper.stop()
    try:
        make_redis(worker.config).hdel(webhook_worker_ready_key(worker.config), _worker_name())
    except Exception as exc:
        log.warning("could not unmark the webhook worker in Redis: %r", exc)


@signals.setup_logging.connect
def _logging(**_kwargs) -> None:
    # Our format (JSON when LOG_FORMAT=json, with request ids) instead of Celery's own.
    if _serving is not None:
        logs.configure(_serving.config.log_level, _serving.config.log_format)
