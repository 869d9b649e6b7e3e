"""The work on jobs: ``Loading`` (the loader stage) claims a message's jobs in SQL and
has the runtime's ``Loader`` load their images, off the batch slots; ``process`` runs
one batch's forward pass per model and writes the outcomes.

Every SQL write is a conditional status transition, so running the same batch
twice (a redelivered message) leaves the first outcome, charge and refund as
they were.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from shared import batches, dispatch, jobs, logs, webhook_events
from shared.errors import ServiceError
from shared.events import publish_done
from shared.jobs import JobRow
from shared.metrics import MetricsBuffer
from worker.batching import RETRY_BATCH
from worker.loader import BULK, INTERACTIVE, ImageResult, ImageTask, LoadCanceled, load_all
from worker.runtime import Runtime

log = logging.getLogger(__name__)

WRITE_ATTEMPTS = 8
#: Thread CPU of each bookkeeping step (claim, write, announce), a counter by step.
BOOKKEEPING = "bookkeeping_cpu_seconds"
WRITE_BACKOFF_S = (0.5, 1, 2, 4, 8, 15, 30)


@dataclass
class JobOutcome:
    """What happened to one job in this batch."""

    job: JobRow  # as the claim wrote it (shared.jobs.claim)
    array: np.ndarray | None = None
    predictions: list[dict[str, Any]] | None = None
    error: ServiceError | None = None


@dataclass
class Loaded:
    """A message's jobs, claimed, each with its input array or its error."""

    outcomes: list[JobOutcome]
    stats: MetricsBuffer
    #: The claim could not be written (the database stayed down): give the message back.
    requeue: bool = False


#: Threads that claim arriving messages' jobs; images load on the runtime's loader
#: meanwhile, so a slow host holds none of these. Messages of ``first_queues`` (single
#: jobs) have threads of their own: a bulk claim may retry for a minute while the
#: database is down, and four of them would hold every thread.
CLAIM_THREADS = 4
FIRST_CLAIM_THREADS = 2
#: Most job ids one claim statement takes from the messages waiting for it.
CLAIM_MAX_IDS = 64
Done = Callable[[Loaded | None, BaseException | None], None]
_Waiting = tuple[list[str], Done]


class _ClaimLine:
    """Messages waiting for a claim thread, which takes all of them at once.

    One UPDATE claims every message that arrived while the previous claim ran (up to
    ``CLAIM_MAX_IDS`` job ids): under a stream of single jobs a claim per message cost
    the worker ~0.6 CPU ms each, one for 32 ids ~1.4 ms in all (bench.bookkeeping).
    """

    def __init__(self) -> None:
        self._waiting: deque[_Waiting] = deque()
        self._stopped = False
        self._changed = threading.Condition()

    def put(self, item: _Waiting) -> None:
        with self._changed:
            if self._stopped:
                raise RuntimeError("the claim threads have stopped")
            self._waiting.append(item)
            self._changed.notify()  # one idle thread takes it, and whatever follows

    def take(self) -> list[_Waiting] | None:
        """What waits, up to CLAIM_MAX_IDS ids (at least one message); None once stopped."""
        with self._changed:
            while not self._waiting and not self._stopped:
                self._changed.wait()
            if self._stopped:
                return None
            taken = [self._waiting.popleft()]
            ids = len(taken[0][0])
            while self._waiting and ids + len(self._waiting[0][0]) <= CLAIM_MAX_IDS:
                item = self._waiting.popleft()
                taken.append(item)
                ids += len(item[0])
            return taken

    def stop(self) -> None:
        """Take no more; what waits is dropped (its messages go back to the broker)."""
        with self._changed:
            self._stopped = True
            self._waiting.clear()
            self._changed.notify_all()


