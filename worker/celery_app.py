"""The worker's Celery app: ``celery -A worker.celery_app worker``.

Built from the same Config as the API. The models are loaded once per process that
runs batches, never at import: with the threads pool (``WORKER_POOL=threads``, the
default) in the worker process itself before it consumes (``worker_init``); with
prefork in each pool process after fork (``worker_process_init``), never in the
parent, which must stay TensorFlow-free to fork safely.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from celery import signals

from shared import logs
from shared.config import Config
from shared.queue import (
    CLASSIFY_TASK,
    classify_queues,
    interactive_queue,
    make_celery,
    service_queue,
)
from shared.redis_client import make_redis
from worker import liveness, pipeline, reconciler, retention
from worker.batching import ContinuousBatches
from worker.loader import Loader
from worker.loader_pool import LoaderProcesses
from worker.runtime import Runtime

log = logging.getLogger(__name__)

config = Config.from_env()
app = make_celery(config, main="imgclf-worker")
# Consume the classification queues only; webhooks have a worker of their own.
app.conf.task_queues = [service_queue(config, name) for name in classify_queues(config)]

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()

# This worker instance's heartbeat name, which its claims record. Set in the main
# process at worker_init, before prefork's pool processes fork and inherit it.
_worker_id = liveness.new_worker_id(socket.gethostname())


def runtime() -> Runtime:
    global _runtime
    with _runtime_lock:  # batch threads share one runtime: build it once
        if _runtime is None:
            _runtime = Runtime.build(config, worker_id=_worker_id)
    return _runtime


class ClassifyTask(ContinuousBatches):
    batch_max = config.batch_max
    flush_every = config.batch_max
    batch_wait = config.batch_wait_ms / 1000
    first_queues = frozenset({interactive_queue(config)})
    flush_interval = batch_wait or ContinuousBatches.flush_interval
    # The prefetch window's size, in job ids: a few batches' arrays waiting in memory.
    load_ahead = config.effective_prefetch


@app.task(name=CLASSIFY_TASK, base=ClassifyTask)
def classify(requests) -> str | None:
    """Classify every job id carried by the buffered messages, as one batch."""
    job_ids = list(dict.fromkeys(j for r in requests for j in ClassifyTask.job_ids(r)))
    # Loaded by the loader stage (threads pool); else the batch loads them itself.
    loaded = [r.loaded for r in requests if hasattr(r, "loaded")]
    try:
        return pipeline.process(
            runtime(), job_ids, loaded if len(loaded) == len(requests) else None
        )
    except Exception:
        # celery-batches would log this and ack the whole batch; requeue instead, and
        # let the per-job attempt counter end a batch that always fails.
        log.exception("batch of %d job(s) failed; requeueing", len(job_ids))
        return pipeline.RETRY_BATCH


def ready_key() -> str:
    return f"{config.queue_prefix}:workers:ready"


@signals.worker_init.connect
def _name_instance(sender=None, **_kwargs) -> None:
    global _worker_id
    _worker_id = liveness.new_worker_id(getattr(sender, "hostname", None) or socket.gethostname())


@signals.worker_init.connect
def _check_prefetch(sender=None, **_kwargs) -> None:
    concurrency = getattr(sender, "concurrency", None) or config.worker_concurrency
    prefetch = app.conf.worker_prefetch_multiplier * concurrency
    if prefetch < 2 * config.batch_max * concurrency:
        raise SystemExit(
            f"prefetch {prefetch} cannot fill a batch of BATCH_MAX={config.batch_max} while "
            f"another is in flight; set WORKER_PREFETCH >= {2 * config.batch_max * concurrency}"
        )


def _pool_name(sender) -> str:
    pool = getattr(sender, "pool_cls", None) or app.conf.worker_pool
    return pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"


@signals.worker_init.connect
def _load_models_in_threads_pool(sender=None, **_kwargs) -> None:
    # Before the consumer starts, so no message waits on a model that is still loading.
    if "thread" not in _pool_name(sender):
        return
    try:
        _load_models()
    except Exception as exc:
        # Celery logs and swallows a signal handler's exception; a worker without its
        # models must not start consuming, so leave with a message instead.
        log.exception("could not load the models")
        raise SystemExit(f"worker not started: could not load the models: {exc}") from exc
    # Batches share this process, so images load outside the batch slots (prefork's
    # pool processes, each with its own runtime, still load inside theirs).
    rt = runtime()
    if config.effective_loader_processes:  # fetch, decode, resize on every core
        sizes = [rt.models.get(name).input_size for name in rt.models.names()]
        rt.loader_processes = LoaderProcesses(config, sizes, config.effective_loader_processes)
    ClassifyTask.loader = Loader(
        lambda job_ids: pipeline.load(rt, job_ids), config.effective_loader_threads
    )


_stop_reconciler = threading.Event()


def _heartbeat(stop: threading.Event, name: str) -> None:
    client = make_redis(config)
    broker = liveness.make_broker_redis(config) if config.broker_is_redis else None
    while True:
        try:
            # Leases first: a message received after this beat is younger than it anyway.
            if broker is not None:
                liveness.renew_leases(broker, classify.held_deliveries())
            liveness.beat(client, config, name)
        except Exception as exc:  # Redis down: /readyz shows the heartbeat ageing
            log.warning("heartbeat not written: %r", exc)
        if stop.wait(config.heartbeat_interval_s):
            return


@signals.worker_ready.connect
def _start_threads(sender=None, **_kwargs) -> None:
    # In the main process: pool processes come and go, these threads stay.
    for target, args in (
        (reconciler.run_forever, (config, _stop_reconciler)),
        (retention.run_forever, (config, _stop_reconciler)),
        (_heartbeat, (_stop_reconciler, _worker_id)),
    ):
        threading.Thread(target=target, args=args, daemon=True, name=target.__name__).start()


@signals.worker_shutting_down.connect
def _stop(how: str = "", **_kwargs) -> None:
    _stop_reconciler.set()
    # No new loads; on a warm shutdown those running (their jobs claimed) finish and
    # join a batch while the pool drains. The rest goes back to the broker.
    classify.close(config.worker_shutdown_timeout_s if how == "Warm" else 0)


@signals.worker_shutdown.connect
def _stop_loader_processes(**_kwargs) -> None:
    # After the pool has drained: no batch waits for an image any more.
    if _runtime is not None and _runtime.loader_processes is not None:
        _runtime.loader_processes.close()


@signals.worker_process_init.connect
def _load_models(**_kwargs) -> None:
    rt = runtime()
    name = f"{socket.gethostname()}:{os.getpid()}"
    # Tests and /readyz read this to know a model is loaded and the process serving.
    rt.redis.hset(ready_key(), name, time.time())
    log.info("worker process %s ready with models %s", name, ", ".join(rt.models.names()))


@signals.setup_logging.connect
def _logging(**_kwargs) -> None:
    # Our format (JSON when LOG_FORMAT=json, with request ids) instead of Celery's own.
    logs.configure(config.log_level, config.log_format)
