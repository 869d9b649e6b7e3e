"""Which bulk jobs go to the broker next: a shallow window, refilled round-robin over users.

A bulk batch's jobs are committed with no message sent (``jobs.dispatched_at`` is
NULL: they wait in SQL). ``refill`` keeps about ``BULK_WINDOW_BATCHES`` x
``BATCH_MAX`` bulk jobs per live worker *out* (sent, not yet final) and fills the
room left one chunk at a time, each time for the user with the fewest jobs out
(ties: the user served least recently, then the one waiting longest). So a user who submits 30
URLs behind another's 10,000 waits for a few batches, not for the 10,000; users
with work waiting share the window evenly; the broker holds a few messages per
worker whatever waits in SQL; and canceling a batch costs nothing for the jobs
never sent (cancel flips them to ``canceled`` in SQL).

A chunk is the message ``api.bulk.chunk`` numbered at submission (a URL's duplicates
together, so the worker fetches and classifies each URL once). Marking is a
conditional UPDATE (``dispatched_at IS NULL``) committed before the send, so a chunk
is sent once however many refills race; a failed send un-marks what it did not send,
for the next refill. A message lost after the send is the reconciler's: a queued job
dispatched longer than ``STALE_QUEUED_S`` ago is re-sent (worker/reconciler.py).

Called after a batch is committed (the API: an idle service starts at once), after a
worker wrote a batch with bulk jobs (the room it freed is filled at once), and on
every reconciler pass (new workers widen the window; anything a failure left behind).
A retried or re-queued bulk job goes back through here too: set it ``queued`` with
``dispatched_at`` NULL, commit, then call ``refill``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from datetime import datetime

import redis
from celery import Celery
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock
from sqlalchemy import Select, func, literal, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Config
from shared.models import BULK_OUT, BULK_WAITING, Batch, Job, as_utc, utcnow
from shared.queue import enqueue_bulk, heartbeats
from shared.status import JobStatus

log = logging.getLogger(__name__)

# Long enough for a refill on a slow database; a holder that died frees it by itself.
LOCK_TTL_S = 10
# Each pass of a refill renews the lock, and on PostgreSQL no statement of a pass may
# run longer than this: a pass never outlives the lock it holds (a refill that did
# once ran beside four others). Were it to, overlapping refills stay harmless: a
# chunk is marked by a conditional UPDATE, so it goes out once (the window may
# overshoot by the racing refills' share). Renewed before the note is taken, so a
# holder that lost the lock leaves the note for the one that has it.
PASS_STATEMENT_TIMEOUT_MS = LOCK_TTL_S * 1000 // 2
# The first chunk of a batch larger than BATCH_MAX holds this many jobs at most
# (api.bulk.chunk numbers them): after a restore, or when many users arrive at once,
# a newcomer waits behind one round of every user never served (see _take), and that
# round then costs FIRST_CHUNK jobs a user rather than BATCH_MAX (100 users: 400 jobs,
# not 3,200; bench.backlog). A batch that fits one chunk stays one: it needs one turn.
FIRST_CHUNK = 4


def _waiting(batch_id: object) -> tuple:
    # The partial index's own condition, as literal SQL: a planner matches it term by
    # term, and a bound parameter ('queued' as $1) would not prove it.
    return (Job.batch_id == batch_id, text(BULK_WAITING))


def refill(
    sessions: sessionmaker[Session], client: redis.Redis, celery: Celery, config: Config
) -> int:
    """Send waiting bulk chunks while the window has room; returns the jobs sent.

    Never raises: whatever it could not send waits in SQL for the next refill (the
    reconciler runs one every ``RECONCILE_INTERVAL_S``).
    """
    try:
        return _refill(sessions, client, celery, config)
    except Exception as exc:
        log.warning("bulk dispatch failed, jobs wait in SQL for the next refill: %r", exc)
        return 0


def _refill(
    sessions: sessionmaker[Session], client: redis.Redis, celery: Celery, config: Config
) -> int:
    """One refill at a time cluster-wide (redis-py's ``Lock``). A caller that finds it
    taken leaves a note; the holder refills once more for it before letting go, so work
    committed meanwhile never waits for the next trigger."""
    name, again = f"{config.queue_prefix}:dispatch:lock", f"{config.queue_prefix}:dispatch:again"
    client.set(again, 1, ex=LOCK_TTL_S)
    sent = 0
    while True:
        lock = client.lock(name, timeout=LOCK_TTL_S, blocking=False)
        if not lock.acquire():
            return sent  # the holder has our note
        try:
            while _renewed(lock) and client.delete(again):
                sent += _refill_once(sessions, client, celery, config)
        finally:
            _let_go(lock)
        if not client.exists(again):  # noted after our last look, while we held the lock
            return sent


def _renewed(lock: Lock) -> bool:
    """Give the lock its full TTL again for one more pass; False if it was lost (it
    expired, and another refill may hold it now)."""
    try:
        return lock.reacquire()
    except LockNotOwnedError:
        return False


def _let_go(lock: Lock) -> None:
    # Expired already (LockNotOwnedError): whoever holds it now reads the note.
    with contextlib.suppress(LockNotOwnedError):
        lock.release()


def window(client: redis.Redis, config: Config) -> int:
    """Bulk jobs that may be out at once: a few batches per live worker (one at least,
    so work submitted before any worker started is waiting at the broker)."""
    now, dead_after = time.time(), config.worker_dead_after_s
    live = sum(1 for at in heartbeats(client, config).values() if now - at < dead_after)
    return config.effective_bulk_window_batches * config.batch_max * max(1, live)


def out_by_user(session: Session) -> dict[int, int]:
    """Bulk jobs sent and not yet final, per user (the small ``ix_jobs_bulk_out`` index)."""
    rows = session.execute(
        select(Job.user_id, func.count()).where(text(BULK_OUT)).group_by(Job.user_id)
    )
    return {user_id: n for user_id, n in rows}


def waiting_batches_query() -> Select:
    """(batch id, user id, last dispatch) of open batches with jobs waiting in SQL,
    oldest first.

    One probe per open batch, LIMIT 1, into ``ix_jobs_bulk_waiting``: a subquery with
    a LIMIT cannot be flattened into a join, so the batch id is the index condition
    whatever the planner guesses. As ``EXISTS`` it was planned, on a database never
    analyzed, as a semi-join that walked the whole index once per open batch (1M
    waiting jobs x 100 batches: 27 s per refill; now 3 ms, bench/backlog.py).
    """
    probe = select(literal(1)).where(*_waiting(Batch.id)).limit(1).scalar_subquery()
    return (
        select(Batch.id, Batch.user_id, Batch.dispatched_at)
        .where(Batch.completed_at.is_(None), probe.is_not(None))
        .order_by(Batch.created_at, Batch.id)
    )


def _waiting_batches(session: Session) -> list[tuple[str, int, datetime | None]]:
    return [tuple(row) for row in session.execute(waiting_batches_query())]


def _refill_once(
    sessions: sessionmaker[Session], client: redis.Redis, celery: Celery, config: Config
) -> int:
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL statement_timeout = {PASS_STATEMENT_TIMEOUT_MS}"))
        out = out_by_user(session)
        room = window(client, config) - sum(out.values())
        if room <= 0:
            return 0
        chunks = _take(session, config, out, room, _waiting_batches(session))
        session.commit()
    return _send(sessions, celery, config, chunks)


def _take(
    session: Session, config: Config, out: dict[int, int], room: int, waiting: list
) -> list[list[str]]:
    """Mark chunks dispatched until the room is used (the last one may overshoot it):
    each for the user with the fewest jobs out, their oldest batch's next chunk.

    Fewest out alone would let the oldest user win every tie, and with fewer chunks
    in the window than users waiting a newcomer could wait forever: a tie goes to the
    user served least recently (never first), then to the one waiting longest.
    """
    queues: dict[int, deque[str]] = {}
    served: dict[int, float] = {}
    for batch_id, user_id, dispatched_at in waiting:
        queues.setdefault(user_id, deque()).append(batch_id)
        at = as_utc(dispatched_at).timestamp() if dispatched_at else float("-inf")
        served[user_id] = max(served.get(user_id, at), at)
    seniority = {user_id: i for i, user_id in enumerate(queues)}
    chunks, now = [], time.time()
    while room > 0 and queues:
        user_id = min(queues, key=lambda u: (out.get(u, 0), served[u], seniority[u]))
        ids = _mark_next_chunk(session, queues[user_id][0], config.batch_max)
        if not ids:  # that batch has nothing left waiting
            queues[user_id].popleft()
            if not queues[user_id]:
                del queues[user_id]
            continue
        chunks.append(ids)
        out[user_id] = out.get(user_id, 0) + len(ids)
        served[user_id] = now + len(chunks)  # later in this refill than anyone before
        room -= len(ids)
    return chunks


def next_chunk_query(batch_id: str) -> Select:
    """The batch's lowest chunk number with jobs waiting (none: NULL)."""
    return (
        select(Job.chunk)
        .where(*_waiting(batch_id), Job.chunk.is_not(None))
        .order_by(Job.chunk)
        .limit(1)
    )


def _mark_next_chunk(session: Session, batch_id: str, batch_max: int) -> list[str]:
    """Mark the batch's lowest waiting chunk dispatched; returns the ids this call won.

    Jobs with no chunk number (put back by hand) go out BATCH_MAX at a time.
    """
    # ORDER BY ... LIMIT 1, not min(): PostgreSQL without statistics aggregated every
    # waiting entry of the batch for min(), 10,000 for a full batch.
    first = session.scalar(next_chunk_query(batch_id))
    if first is not None:
        chosen = Job.chunk == first
    else:
        ids = session.scalars(
            select(Job.id)
            .where(*_waiting(batch_id), Job.chunk.is_(None))
            .order_by(Job.batch_index)
            .limit(batch_max)
        )
        chosen = Job.id.in_(list(ids))
    now = utcnow()
    # The batch row first: a cancel locks it, then its queued jobs; the same order here
    # cannot deadlock with it.
    session.execute(update(Batch).where(Batch.id == batch_id).values(dispatched_at=now))
    # Plain conditions, no IN (subquery): PostgreSQL planned that as a scan of the
    # batch's rows for each row, seconds per chunk, right after the batch's COPY.
    won = session.execute(
        update(Job)
        .where(*_waiting(batch_id), chosen)
        .values(dispatched_at=now)
        .returning(Job.id, Job.batch_index)
        .execution_options(synchronize_session=False)
    ).all()
    # RETURNING follows the rows' physical order, which updates shuffle: send the chunk
    # in the batch's order, so a message's ids are the same whichever rows moved.
    return [job_id for job_id, _ in sorted(won, key=lambda row: row.batch_index)]


def _send(
    sessions: sessionmaker[Session], celery: Celery, config: Config, chunks: list[list[str]]
) -> int:
    """Send each chunk; on a failure, un-mark the chunks not sent for the next refill."""
    sent = 0
    for i, ids in enumerate(chunks):
        try:
            enqueue_bulk(celery, config, [ids])
        except Exception as exc:
            unsent = [job_id for chunk in chunks[i:] for job_id in chunk]
            log.warning("could not send %d bulk job(s): %r; they wait in SQL", len(unsent), exc)
            _unmark(sessions, unsent)
            return sent
        sent += len(ids)
    return sent


def _unmark(sessions: sessionmaker[Session], job_ids: list[str]) -> None:
    # If this fails too, the jobs stay marked: the reconciler re-sends them after
    # STALE_QUEUED_S, as any dispatched job whose message was lost.
    with sessions() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED.value)
            .values(dispatched_at=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