class Loading:
    """The loader stage of ``worker.batching.ContinuousBatches``.

    ``submit(job_ids, done, first)``: a message's jobs are claimed on a claim thread
    (``first``: on one of the threads kept for ``first_queues`` messages), together
    with those of the messages that wait beside it, then its images go to the runtime's
    loader; ``done(loaded, error)`` is called once every image is in, from a loader's
    thread (never from the caller's), and called whatever fails on the way. A message
    whose claim had not started when ``close`` came gets ``LoadCanceled``; the others
    finish. ``stop`` ends the threads, once the pool has drained (worker_shutdown); a
    ``submit`` after it raises RuntimeError.
    """

    def __init__(
        self,
        rt: Runtime,
        claim_threads: int = CLAIM_THREADS,
        first_claim_threads: int = FIRST_CLAIM_THREADS,
    ) -> None:
        self._rt = rt
        self._lines = {False: _ClaimLine(), True: _ClaimLine()}
        self._closed = False
        for first, count, name in (
            (False, claim_threads, "claim"),
            (True, first_claim_threads, "claim-first"),
        ):
            for i in range(count):
                threading.Thread(
                    target=self._serve, args=(self._lines[first],), name=f"{name}-{i}", daemon=True
                ).start()

    def submit(self, job_ids: list[str], done: Done, first: bool = False) -> None:
        self._lines[first].put((job_ids, done))

    def close(self) -> None:
        """Start no more claims. Only a flag: this runs in celery's signal handler on the
        consumer's thread, which may be inside ``submit`` holding a line's lock."""
        self._closed = True

    def stop(self) -> None:
        """End the claim threads (worker_shutdown: no batch waits for a load any more)."""
        self._closed = True
        for line in self._lines.values():
            line.stop()

    def _serve(self, line: _ClaimLine) -> None:
        while (taken := line.take()) is not None:
            self._start(taken)

    def _start(self, taken: list[_Waiting]) -> None:
        try:
            if self._closed:
                raise LoadCanceled()
            claimed = claim_messages(self._rt, [job_ids for job_ids, _ in taken])
        except Exception as exc:
            for _, done in taken:
                _hand_over(done, None, exc)
            return
        for (_, done), (loaded, groups) in zip(taken, claimed, strict=True):
            self._load_images(loaded, groups, done)

    def _load_images(self, loaded: Loaded, groups: list[list[JobOutcome]], done: Done) -> None:
        try:
            futures = [self._rt.loader.submit(image_task(self._rt, g)) for g in groups]
        except Exception as exc:
            _hand_over(done, None, exc)
            return

        def finish(futures: list[Future]) -> None:
            # On a future's callback thread, whose errors concurrent.futures only logs:
            # one here must still reach ``done``, or the message stays LOADING for ever.
            try:
                take_images(self._rt, loaded, groups, [f.result() for f in futures])
            except Exception as exc:
                _hand_over(done, None, exc)
                return
            _hand_over(done, loaded, None)

        _when_all(futures, finish)


def _when_all(futures: list[Future], then: Callable[[list[Future]], None]) -> None:
    """``then(futures)`` once every future is done, on the thread that ends the last."""
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            then(futures)

    if not futures:
        then([])
    for future in futures:
        future.add_done_callback(one_done)


def _hand_over(done: Done, loaded: Loaded | None, error: BaseException | None) -> None:
    try:
        done(loaded, error)
    except Exception:  # a pool's thread would swallow it: say so
        log.exception("handing over a loaded message failed")


def load(rt: Runtime, job_ids: list[str]) -> Loaded:
    """Claim the jobs and load their images, waiting here (a batch that loads its own)."""
    loaded, groups = claim_message(rt, job_ids)
    take_images(rt, loaded, groups, load_inputs(rt, groups))
    return loaded


def load_inputs(rt: Runtime, groups: list[list[JobOutcome]]) -> list[ImageResult]:
    """Each group's image from the runtime's loader (bench.pipeline times this stage)."""
    return load_all(rt.loader, [image_task(rt, g) for g in groups])


def claim_message(rt: Runtime, job_ids: list[str]) -> tuple[Loaded, list[list[JobOutcome]]]:
    """Claim the jobs; the outcomes that need an image, one group per source."""
    return claim_messages(rt, [job_ids])[0]


