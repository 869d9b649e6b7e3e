"""The worker's Celery app: ``celery -A worker.celery_app worker``.

``create_app(config)`` builds it from a Config, as the API's ``create_app`` does, so a
test can build one in-process. Nothing is configured at import: the module's ``app``,
which the celery command loads, is built from the environment on first access.

The models are loaded once per process that runs batches, never at import: with the
threads pool (``WORKER_POOL=threads``, the default) in the worker process itself
before it consumes (``worker_init``); with prefork in each pool process after fork
(``worker_process_init``), never in the parent, which must stay TensorFlow-free to
fork safely.

Celery's signals are process-wide and some carry no app, so the handlers below are
connected once, here, and act for the app whose worker this process runs: the one
``worker_init`` names (a prefork pool process inherits it through the fork).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from celery import Celery, bootsteps, signals
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from shared import logs
from shared.config import Config
from shared.queue import (
    CLASSIFY_TASK,
    RedisTransport,
    classify_queues,
    interactive_queue,
    make_celery,
    service_queue,
    worker_ready_key,
)
from worker import liveness, pipeline, reconciler, retention
from worker.batching import ContinuousBatches
from worker.runtime import Runtime

log = logging.getLogger(__name__)

#: Built from the environment on first access (module ``__getattr__`` below), for the
#: celery command; everything else builds its app with ``create_app``.
app: Celery


@dataclass
class ClassifyWorker:
    """One classification app's settings, and what its worker process holds."""

    config: Config
    app: Celery
    # This worker instance's heartbeat name, which its claims record. Set again in the
    # main process at worker_init, before prefork's pool processes fork and inherit it.
    worker_id: str = field(default_factory=lambda: liveness.new_worker_id(socket.gethostname()))
    stopping: threading.Event = field(default_factory=threading.Event)
    warm_stop: bool = False  # set by the shutdown signal: claimed work drains first
    _runtime: Runtime | None = None
    _runtime_lock: threading.Lock = field(default_factory=threading.Lock)

    def runtime(self) -> Runtime:
        with self._runtime_lock:  # batch threads share one runtime: build it once
            if self._runtime is None:
                self._runtime = Runtime.build(self.config, worker_id=self.worker_id)
        return self._runtime

    def stop_runtime(self) -> None:
        """At shutdown, after the batches: stop the runtime's loader processes and send
        its last metrics; builds no runtime when none was built."""
        with self._runtime_lock:
            rt = self._runtime
        if rt is not None:
            rt.stop_loader_processes()
            rt.close()

    def health(self) -> str | None:
        """What keeps this worker from serving (its loader processes), or None."""
        with self._runtime_lock:
            rt = self._runtime
        return rt.loader.health() if rt is not None else None

    @property
    def task(self) -> ContinuousBatches:
        return self.app.tasks[CLASSIFY_TASK]


_workers: weakref.WeakKeyDictionary[Celery, ClassifyWorker] = weakref.WeakKeyDictionary()
# The app whose worker runs in this process, set at worker_init.
_serving: ClassifyWorker | None = None


def create_app(config: Config) -> Celery:
    """The classification worker's Celery app, configured by ``config``."""
    app = make_celery(config, main="imgclf-worker")
    if app.conf.broker_transport is RedisTransport:
        app.conf.broker_transport = BulkAckTransport
    # Consume the classification queues only; webhooks have a worker of their own.
    app.conf.task_queues = [service_queue(config, name) for name in classify_queues(config)]
    worker = ClassifyWorker(config, app)
    _workers[app] = worker
    app.steps["worker"].add(DrainClaimed)

    # shared=False: else Celery adds the task, with this app's closure, to every app
    # finalized later in the process.
    @app.task(name=CLASSIFY_TASK, base=_task_class(config), shared=False)
    def classify(requests, loaded=None, forward_done=None) -> str | None:
        """Classify the messages' job ids (``loaded``: their loads) as one batch;
        ``forward_done()`` once its forward pass is over (worker.batching)."""
        return _classify(worker, requests, loaded, forward_done)

    return app


