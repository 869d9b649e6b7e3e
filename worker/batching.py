"""Continuous batching on top of celery-batches.

Stock ``celery_batches.Batches`` flushes its buffer on a message count or a
timer. Under load that lines up many small batches behind a busy pool process
(docs/architecture.md, the batching policy). ``ContinuousBatches`` instead
dispatches a batch only when a pool slot is free (with a loader, also only once the
batch in flight is past its forward pass: the model is free), and that batch is
everything ready so far, up to ``batch_max`` job ids. While every slot is busy, arriving jobs
accumulate into the next batch; when a slot is free, a lone job is dispatched
at once (or, with ``batch_wait`` > 0, waits at most that long for company).
The batch size thus follows the load, with no fixed wait: one job at a time
when traffic is light, full batches under load.

Each delivered message is a ``Message`` that this class owns from arrival until it is
acked or requeued; its ``state`` is the per-message state machine of
docs/architecture.md ("The loading stage"):

    ARRIVED ──(room to load)──> LOADING ──> LOADED ──(slot, model free)──> IN_BATCH
       ^                          │                                           │
       └──(close came first)──────┤                                    acked, or requeued
                                  └──(claim not written, or a bug)──> requeued

With a ``loader`` (the threads pool), a message starts ``LOADING`` as it arrives
(its jobs claimed, its images fetched, decoded and resized outside the slots), and
joins a batch only once ``LOADED``: a slow image host never holds a slot. The
loaded results go to the task explicitly, as its second argument. Without a loader
(prefork, solo) a message is ``LOADED`` on arrival and its batch loads it inside
the slot. Two slots share one model: one batch writes while the other predicts.

Acknowledgement follows the batch's outcome: ``run`` returns ``RETRY_BATCH`` when
its results could not be written and the messages are requeued; a pool process
that dies mid-batch (WorkerLostError) requeues its messages at once. The messages
held (every state) are what the heartbeat renews on a Redis broker
(``worker.liveness``).

From celery-batches this uses the task base class, ``SimpleRequest`` and
``apply_batches_task``; its buffer, timer and private attributes are not used.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from celery import signals
from celery.utils.imports import symbol_by_name
from celery.worker.request import create_request_cls
from celery.worker.strategy import hybrid_to_proto2, proto1_to_proto2
from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from worker.loader import LoadCanceled

log = logging.getLogger(__name__)

RETRY_BATCH = "retry"
ARRIVED, LOADING, LOADED, IN_BATCH = "arrived", "loading", "loaded", "in batch"


@dataclass(eq=False)
class Message:
    """A delivered message from arrival until acked or requeued, and what its load gave."""

    request: Any  # celery's Request: acknowledge(), reject(requeue=)
    first: bool  # from one of ``first_queues``: joins batches before the rest
    state: str = ARRIVED
    loaded: Any = None  # the loader's result, handed to the batch
    # Read once: every arrival and dispatch walks the held messages' sizes.
    job_ids: list[str] = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.job_ids = ContinuousBatches.job_ids(self.request)
        self.size = max(1, len(self.job_ids))

    @property
    def tag(self) -> str | None:
        tag = getattr(getattr(self.request, "message", None), "delivery_tag", None)
        return None if tag is None else str(tag)


class ContinuousBatches(Batches):
    abstract = True

    #: Most job ids in one batch (set from BATCH_MAX). A message may carry several ids.
    batch_max: int = 32

    #: Seconds a lone job waits for company while a slot is free (BATCH_WAIT_MS).
    #: 0 dispatches a job the moment it arrives at an idle worker.
    batch_wait: float = 0.0

    #: Period of the dispatch timer: ``batch_wait``, or a safety net when that is 0
    #: (dispatch then happens on arrival, when a load ends and when a batch returns:
    #: every event that can make a batch possible). Each firing is a pass of the
    #: consumer's loop: at 20 a second they cost an idle worker 5 CPU ms a second
    #: (issue #22).
    flush_interval: float = 1.0

    #: Routing keys (queue names) whose messages load and join a batch before any
    #: other: single submissions are not held up by the chunks of a bulk batch that
    #: the worker has already prefetched.
    first_queues: frozenset[str] = frozenset()

    #: Loads each message before it may join a batch (``submit(job_ids, done, first)``,
    #: ``close()``; set at worker start with the threads pool). None: the batch loads
    #: its own inputs, inside its slot.
    loader: Any = None

    #: Most job ids loading, or loaded and waiting for a batch: their arrays are in
    #: memory meanwhile. first_queues messages (one job each, bounded by the
    #: prefetch) are not held back by it, so a slow bulk chunk cannot delay them.
    load_ahead: int = 128

    def __init__(self) -> None:
        super().__init__()
        self.slot_pool: Any = None  # the worker's pool, whose slots run batches
        self._messages: list[Message] = []  # held, in arrival order
        self._in_flight = 0
        # Batches in flight not yet past their forward pass (with a loader only).
        self._before_forward = 0
        self._closed = False
        self._timer: Any = None
        # The consumer's thread, the loader's callbacks, the pool's callbacks and the
        # heartbeat all reach the messages.
        self._lock = threading.RLock()

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:
        # As celery's default strategy builds a Request, without running it.
        self.slot_pool = consumer.pool
        Request = create_request_cls(
            symbol_by_name(task.Request),
            task,
            consumer.pool,
            consumer.hostname,
            consumer.event_dispatcher,
            app=app,
        )

        def on_message(message: Any, body: Any, ack: Any, reject: Any, *_: Any, **__: Any) -> None:
            if body is None and "args" not in message.payload:
                parts = (message.body, message.headers, False, app.uses_utc_timezone())
            elif "args" in message.payload:
                parts = hybrid_to_proto2(message, message.payload)
            else:
                parts = proto1_to_proto2(message, body)
            body, headers, decoded, utc = parts
            request = Request(
                message,
                on_ack=ack,
                on_reject=reject,
                app=app,
                hostname=consumer.hostname,
                eventer=consumer.event_dispatcher,
                task=task,
                body=body,
                headers=headers,
                decoded=decoded,
                utc=utc,
                connection_errors=consumer.connection_errors,
            )
            signals.task_received.send(sender=consumer, request=request)
            self.receive(request)

        self._reconnected(consumer)
        return on_message

    def _reconnected(self, consumer: Any) -> None:
        """A new connection (celery calls ``Strategy`` on each): timer and messages anew.

        Celery clears the event loop's timer after a connection error, which leaves an
        old entry dead: the dispatch timer is registered again here, every time. The
        messages still ARRIVED came on the dead channel and were never claimed: the
        broker delivers them again, so loading them too would claim their jobs twice.
        """
        if self._timer is not None:
            self._timer.cancel()
        self._timer = consumer.timer.call_repeatedly(self.flush_interval, self.dispatch)
        with self._lock:
            dropped = [m for m in self._messages if m.state == ARRIVED]
            self._messages = [m for m in self._messages if m.state != ARRIVED]
        if dropped:
            log.warning(
                "connection lost: %d message(s) not yet loading left to the broker", len(dropped)
            )

    def receive(self, request: Any) -> None:
        """A delivered message arrives: start its load, dispatch (unless batch_wait)."""
        info = getattr(request, "delivery_info", None) or {}
        first = info.get("routing_key") in self.first_queues
        with self._lock:
            self._messages.append(Message(request, first))
            self._admit()
        if self.batch_wait <= 0:
            self.dispatch()

    def held_deliveries(self) -> list[str]:
        """Delivery tags of the messages this worker holds unacknowledged."""
        with self._lock:
            return [m.tag for m in self._messages if m.tag is not None]

    @staticmethod
    def job_ids(request: Any) -> list[str]:
        """The ids a message carries (celery Request and SimpleRequest alike)."""
        return list(request.args[0]) if request.args else []

    def _admit(self) -> None:
        """Start loading the arrived messages that fit (under the lock)."""
        if self.loader is None:
            for m in self._messages:
                if m.state == ARRIVED:
                    m.state = LOADED
            return
        if self._closed:
            return
        arrived = [m for m in self._messages if m.state == ARRIVED]
        if not arrived:  # the common case: each arrival starts loading at once
            return
        ahead = sum(m.size for m in self._messages if m.state in (LOADING, LOADED))
        # first_queues first, then arrival order (a stable sort).
        for m in sorted(arrived, key=lambda m: not m.first):
            if not m.first and ahead and ahead + m.size > self.load_ahead:
                break  # the rest waits for loaded messages to leave in batches
            m.state = LOADING
            try:
                self.loader.submit(
                    m.job_ids, lambda result, error, m=m: self._loaded(m, result, error), m.first
                )
            except RuntimeError as exc:  # the stage stopped: the broker gets it back
                m.state = ARRIVED
                log.warning("loading stopped: %r", exc)
                return
            ahead += m.size

    def _loaded(self, m: Message, result: Any, error: BaseException | None) -> None:
        """A load finished (never on the thread that submitted it)."""
        give_back = error is not None or getattr(result, "requeue", False)
        with self._lock:
            if isinstance(error, LoadCanceled):  # worker shutdown: the broker gets it back
                m.state = ARRIVED
                return
            if not give_back:
                m.state, m.loaded = LOADED, result
        if give_back:
            # The database stayed down through the claim's retries, or a bug: requeue,
            # and let the per-job attempt counter end a message that always fails.
            log.error(
                "loading a message of %d job(s) failed: %r; requeueing",
                m.size,
                error or "claim not written",
            )
            self._finish([m], requeue=True)
        self.dispatch()

    def _take(self) -> list[Message]:
        """Loaded messages up to batch_max job ids (at least one, if any is loaded).

        ``first_queues`` messages first, then the rest in arrival order; what does not
        fit waits for the next batch.
        """
        ready = sorted((m for m in self._messages if m.state == LOADED), key=lambda m: not m.first)
        taken: list[Message] = []
        count = 0
        for m in ready:
            if taken and count + m.size > self.batch_max:
                break
            m.state = IN_BATCH
            taken.append(m)
            count += m.size
        return taken

    def dispatch(self) -> None:
        """Send the next batch to a free slot, if a slot is free and a message loaded."""
        with self._lock:
            self._admit()
            limit = max(1, int(getattr(self.slot_pool, "limit", None) or 1))
            if self._in_flight >= limit:
                return  # a batch in flight dispatches the next one when it returns
            if self._before_forward:
                # The model is taken: this batch would wait for it, and the images that
                # load meanwhile would miss it. It goes when the forward pass ends, with
                # everything loaded by then (batches of waiting clients grew from ~4.6 to ~6.7).
                return
            batch = self._take()
            if not batch:
                return
            self._in_flight += 1
            self._before_forward += self.loader is not None
            self._admit()  # the ids just taken leave room to load more
        try:
            self.flush(batch)
        except RuntimeError as exc:  # the pool stopped (worker shutdown)
            with self._lock:
                self._in_flight -= 1
                self._before_forward -= self.loader is not None
            log.warning("%d message(s) not run: %r; the broker gets them back", len(batch), exc)

    def close(self) -> None:
        """Worker shutdown: start no more loads.

        Loads already running have claimed their jobs: they finish, and ``drain``
        waits until their messages are in batches. What was not loading stays
        unacknowledged, and the broker gives it back (RabbitMQ when the connection
        closes, kombu's Redis channel restores its unacked messages).
        """
        # No lock: this runs in a signal handler, maybe on a thread that holds it
        # halfway through a dispatch; a flag needs none.
        self._closed = True
        if self.loader is not None:
            self.loader.close()

    def drain(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` until no claimed message is still outside a batch, so
        the pool (still running) takes them all before it stops: a clean stop leaves no
        job half-done. Call after ``close``, never from a signal handler."""
        started = time.monotonic()
        if not self._claimed_not_running():
            return
        while self._claimed_not_running() and time.monotonic() < started + wait_s:
            time.sleep(0.05)
        left = sum(m.state in (LOADING, LOADED) for m in list(self._messages))
        log.info(
            "shutdown: waited %.1f s for claimed messages to join a batch; %d left",
            time.monotonic() - started,
            left,
        )

    def _claimed_not_running(self) -> bool:
        # Loading or loaded, their jobs are claimed: the pool must get them before it
        # stops, or they would go back to the broker with their jobs left processing.
        # Waiting here holds the pool's stop back; batches returning dispatch the rest.
        return any(m.state in (LOADING, LOADED) for m in list(self._messages))

    def _finish(self, batch: list[Message], requeue: bool) -> None:
        """Ack or requeue: the messages leave this worker."""
        for m in batch:
            if requeue:
                m.request.reject(requeue=True)
            else:
                m.request.acknowledge()
        gone = {id(m) for m in batch}
        with self._lock:
            self._messages = [m for m in self._messages if id(m) not in gone]

    def flush(self, batch: list[Message]) -> Any:
        """Run ``batch`` in a slot: the task gets its requests and, explicitly, their loads
        and the call that says its forward pass is over (``forward_done``)."""
        requests = [SimpleRequest.from_request(m.request) for m in batch]
        args: tuple = (requests, None)
        forwarding = self.loader is not None  # counted in _before_forward until it ends

        def end_forward() -> None:
            # Once per batch: when the task says so, or at the latest when it returns.
            nonlocal forwarding
            with self._lock:
                if forwarding:
                    forwarding = False
                    self._before_forward -= 1

        def forward_done() -> None:
            """The batch's forward pass is over: the next batch may take the model. Never
            raises into the batch: its results are still to be written (``on_return``
            dispatches again in any case)."""
            end_forward()
            try:
                self.dispatch()
            except Exception:
                log.exception("dispatching the next batch after a forward pass failed")

        if self.loader is not None:
            args = (requests, [m.loaded for m in batch], forward_done)

        # Both reach _finish whatever else fails: a written batch left unacked would
        # run again, and its slot's messages would be held for ever.
        def on_return(result: Any) -> None:
            try:
                end_forward()
                with self._lock:
                    self._in_flight -= 1
                # Dispatch the next batch before the acks: acks are Redis round trips.
                self.dispatch()
            finally:
                self._finish(batch, requeue=result == RETRY_BATCH)

        def on_error(exc_info: Any) -> None:
            try:
                end_forward()
                with self._lock:
                    self._in_flight -= 1
                log.error(
                    "batch of %d message(s) lost its pool process: %r; requeueing",
                    len(batch),
                    getattr(exc_info, "exception", exc_info),
                )
            finally:
                self._finish(batch, requeue=True)
            self.dispatch()

        return self.slot_pool.apply_async(
            apply_batches_task,
            (self, args, 0, None),
            callback=on_return,
            error_callback=on_error,
        )