def claim_messages(
    rt: Runtime, messages: list[list[str]]
) -> list[tuple[Loaded, list[list[JobOutcome]]]]:
    """Claim every message's jobs in one statement; for each message, as
    ``claim_message``. A job in two of them is claimed once and given to both (their
    writes are conditional: the first outcome stays)."""
    stats = [MetricsBuffer() for _ in messages]
    cpu = time.thread_time()
    every = list(dict.fromkeys(j for job_ids in messages for j in job_ids))
    claimed = _with_db_retry(rt, lambda s: claim(s, every, rt.worker_id))
    # The claim's CPU once, on the first message: the batch's counter sums them.
    stats[0].inc(BOOKKEEPING, time.thread_time() - cpu, step="claim")
    if claimed is None:
        return [(Loaded([], st, requeue=True), []) for st in stats]
    rows, started_events = claimed
    webhook_events.dispatch(rt.celery, rt.config, started_events)
    by_id = {row.id: row for row in rows}
    return [
        _grouped(rt, [by_id[j] for j in dict.fromkeys(job_ids) if j in by_id], st)
        for job_ids, st in zip(messages, stats, strict=True)
    ]


def _grouped(
    rt: Runtime, rows: list[JobRow], stats: MetricsBuffer
) -> tuple[Loaded, list[list[JobOutcome]]]:
    outcomes = [JobOutcome(row) for row in rows]
    _give_up_on_retried(rt, outcomes)
    by_source: dict[str, list[JobOutcome]] = defaultdict(list)
    for o in outcomes:
        if o.error is None:
            # The same URL twice in one message is fetched and decoded once.
            by_source[o.job.input_url or f"upload:{o.job.id}"].append(o)
    return Loaded(outcomes, stats), list(by_source.values())


def image_task(rt: Runtime, group: list[JobOutcome]) -> ImageTask:
    job = group[0].job
    sizes = tuple(dict.fromkeys(rt.models.get(o.job.model).input_size for o in group))
    upload_id = None if job.input_url else job.id
    # A job of no bulk batch is interactive: its image goes before bulk ones.
    priority = INTERACTIVE if all(o.job.batch_id is None for o in group) else BULK
    return ImageTask(job.input_url, upload_id, sizes, priority)


def take_images(
    rt: Runtime, loaded: Loaded, groups: list[list[JobOutcome]], results: list[ImageResult]
) -> None:
    """Each group's arrays (shared by its jobs of one input size) or its error."""
    for group, result in zip(groups, results, strict=True):
        if result.fetch_s is not None:
            loaded.stats.observe("image_fetch_seconds", result.fetch_s)
        error = result.error
        if error is not None:
            if result.expected:
                loaded.stats.inc("image_fetch_failures", code=error.code)
            for o in group:
                o.error = error
            continue
        arrays = result.arrays or {}
        for o in group:
            o.array = arrays[rt.models.get(o.job.model).input_size]


def process(
    rt: Runtime,
    job_ids: list[str],
    loaded: list[Loaded] | None = None,
    forward_done: Callable[[], None] | None = None,
) -> str | None:
    """Run a batch: its loaded messages, or (no loader stage) load ``job_ids`` here first.
    ``forward_done()`` is called once its forward pass is over, before the write.

    Returns RETRY_BATCH when results could not be written.
    """
    if loaded is None:
        loaded = [load(rt, job_ids)]
    if any(part.requeue for part in loaded):
        return RETRY_BATCH
    outcomes = _unique(loaded)
    stats = MetricsBuffer()
    for part in loaded:
        stats.merge(part.stats)
    if not outcomes:
        return None
    predict(rt, [o for o in outcomes if o.error is None], stats)
    if forward_done is not None:
        forward_done()  # the next batch takes the model while this one writes
    cpu = time.thread_time()
    written = _with_db_retry(rt, lambda s: write(s, outcomes))
    stats.inc(BOOKKEEPING, time.thread_time() - cpu, step="write")
    if written is None:
        return RETRY_BATCH
    for o in outcomes:
        stats.inc("jobs_finished", status="failed" if o.error else "succeeded")
    # After the write: the outcomes are committed and announced from here on.
    if any(o.job.batch_id for o in outcomes):
        # In the background: the slot this batch frees takes the chunk already waiting
        # at once, and the refill (SQL and Redis round trips) sends the next one
        # meanwhile; on the batch's own path it cost the worker about 5 % of its rate.
        rt.io_pool.submit(dispatch.refill, rt.sessions, rt.redis, rt.celery, rt.config)
    announce(rt, outcomes, written, stats)
    return None