#: Takes, after the message that BRPOP returned, up to ARGV[4] more from the lists
#: KEYS[3..] (in that order), and writes each into kombu's unacked hash (KEYS[1]) and
#: index (KEYS[2]) as kombu's QoS.append does: [payload, exchange, routing_key], scored
#: ARGV[1]. The BRPOP'd message (tag ARGV[2], entry ARGV[3]) is written first. Atomic:
#: a message taken here is never out of both the queue and the unacked set. One that
#: is not kombu's JSON goes back where it was, and the taking stops.
_TAKE_MORE = """
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
local taken, want = {}, tonumber(ARGV[4])
for k = 3, #KEYS do
  while #taken < 2 * want do
    local item = redis.call('RPOP', KEYS[k])
    if not item then break end
    local ok, props = pcall(function() return cjson.decode(item)['properties'] end)
    local tag = ok and type(props) == 'table' and props['delivery_tag']
    local info = tag and props['delivery_info']
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      redis.call('RPUSH', KEYS[k], item)
      return taken
    end
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'] or '')
      .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    taken[#taken + 1] = KEYS[k]
    taken[#taken + 1] = item
  end
end
return taken
"""


class _BulkQoS(kombu_redis.QoS):
    """kombu's Redis QoS, with the round trips of one event-loop pass shared.

    Acks: kombu acks a message with a MULTI of ZREM and HDEL on the unacked index and
    hash, one round trip per message on the consumer's thread (celery runs every ack
    there); a batch's acks all arrive in one pass of the loop. Here ``ack`` forgets the
    message at once, as kombu's does, and the loop's tick, before it polls again,
    removes every tag of the pass in one MULTI. An ack lost with the process leaves its
    entry, which the visibility timeout restores, and a redelivered job already written
    is skipped by its claim. Without an event loop, each ack is sent at once.

    Deliveries: kombu takes one message per BRPOP, then writes it into the unacked set
    in a second round trip: two round trips, and a pass of the loop, per message. Here
    the write of the message that BRPOP returned also takes the messages waiting behind
    it, as many as the prefetch window still allows, into the unacked set in the same
    script (``_TAKE_MORE``); the channel delivers them in the same pass
    (``_BulkChannel._brpop_read``). What is held is what kombu would hold after as many
    BRPOPs: every message taken is in the unacked set before it is delivered, comes
    back after the visibility timeout if the process dies, and at close if unacked.
    """

    #: Most messages taken in one round trip besides the BRPOP'd one.
    take_at_most = 32

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._acks: list[str] = []
        self._written: set[str] = set()  # taken by _TAKE_MORE, not yet delivered
        self._take_more: Any = None

    def ack(self, delivery_tag: str) -> None:
        self._acks.append(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)
        if not getattr(self.channel.connection, "acks_on_tick", False):
            self.flush_acks()

    def flush_acks(self) -> None:
        tags, self._acks = self._acks, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # as kombu's ack_log_error: log, the entries come back
            log.warning("could not acknowledge %d message(s): %r", len(tags), exc)

    def restore_unacked_once(self, stderr=None):
        self.flush_acks()  # what was acked is not restored at close
        return super().restore_unacked_once(stderr)

    def append(self, message, delivery_tag) -> None:
        if delivery_tag in self._written:  # taken with the one before: already written
            self._written.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
            return
        channel = self.channel
        keys = channel.take_more_keys() if channel.reading_brpop else None
        want = self._room() - 1
        if not keys or want <= 0:
            super().append(message, delivery_tag)
            return
        taken = self._append_taking(message, delivery_tag, keys, want)
        virtual.QoS.append(self, message, delivery_tag)
        channel.taken.extend(taken)

    def _room(self) -> int:
        room = self.can_consume_max_estimate()
        return self.take_at_most + 1 if room is None else min(room, self.take_at_most + 1)

    def _append_taking(self, message, delivery_tag, keys, want) -> list[tuple[str, dict]]:
        """Write ``message`` into the unacked set, taking up to ``want`` more; returns
        them as (queue, payload)."""
        info = message.delivery_info
        entry = dumps([message._raw, info["exchange"], info["routing_key"]])
        if self._take_more is None:
            self._take_more = self.channel.client.register_script(_TAKE_MORE)
        reply = self._take_more(
            keys=[self.unacked_key, self.unacked_index_key, *keys],
            args=[time.time(), delivery_tag, entry, want],
        )
        taken = []
        for key, raw in zip(reply[::2], reply[1::2], strict=True):
            payload = loads(bytes_to_str(raw))
            self._written.add(payload["properties"]["delivery_tag"])
            taken.append((bytes_to_str(key).rsplit(self.channel.sep, 1)[0], payload))
        return taken


