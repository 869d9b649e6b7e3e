"""Continuous batching on top of celery-batches.

Stock ``celery_batches.Batches`` flushes its buffer on a message count or a
timer. Under load that lines up many small batches behind a busy pool process
(docs/architecture.md, the batching policy). ``ContinuousBatches`` instead
dispatches a batch only when a pool slot is free, and that batch is everything buffered
so far, up to ``batch_max`` job ids. While every slot is busy, arriving jobs
accumulate into the next batch; when a slot is free, a lone job is dispatched
at once (or, with ``batch_wait`` > 0, waits at most that long for company).
The batch size thus follows the load, with no fixed wait: one job at a time
when traffic is light, full batches under load.

With a ``loader`` (the threads pool, the default), each message's images are
loaded (its jobs claimed, fetched, decoded, resized) by ``worker.loader`` as soon
as it arrives, outside the slots, and a message joins a batch only once its load
is done: a slow image host holds a loader thread, never a slot. Two slots share
one model: one batch writes its results while the other runs the forward pass
(``worker.pipeline`` serialises forward passes with a lock). Without a loader
(prefork, solo) a batch loads its own images inside its slot.

It also fixes two pitfalls of the stock class for this service:
* acknowledgement follows the batch's outcome: ``run`` returns ``RETRY_BATCH`` when
  its results could not be written, and the messages are requeued instead of
  acked;
* a pool process that dies mid-batch (WorkerLostError) requeues its messages
  at once instead of leaving them unacked until the worker restarts.

It also knows which deliveries it holds (buffered, loading or in flight), so the
worker's heartbeat can renew their leases on a Redis broker (``worker.liveness``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.loader import LoadCanceled, Loader, reserved_threads

log = logging.getLogger(__name__)

RETRY_BATCH = "retry"


class ContinuousBatches(Batches):
    abstract = True

    #: Most job ids in one batch (set from BATCH_MAX). A message may carry several ids.
    batch_max: int = 32

    #: Seconds a lone job waits for company while a slot is free (BATCH_WAIT_MS).
    #: 0 dispatches a job the moment it arrives at an idle worker.
    batch_wait: float = 0.0

    #: Period of celery-batches' flush timer: ``batch_wait``, or a safety net when that
    #: is 0 (dispatch then happens on arrival and whenever a batch returns).
    flush_interval: float = 0.05

    #: Messages between count-triggered flush attempts; kept equal to batch_max.
    flush_every: int = 32

    #: Routing keys (queue names) whose buffered requests join a batch before any
    #: other: single submissions are not held up by the chunks of a bulk batch that
    #: the worker has already prefetched.
    first_queues: frozenset[str] = frozenset()

    #: Loads each message before it may join a batch (set at worker start with the
    #: threads pool); its result reaches the task as ``request.loaded``. None: the
    #: batch loads its own inputs, inside its slot.
    loader: Loader | None = None

    #: Most job ids loading, or loaded and waiting for a batch: their arrays are in
    #: memory meanwhile. first_queues messages (one job each, bounded by the
    #: prefetch) are not held back by it, so a slow bulk chunk cannot delay them.
    load_ahead: int = 128

    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0
        self._closed = False
        # Requests taken from celery-batches' buffer and not yet in a batch, in
        # arrival order; those loading, and the results of the finished loads.
        self._waiting: list[Any] = []
        self._loading: set[int] = set()
        self._bulk_loading: set[int] = set()  # those of them not from first_queues
        self._loads: dict[int, Any] = {}
        self._ahead = 0  # job ids loading or loaded, not yet in a batch
        # The consumer's event loop and the threads pool's callbacks both dispatch.
        self._dispatch_lock = threading.RLock()
        # Delivery tags received and not yet acked or requeued; the heartbeat reads it.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:
        handle = super().Strategy(task, app, consumer)

        def on_message(message: Any, *args: Any, **kwargs: Any) -> None:
            self._hold(getattr(message, "delivery_tag", None))
            handle(message, *args, **kwargs)
            if self.batch_wait <= 0:
                self._do_flush()
            else:
                with self._dispatch_lock:
                    self._admit()  # loading starts on arrival; the timer dispatches

        return on_message

    def held_deliveries(self) -> list[str]:
        """Delivery tags of the messages this worker holds unacknowledged."""
        with self._held_lock:
            return list(self._held)

    def _hold(self, tag: Any) -> None:
        if tag is not None:
            with self._held_lock:
                self._held.add(str(tag))

    def _release(self, request: Any) -> None:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            with self._held_lock:
                self._held.discard(str(tag))

    @staticmethod
    def job_ids(request: Any) -> list[str]:
        """The ids a message carries (celery Request and SimpleRequest alike)."""
        return list(request.args[0]) if request.args else []

    def _max_in_flight(self) -> int:
        return max(1, int(getattr(self._pool, "limit", None) or 1))

    def _first(self, request: Any) -> bool:
        info = getattr(request, "delivery_info", None) or {}
        return info.get("routing_key") in self.first_queues

    def _size(self, request: Any) -> int:
        return max(1, len(self.job_ids(request)))

    def _admit(self) -> None:
        """Take arrivals from celery-batches' buffer; start loading those that fit."""
        while not self._buffer.empty():
            self._waiting.append(self._buffer.get_nowait())
        if self.loader is None or self._closed:
            return
        # first_queues first, then arrival order (a stable sort).
        for request in sorted(self._waiting, key=lambda r: not self._first(r)):
            key = id(request)
            if key in self._loading or key in self._loads:
                continue
            size = self._size(request)
            if not self._first(request):
                if self._ahead and self._ahead + size > self.load_ahead:
                    break  # the rest waits for loaded messages to leave in batches
                if len(self._bulk_loading) >= self._bulk_loads():
                    break  # the other loader threads are kept for first_queues messages
                self._bulk_loading.add(key)
            self._loading.add(key)
            self._ahead += size
            self.loader.submit(self.job_ids(request), functools.partial(self._loaded, request))

    def _bulk_loads(self) -> int:
        """Messages not from first_queues that may load at once: a slow host's bulk
        messages hold their loader threads, and a single job must still find one."""
        threads = getattr(self.loader, "threads", None)
        if threads is None:  # a loader that does not say: no limit
            return self.load_ahead
        return max(1, threads - reserved_threads(threads))

    def _loaded(self, request: Any, result: Any, error: BaseException | None) -> None:
        """A load finished (in a loader thread): the request may join a batch now."""
        if isinstance(error, LoadCanceled):  # worker shutdown: the broker gets it back
            with self._dispatch_lock:
                self._loading.discard(id(request))
                self._bulk_loading.discard(id(request))
            return
        give_back = error is not None or getattr(result, "requeue", False)
        with self._dispatch_lock:
            self._loading.discard(id(request))
            self._bulk_loading.discard(id(request))
            if give_back:
                self._waiting.remove(request)
                self._ahead -= self._size(request)
            else:
                self._loads[id(request)] = result
        if give_back:
            # The database stayed down through the claim's retries, or a bug: requeue,
            # and let the per-job attempt counter end a message that always fails.
            log.error(
                "loading a message of %d job(s) failed: %r; requeueing",
                self._size(request),
                error or "claim not written",
            )
            request.reject(requeue=True)
            self._release(request)
        self._do_flush()

    def _take(self) -> list:
        """Ready requests up to batch_max job ids (at least one request, if any is ready).

        A request is ready once loaded (at once without a loader). Requests from
        ``first_queues`` go first, then the rest in arrival order; what does not fit
        waits for the next batch.
        """
        ready = [r for r in self._waiting if self.loader is None or id(r) in self._loads]
        ready.sort(key=lambda r: not self._first(r))  # stable: arrival order kept
        taken, count = [], 0
        for request in ready:
            size = self._size(request)
            if taken and count + size > self.batch_max:
                break
            taken.append(request)
            count += size
        chosen = {id(r) for r in taken}
        self._waiting = [r for r in self._waiting if id(r) not in chosen]
        if self.loader is not None:
            self._ahead -= count
        return taken

    def _do_flush(self) -> None:
        with self._dispatch_lock:
            self._admit()
            if self._in_flight >= self._max_in_flight():
                return  # a batch in flight dispatches the next one when it returns
            requests = self._take()
            if not requests:
                return
            self._in_flight += 1
            loads = [self._loads.pop(id(r), None) for r in requests]
            self._admit()  # the ids just taken leave room to load more
        try:
            self.flush(requests, loads)
        except RuntimeError as exc:  # the pool stopped (worker shutdown)
            self._returned()
            log.warning("%d message(s) not run: %r; the broker gets them back", len(requests), exc)

    def close(self, wait_s: float = 0) -> None:
        """Worker shutdown: start no more loads; wait up to ``wait_s`` for those running.

        A running load has claimed its jobs: it finishes and its message still joins a
        batch while the pool drains, so a clean stop leaves no job half-done. What was
        not loading (buffered, or waiting for a loader thread) stays unacknowledged,
        and the broker gives it back (RabbitMQ when the connection closes, kombu's
        Redis channel restores its unacked messages) to whoever comes next.
        """
        # No lock: this runs in a signal handler, maybe on a thread that holds it
        # halfway through a dispatch; a flag and a poll need none.
        self._closed = True
        if self.loader is None:
            return
        self.loader.close()
        deadline = time.monotonic() + wait_s
        while self._loading and time.monotonic() < deadline:
            time.sleep(0.05)

    def _returned(self) -> None:
        with self._dispatch_lock:
            self._in_flight -= 1

    def flush(self, requests: list, loads: list | None = None) -> Any:
        simple = [SimpleRequest.from_request(r) for r in requests]
        for request, loaded in zip(simple, loads or [], strict=False):
            if loaded is not None:
                request.loaded = loaded  # the threads pool passes it by reference
        payload = (simple,)

        def on_return(result: Any) -> None:
            self._returned()
            # Dispatch the next batch before the acks: acks are Redis round trips.
            self._do_flush()
            for request in requests:
                if result == RETRY_BATCH:
                    request.reject(requeue=True)
                else:
                    request.acknowledge()
                self._release(request)

        def on_error(exc_info: Any) -> None:
            self._returned()
            log.error(
                "batch of %d message(s) lost its pool process: %r; requeueing",
                len(requests),
                getattr(exc_info, "exception", exc_info),
            )
            for request in requests:
                request.reject(requeue=True)
                self._release(request)
            self._do_flush()

        return self._pool.apply_async(
            apply_batches_task,
            (self, payload, 0, None),
            callback=on_return,
            error_callback=on_error,
        )