def _unique(loaded: list[Loaded]) -> list[JobOutcome]:
    # Two messages may carry the same job (a redelivery): one outcome per job.
    by_id: dict[str, JobOutcome] = {}
    for part in loaded:
        for o in part.outcomes:
            by_id.setdefault(o.job.id, o)
    return list(by_id.values())


def claim(
    session: Session, job_ids: list[str], worker_id: str | None
) -> tuple[list[JobRow], list[str]]:
    """Claim the message's active jobs (shared.jobs.claim) and record job.started events.

    Jobs without a webhook (nearly all) are claimed by one UPDATE, on PostgreSQL in
    autocommit on the driver: one round trip, no BEGIN or COMMIT (``jobs.claim_alone``).
    Whatever that left (jobs with a webhook, whose job.started event must commit with
    their claim, and final or unknown jobs) is claimed in a transaction of its own with
    its events.
    """
    # Commits without waiting for the disk (PostgreSQL): a claim lost in a crash leaves
    # the job as it was, its message unacknowledged (docs/reliability.md).
    rows = jobs.claim_alone(session, job_ids, worker_id)
    session.commit()
    taken = {r.id for r in rows}
    rest = [j for j in dict.fromkeys(job_ids) if j not in taken]
    if not rest:
        return rows, []
    hooked = jobs.claim(session, rest, worker_id)
    # job.started is sent on the first delivery only, not again on a redelivery.
    events = [
        jobs.record_webhook(session, j, webhook_events.STARTED, as_written=j)
        for j in hooked
        if j.attempts == 1
    ]
    session.commit()
    return rows + hooked, [e for e in events if e]


def _give_up_on_retried(rt: Runtime, outcomes: list[JobOutcome]) -> None:
    # A job that keeps killing or stalling its worker must end, not loop forever.
    for o in outcomes:
        if o.job.attempts > rt.config.job_max_attempts:
            o.error = ServiceError(
                f"The job failed {rt.config.job_max_attempts} times in the worker.",
                code="internal_error",
            )


def predict(rt: Runtime, outcomes: list[JobOutcome], stats: MetricsBuffer) -> None:
    by_model: dict[str, list[JobOutcome]] = defaultdict(list)
    for o in outcomes:
        by_model[o.job.model].append(o)
    for name, group in by_model.items():
        try:
            model = rt.models.get(name)
            # Jobs with the same source share one array (see take_images): classify it once.
            unique = list({id(o.array): o.array for o in group}.values())
            inputs = np.stack(cast(list[np.ndarray], unique))  # predict() gets loaded ones
            with rt.forward_lock:
                start = time.perf_counter()
                probs = model.predict_batch(inputs)
                elapsed = time.perf_counter() - start
            stats.observe("model_forward_seconds", elapsed, model=name)
            stats.observe("batch_size", len(unique))
            row_of = {id(a): row for a, row in zip(unique, probs, strict=True)}
            for o in group:
                o.predictions = rt.top_k(row_of[id(o.array)], o.job.top_k, model.labels)
        except Exception as exc:
            log.exception("forward pass of %d job(s) on %s failed", len(group), name)
            for o in group:
                o.error = ServiceError(f"The model failed: {type(exc).__name__}")
        finally:
            for o in group:
                o.array = None


@dataclass
class Written:
    """What a batch's write committed: the webhook events it recorded (ids), and the
    finished single jobs as answers show them (by id), for their waiters."""

    events: list[str]
    bodies: dict[str, dict[str, Any]]