class _BulkChannel(RedisTransport.Channel):  # type: ignore[misc, valid-type]
    QoS = _BulkQoS

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reading_brpop = False
        self.taken: list[tuple[str, dict]] = []  # by _BulkQoS.append, to deliver

    def take_more_keys(self) -> list[str] | None:
        """The lists to take more from: the consumed queues in their declared order
        (the interactive queue first), each by priority as BRPOP reads them; None with
        a global key prefix (kombu prefixes only the first key of a script)."""
        if self.global_keyprefix:
            return None
        return [self._q_for_pri(q, pri) for pri in self.priority_steps for q in self.active_queues]

    def _brpop_read(self, **options):
        self.reading_brpop = True
        try:
            return super()._brpop_read(**options)
        finally:
            self.reading_brpop = False
            self._deliver_taken()

    def _deliver_taken(self) -> None:
        taken, self.taken = self.taken, []
        for i, (queue, payload) in enumerate(taken):
            try:
                self.connection._deliver(payload, queue)
            except BaseException:
                # Not delivered: back to the queue now, not after the visibility timeout.
                for _, rest in taken[i + 1 :]:
                    tag = rest["properties"]["delivery_tag"]
                    self.qos._written.discard(tag)
                    self.qos.restore_by_tag(tag, leftmost=True)
                raise


class BulkAckTransport(RedisTransport):
    """The classification worker's Redis transport: ``_BulkQoS`` (issue #22)."""

    Channel = _BulkChannel
    acks_on_tick = False

    def register_with_event_loop(self, connection, loop) -> None:
        super().register_with_event_loop(connection, loop)
        self.acks_on_tick = True
        loop.on_tick.add(self._flush_acks)  # a set: added once over reconnects

    def _flush_acks(self) -> None:
        channels: list = list(self.channels or ())
        for channel in channels:
            qos = getattr(channel, "_qos", None)
            if isinstance(qos, _BulkQoS):
                qos.flush_acks()


class DrainClaimed(bootsteps.StartStopStep):
    """At a warm stop, before the pool stops: wait (up to WORKER_SHUTDOWN_TIMEOUT_S)
    until every message whose jobs are claimed is in a batch, so the pool drains it.

    Celery closes every step before it stops any, and the pool keeps taking work while
    closed. Not in the shutdown signal's handler: that runs on the consumer's thread
    between two bytecodes, maybe inside ``ContinuousBatches``' lock, and the loads it
    would wait for need that lock to say they are done (a stop once took > 60 s so).
    """

    requires = ("celery.worker.components:Pool",)

    def close(self, parent: object) -> None:
        worker = worker_of(getattr(parent, "app", None))
        if worker is not None and worker.warm_stop:
            worker.task.drain(worker.config.worker_shutdown_timeout_s)


def worker_of(app: Celery | None) -> ClassifyWorker | None:
    """The state of an app that ``create_app`` built (None for any other app)."""
    return _workers.get(app) if app is not None else None


def _task_class(config: Config) -> type[ContinuousBatches]:
    class ClassifyTask(ContinuousBatches):
        batch_max = config.batch_max
        flush_every = config.batch_max
        batch_wait = config.batch_wait_ms / 1000
        first_queues = frozenset({interactive_queue(config)})
        flush_interval = batch_wait or ContinuousBatches.flush_interval
        # The prefetch window's size, in job ids: a few batches' arrays waiting in memory.
        load_ahead = config.effective_prefetch

    return ClassifyTask


def _classify(worker: ClassifyWorker, requests, loaded, forward_done) -> str | None:
    job_ids = list(dict.fromkeys(j for r in requests for j in ContinuousBatches.job_ids(r)))
    try:
        # Loaded by the loader stage (threads pool); None: the batch loads them itself.
        return pipeline.process(worker.runtime(), job_ids, loaded, forward_done)
    except Exception:
        # celery-batches would log this and ack the whole batch; requeue instead, and
        # let the per-job attempt counter end a batch that always fails.
        log.exception("batch of %d job(s) failed; requeueing", len(job_ids))
        return pipeline.RETRY_BATCH


def __getattr__(name: str) -> Celery:
    # Only the celery command (and bench.worker_app) reads the module's app.
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    built = create_app(Config.from_env())
    globals()["app"] = built
    return built


# --- signal handlers --------------------------------------------------------------


