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

With the threads pool (the default), two slots share one model: one batch
fetches and decodes its images, or writes its results, while the other runs the
forward pass (``worker.pipeline`` serialises forward passes with a lock).

It also fixes two pitfalls of the stock class for this service:
* acknowledgement follows the batch's outcome: ``run`` returns ``RETRY_BATCH`` when
  its results could not be written, and the messages are requeued instead of
  acked;
* a pool process that dies mid-batch (WorkerLostError) requeues its messages
  at once instead of leaving them unacked until the worker restarts.

It also knows which deliveries it holds (buffered or in flight), so the worker's
heartbeat can renew their leases on a Redis broker (``worker.liveness``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

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

    def __init__(self) -> None:
        super().__init__()
        self._in_flight = 0
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

    def _take(self) -> list:
        """Buffered requests up to batch_max job ids (at least one request).

        Requests from ``first_queues`` go first, then the rest in arrival order; what
        does not fit goes back to the buffer for the next batch.
        """
        buffered = []
        while not self._buffer.empty():
            buffered.append(self._buffer.get_nowait())
        buffered.sort(key=lambda r: not self._first(r))  # stable: arrival order kept
        taken, count = [], 0
        for i, request in enumerate(buffered):
            size = max(1, len(self.job_ids(request)))
            if taken and count + size > self.batch_max:
                for rest in buffered[i:]:
                    self._buffer.put(rest)
                break
            taken.append(request)
            count += size
        return taken

    def _do_flush(self) -> None:
        with self._dispatch_lock:
            if self._in_flight >= self._max_in_flight():
                return  # a batch in flight dispatches the next one when it returns
            requests = self._take()
            if not requests:
                return
            self._in_flight += 1
        self.flush(requests)

    def _returned(self) -> None:
        with self._dispatch_lock:
            self._in_flight -= 1

    def flush(self, requests: list) -> Any:
        payload = ([SimpleRequest.from_request(r) for r in requests],)

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