def write(session: Session, outcomes: list[JobOutcome]) -> Written:
    """All outcomes in one transaction.

    A batch of successes only, none with a webhook or a bulk batch (the common small
    batch), is one UPDATE: on PostgreSQL in autocommit on the driver, one round trip. If
    none of its jobs is an upload either, it commits without waiting for the disk: such a
    result lost in a PostgreSQL crash is computed again, with nothing else to undo (no
    refund, event or batch count; an upload's bytes are gone once announced)
    (docs/reliability.md).
    """
    batch_ids = [o.job.batch_id for o in outcomes if o.job.batch_id]
    alone = not batch_ids and all(o.error is None and not o.job.webhook_url for o in outcomes)
    events = []
    succeeded, bodies = _mark_succeeded(session, outcomes, alone)
    for o in outcomes:
        if o.error is None:
            won = o.job.id in succeeded
        else:
            # Input errors and our own failures alike give the token back.
            won = jobs.mark_failed(session, o.job, o.error.code, o.error.message, refund=True)
        if won:
            events.append(jobs.record_webhook(session, o.job, webhook_events.COMPLETED))
            _log_outcome(o)
    events += batches.complete_finished(session, batch_ids)
    session.commit()
    return Written([e for e in events if e], bodies)


def _mark_succeeded(
    session: Session, outcomes: list[JobOutcome], alone: bool
) -> tuple[set[str], dict[str, dict[str, Any]]]:
    """The successes' write: the ids that won, and the single jobs' answers. A batch with
    a single job in it has its rows returned whole, so that a request waiting on one
    answers from its notification without reading SQL (about 0.9 CPU ms there, against
    about 0.1 here); bulk lines are not waited on that way, and return only their ids."""
    results = {o.job.id: {"predictions": o.predictions} for o in outcomes if o.error is None}
    commit_async = alone and all(o.job.input_url for o in outcomes)
    if all(o.job.batch_id for o in outcomes if o.error is None):
        return jobs.mark_all_succeeded(session, results, commit_async, alone), {}
    rows = jobs.mark_all_succeeded_rows(session, results, commit_async, alone)
    bodies = {i: jobs.job_to_dict(row) for i, row in rows.items() if row.batch_id is None}
    return set(rows), bodies


def _log_outcome(o: JobOutcome) -> None:
    token = logs.request_id.set(o.job.request_id)
    try:
        if o.error is None:
            log.info("job %s succeeded", o.job.id, extra={"job_id": o.job.id})
        else:
            log.info("job %s failed: %s", o.job.id, o.error.code, extra={"job_id": o.job.id})
    finally:
        logs.request_id.reset(token)


def announce(
    rt: Runtime, outcomes: list[JobOutcome], written: Written, stats: MetricsBuffer
) -> None:
    cpu = time.thread_time()
    ids = [o.job.id for o in outcomes]
    webhook_events.dispatch(rt.celery, rt.config, written.events)
    try:
        publish_done(rt.redis, rt.config, ids, written.bodies)
        rt.uploads.delete(*[o.job.id for o in outcomes if o.job.input_url is None])
    except Exception as exc:  # waiters re-check SQL; uploads expire by TTL
        log.warning("could not announce %d finished job(s): %r", len(ids), exc)
    stats.inc(BOOKKEEPING, time.thread_time() - cpu, step="announce")
    rt.metrics.merge(stats)  # sent by the runtime's flush thread (shared/metrics.py)


def _with_db_retry(rt: Runtime, work):
    """Run ``work(session)`` in a fresh session, retrying while the database is unreachable."""
    for attempt in range(WRITE_ATTEMPTS):
        session = rt.sessions()
        try:
            return work(session)
        except DBAPIError as exc:
            session.rollback()
            if attempt == WRITE_ATTEMPTS - 1:
                log.error("database unavailable, giving the batch back: %r", exc)
                return None
            log.warning("database error (attempt %d), retrying: %r", attempt + 1, exc)
            time.sleep(WRITE_BACKOFF_S[attempt])
        finally:
            session.close()
    return None
