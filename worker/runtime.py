"""Everything a worker process holds for its lifetime, built once after fork."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from shared import dispatch
from shared.config import Config
from shared.db import make_engine, make_session_factory, warn_without_autovacuum
from shared.metrics import FLUSH_INTERVAL_S, MetricsBuffer
from shared.pixel_budget import PixelBudget
from shared.queue import make_celery
from shared.redis_client import make_redis
from shared.uploads import UploadStore
from worker.loader import Loader, ThreadLoader
from worker.loader_pool import LoaderProcesses
from worker.models import ModelRegistry, top_k
from worker.periodic import JITTER, Periodic

log = logging.getLogger(__name__)

#: The longest a batch's metrics wait in the runtime before they are sent: one
#: interval of its ``metrics`` loop, jitter included.
METRICS_SENT_WITHIN_S = FLUSH_INTERVAL_S * (1 + JITTER)


@dataclass
class Runtime:
    config: Config
    sessions: sessionmaker[Session]
    redis: redis.Redis
    uploads: UploadStore  # also with loader processes: the worker deletes done uploads
    models: ModelRegistry
    # Runs the bulk refill after a batch, off the slot's path. One thread: refills are
    # serialised cluster-wide by their lock anyway, so more would only wait.
    io_pool: ThreadPoolExecutor
    celery: Celery  # sends webhook deliveries
    # Loads images (worker.loader): this process's threads, or loader processes.
    loader: Loader
    top_k: Callable = top_k
    # The worker instance's heartbeat name, recorded by claims (worker.liveness).
    worker_id: str | None = None
    # Batch threads share the model: one forward pass at a time, each with every core
    # (TensorFlow's own intra-op threads), while the other batch fetches or writes.
    forward_lock: threading.Lock = field(default_factory=threading.Lock)
    # What this process's batches recorded since the last flush: one thread sends it
    # every FLUSH_INTERVAL_S (shared/metrics.py), and ``flush_metrics`` at shutdown.
    metrics: MetricsBuffer = field(default_factory=MetricsBuffer)
    stopping: threading.Event = field(default_factory=threading.Event)

    def flush_metrics(self) -> None:
        self.metrics.flush(self.redis, self.config)

    def start_metrics_loop(self) -> Periodic:
        """Send the batches' metrics every FLUSH_INTERVAL_S until ``close``. Redis away:
        Periodic warns and backs off; what a failed flush held is lost, what the batches
        record meanwhile waits for the next pass."""
        return Periodic("metrics", FLUSH_INTERVAL_S, self.flush_metrics, self.stopping).start()

    def close(self) -> None:
        """At shutdown, after the batches: stop the flush thread and send what is left."""
        self.stopping.set()
        try:
            self.flush_metrics()
        except Exception as exc:  # Redis away: the last second's metrics are lost, no job
            log.warning("could not send the last metrics: %r", exc)

    def start_loader_processes(self, processes: int) -> None:
        """Load images in ``processes`` loader processes, all decoding under one budget."""
        threads, self.loader = self.loader, LoaderProcesses(self.config, processes)
        threads.close()

    def stop_loader_processes(self) -> None:
        """Stop the loader (after the batches stopped waiting for images)."""
        self.loader.close()

    @classmethod
    def build(cls, config: Config, worker_id: str | None = None) -> Runtime:
        configure_accelerators()
        models = ModelRegistry(config)
        models.setup_all()  # loads Keras and the weights: seconds, so once per process
        client = make_redis(config)
        uploads = UploadStore(client, config)
        budget = PixelBudget(
            config.decode_budget_pixels, config.decode_wait_s, waiters=config.fetch_threads
        )
        rt = cls(
            config=config,
            sessions=make_session_factory(make_engine(config)),
            redis=client,
            uploads=uploads,
            models=models,
            io_pool=ThreadPoolExecutor(1, thread_name_prefix="refill"),
            celery=make_celery(config, main="imgclf-worker-sender"),
            loader=ThreadLoader(config, uploads, budget),
            worker_id=worker_id,
        )
        # On the refill thread, ahead of any refill: the first one costs what the others do.
        rt.io_pool.submit(dispatch.warm, rt.sessions, rt.redis, rt.celery, rt.config)
        rt.io_pool.submit(warn_without_autovacuum, rt.sessions)  # a database down: no word
        rt.start_metrics_loop()
        # What start-up built (the model, the imports: most of the process's objects)
        # lives as long as the process. Left to the collector, each full collection walks
        # it again: 60-80 CPU ms with the GIL held, on whichever batch or refill it
        # lands (bench.backlog, issue #26). Frozen, the collector skips it.
        gc.freeze()
        return rt


def configure_accelerators() -> None:
    """GPU memory growth on, so a worker takes what its batches need, not the whole card.

    Run once per worker process before any model loads (after fork). With
    ``KERAS_BACKEND=jax`` there is nothing to do here (XLA's allocator is set
    through its own environment variables). One process per GPU: give each worker
    ``CUDA_VISIBLE_DEVICES`` (docs/deploy.md).
    """
    import keras  # here, not at import time: the parent process must stay TensorFlow-free

    if keras.config.backend() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