@signals.worker_init.connect
def _start_serving(sender=None, **_kwargs) -> None:
    global _serving
    worker = worker_of(getattr(sender, "app", None))
    if worker is None:  # another app's worker in this process
        return
    _serving = worker
    # Celery sets up logging after worker_init, but the models load here: without this
    # the runtime each model got and the "ready" line would never reach the log.
    logs.configure(worker.config.log_level, worker.config.log_format)
    worker.worker_id = liveness.new_worker_id(
        getattr(sender, "hostname", None) or socket.gethostname()
    )
    _check_prefetch(worker, sender)
    if "thread" in _pool_name(worker, sender):
        _load_models_in_threads_pool(worker)


def _check_prefetch(worker: ClassifyWorker, sender) -> None:
    config = worker.config
    concurrency = getattr(sender, "concurrency", None) or config.worker_concurrency
    prefetch = worker.app.conf.worker_prefetch_multiplier * concurrency
    if prefetch < 2 * config.batch_max * concurrency:
        raise SystemExit(
            f"prefetch {prefetch} cannot fill a batch of BATCH_MAX={config.batch_max} while "
            f"another is in flight; set WORKER_PREFETCH >= {2 * config.batch_max * concurrency}"
        )


def _pool_name(worker: ClassifyWorker, sender) -> str:
    pool = getattr(sender, "pool_cls", None) or worker.app.conf.worker_pool
    return pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__name__}"


def _load_models_in_threads_pool(worker: ClassifyWorker) -> None:
    # Before the consumer starts, so no message waits on a model that is still loading.
    try:
        _load_models(worker)
    except Exception as exc:
        # Celery logs and swallows a signal handler's exception; a worker without its
        # models must not start consuming, so leave with a message instead.
        log.exception("could not load the models")
        raise SystemExit(f"worker not started: could not load the models: {exc}") from exc
    # Batches share this process, so images load outside the batch slots (prefork's
    # pool processes, each with its own runtime, still load inside theirs).
    rt = worker.runtime()
    config = worker.config
    if config.effective_loader_processes:  # fetch, decode, resize on every core
        rt.start_loader_processes(config.effective_loader_processes)
    worker.task.loader = pipeline.Loading(rt)


@signals.worker_ready.connect
def _start_threads(sender=None, **_kwargs) -> None:
    worker = worker_of(getattr(sender, "app", None))
    if worker is None:
        return
    config, stop = worker.config, worker.stopping
    # In the main process: pool processes come and go, these threads stay.
    for loop in (
        reconciler.loop(config, stop),
        retention.loop(config, stop),
        liveness.heartbeat(
            config, worker.worker_id, worker.task.held_deliveries, worker.health, stop
        ),
    ):
        if loop is not None:
            loop.start()


@signals.worker_shutting_down.connect
def _stop(how: str = "", **_kwargs) -> None:
    worker = _serving
    if worker is None:
        return
    worker.stopping.set()
    # No new loads. On a warm shutdown those running (their jobs claimed) finish and
    # join a batch: DrainClaimed waits for them, after this handler has returned.
    # What was not loading goes back to the broker.
    worker.warm_stop = how == "Warm"
    worker.task.close()


@signals.worker_shutdown.connect
def _stop_runtime(**_kwargs) -> None:
    # After the pool has drained: no batch waits for an image any more. The claim
    # threads end here, not in _stop: that runs in a signal handler on the consumer's
    # thread, which may hold the executor's lock inside a submit.
    if _serving is None:
        return
    loading = getattr(_serving.task, "loader", None)
    if loading is not None:
        loading.stop()
    _serving.stop_runtime()


@signals.worker_process_shutdown.connect
def _stop_runtime_in_pool_process(**_kwargs) -> None:
    # Prefork: each pool process has its own runtime (threads: this never fires).
    if _serving is not None:
        _serving.stop_runtime()


@signals.worker_process_init.connect
def _load_models_in_pool_process(**_kwargs) -> None:
    if _serving is not None:
        _load_models(_serving)


def _load_models(worker: ClassifyWorker) -> None:
    rt = worker.runtime()
    name = f"{socket.gethostname()}:{os.getpid()}"
    # Tests and operators read this to know a model is loaded and the process serving
    # (/readyz reads the heartbeat instead: shared.queue.heartbeat_key).
    rt.redis.hset(worker_ready_key(worker.config), name, time.time())
    log.info("worker process %s ready with models %s", name, ", ".join(rt.models.names()))


@signals.setup_logging.connect
def _logging(**_kwargs) -> None:
    # Our format (JSON when LOG_FORMAT=json, with request ids) instead of Celery's own.
    if _serving is not None:
        logs.configure(_serving.config.log_level, _serving.config.log_format)
