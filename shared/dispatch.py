"""Which bulk jobs go to the broker next: a shallow window, refilled round-robin over users.

A bulk batch's jobs are committed with no message sent (``jobs.dispatched_at`` is
NULL: they wait in SQL). ``refill`` keeps about ``BULK_WINDOW_BATCHES`` x
``BATCH_MAX`` bulk jobs per live worker *out* (sent, not yet final) and fills the
room left one chunk at a time, each time for the user with the fewest jobs out
(ties: the user served least recently, then the one waiting longest). So a user who submits 30
URLs behind another's 10,000 waits for a few batches, not for the 10,000; users
with work waiting share the window evenly; the broker holds a few messages per
worker whatever waits in SQL; and canceling a batch costs nothing for the jobs
never sent (cancel flips them to ``canceled`` in SQL). A refill's cost follows the
chunks it sends, not the open batches: the order comes from the batches' rows, and
only the batch whose turn it is has its jobs probed (``_take``).

A chunk is the message ``api.bulk.chunk`` numbered at submission (a URL's duplicates
together, so the worker fetches and classifies each URL once). Marking is a
conditional UPDATE (``dispatched_at IS NULL``) committed before the send, so a chunk
is sent once however many refills race. A refill's chunks go out in one send (one
Redis round trip, ``enqueue_bulk``); a failed send un-marks what it is not known to
have sent, for the next refill. A message lost after the send is the reconciler's: a
queued job dispatched longer than ``STALE_QUEUED_S`` ago is re-sent
(worker/reconciler.py).

Called after a batch is committed (the API: an idle service starts at once), after a
worker wrote a batch with bulk jobs (the room it freed is filled at once), and on
every reconciler pass (new workers widen the window; anything a failure left behind).
A retried or re-queued bulk job goes back through here too: set it ``queued`` with
``dispatched_at`` NULL, commit, then call ``refill``.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import logging
import time
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import redis
from celery import Celery
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock
from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    Update,
    and_,
    any_,
    bindparam,
    column,
    func,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.sql.selectable import TableValuedAlias
from sqlalchemy.types import TypeEngine

from shared.config import Config
from shared.models import BULK_OUT, BULK_WAITING, Batch, Job, as_utc, new_id, utcnow
from shared.queue import BulkSendError, enqueue_bulk, heartbeats
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
_JOBS = Job.__table__


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


def open_batches_query() -> Select:
    """(batch id, user id, last dispatch) of every open batch, oldest first.

    The batches table alone (``ix_batches_open``), no probe of the jobs: the fairness
    order needs only these, and the jobs are probed lazily, batch by batch, in that
    order (``_take``), so a refill reads as many batches' jobs as the room takes, not
    one per open batch (1,000 probes were 44 ms of a refill, bench/backlog.py).
    """
    return (
        select(Batch.id, Batch.user_id, Batch.dispatched_at)
        .where(Batch.completed_at.is_(None))
        .order_by(Batch.created_at, Batch.id)
    )


def _refill_once(
    sessions: sessionmaker[Session], client: redis.Redis, celery: Celery, config: Config
) -> int:
    with sessions() as session:
        _limit_statements(session)
        out = out_by_user(session)
        room = window(client, config) - sum(out.values())
        if room <= 0:
            return 0
        batches = session.execute(open_batches_query()).all()
        chunks = _mark(session, _take(session, config.batch_max, out, room, batches))
        session.commit()
    return _send(sessions, celery, config, chunks)


def _limit_statements(session: Session) -> None:
    if _is_postgres(session):
        session.execute(text(f"SET LOCAL statement_timeout = {PASS_STATEMENT_TIMEOUT_MS}"))


def warm(
    sessions: sessionmaker[Session], client: redis.Redis, celery: Celery, config: Config
) -> None:
    """Pay now, where a process starts, what its first refill would pay once: each
    statement's first compile (SQLAlchemy) and first run on a connection (PostgreSQL's
    catalog caches), run here on rows that do not exist and rolled back; the Redis
    connection; Celery's first send (its sender, the broker connection and channel),
    short of sending. Cold, a process's first refill took 33-53 ms of CPU where the
    next ones took 10-30 (bench.backlog --cold, 100 and 1,000 users); warmed, 19-23.
    Never raises: the refill pays what is left.
    """
    nowhere = new_id()  # no batch, no job: every statement runs, none finds a row
    try:
        with sessions() as session:
            _limit_statements(session)
            out_by_user(session)
            session.execute(open_batches_query()).all()
            _next_chunks(session, config.batch_max, [nowhere], {})  # and the loose jobs' probe
            _mark(session, [Chunk(nowhere, 0, []), Chunk(nowhere, None, [nowhere])])
            session.rollback()
        client.ping()
        celery.amqp.send_task_message  # noqa: B018 built on first use, with its imports
        with celery.producer_or_acquire() as producer:
            producer.channel  # noqa: B018 connects to the broker, opens the channel
    except Exception as exc:
        log.warning("could not warm the bulk dispatcher up: %r", exc)


class _Turn(NamedTuple):
    """Where a user stands in the queue for the next chunk: the fewest jobs out first,
    then the one served least recently (never: first), then the one waiting longest."""

    out: int
    served: float
    seniority: int
    user_id: int


class Chunk(NamedTuple):
    """A message's worth of one batch's jobs."""

    batch_id: str
    number: int | None  # None: jobs with no chunk number, by id
    ids: list[str]  # in the batch's order
    last_index: int = -1  # the last job's batch_index


def _take(
    session: Session, batch_max: int, out: dict[int, int], room: int, batches: Sequence
) -> list[Chunk]:
    """The chunks to send, in order, until the room is used (the last one may overshoot
    it): each for the user with the fewest jobs out, their oldest batch's next chunk.
    Nothing is marked yet (``_mark``).

    Fewest out alone would let the oldest user win every tie, and with fewer chunks
    in the window than users waiting a newcomer could wait forever: a tie goes to the
    user served least recently (never first), then to the one waiting longest. The
    order comes from the batches alone; only the batches whose turn comes next are
    probed, several in one statement, so a batch with nothing waiting (its jobs all
    out) costs a probe when its turn comes.
    """
    queues: dict[int, deque[str]] = {}
    served: dict[int, float] = {}
    fresh: set[str] = set()  # never dispatched: their next chunk is a short first one
    for batch_id, user_id, dispatched_at in batches:
        queues.setdefault(user_id, deque()).append(batch_id)
        if dispatched_at is None:
            fresh.add(batch_id)
        at = as_utc(dispatched_at).timestamp() if dispatched_at else float("-inf")
        served[user_id] = max(served.get(user_id, at), at)
    turns = [_Turn(out.get(u, 0), served[u], i, u) for i, u in enumerate(queues)]
    heapq.heapify(turns)
    chunks: list[Chunk] = []
    ready: dict[str, Chunk] = {}  # probed, not taken: each batch's next chunk
    after: dict[str, tuple[int, int]] = {}  # per batch: the last chunk, loose index taken
    now = time.time()
    while room > 0 and turns:
        turn = heapq.heappop(turns)
        batch_id = queues[turn.user_id][0]
        if batch_id not in ready:  # probe it, and the batches whose turns come next
            heads = set(_heads_ahead(batch_id, turns, queues, room, fresh, batch_max))
            ready.update(_next_chunks(session, batch_max, sorted(heads - ready.keys()), after))
        chunk = ready.pop(batch_id)
        if not chunk.ids:  # nothing left waiting there: the user's next batch, same turn
            queues[turn.user_id].popleft()
            if queues[turn.user_id]:
                heapq.heappush(turns, turn)
            continue
        chunks.append(chunk)
        fresh.discard(batch_id)
        last_chunk, last_loose = after.get(batch_id, (-1, -1))
        if chunk.number is None:
            after[batch_id] = (last_chunk, chunk.last_index)
        else:
            after[batch_id] = (chunk.number, last_loose)
        room -= len(chunk.ids)
        # Later in this refill than anyone before: behind every user as far out as this one.
        taken = turn._replace(out=turn.out + len(chunk.ids), served=now + len(chunks))
        heapq.heappush(turns, taken)
    return chunks


def _heads_ahead(
    first: str,
    turns: list[_Turn],
    queues: dict[int, deque[str]],
    room: int,
    fresh: set[str],
    batch_max: int,
) -> list[str]:
    """``first``, and the batches at the head of the turns next in line, as many as the
    room likely takes (and one more): a batch never dispatched sends a FIRST_CHUNK next,
    any other a BATCH_MAX.

    A guess, so that one probe serves most refills: short of it, a later turn probes
    again; over it, a chunk is read for nothing. Probing as if every chunk were a first
    one read 24 batches' next chunks to send 3 of BATCH_MAX (100 users, bench.backlog).
    """
    heads = [first]
    room -= FIRST_CHUNK if first in fresh else batch_max
    for turn in heapq.nsmallest(max(0, room // FIRST_CHUNK) + 1, turns):
        head = queues[turn.user_id][0]
        heads.append(head)
        if room <= 0:
            break
        room -= FIRST_CHUNK if head in fresh else batch_max
    return heads


def next_chunk_query(batch_id: str | BindParameter, after: int | BindParameter = -1) -> Select:
    """(batch id, id, chunk, index) of the batch's lowest waiting chunk above ``after``.

    ``chunk = (SELECT ... ORDER BY chunk LIMIT 1)``: the subquery is one step into
    ``ix_jobs_bulk_waiting``, and the chunk's jobs are then an index range; not min(),
    which PostgreSQL without statistics computed over every waiting entry of the batch
    (10,000 for a full batch). One batch's probe: SQLite's, and ``next_chunks_query``'s
    per batch on PostgreSQL.
    """
    first = (
        select(Job.chunk)
        .where(*_waiting(batch_id), Job.chunk > after)
        .order_by(Job.chunk)
        .limit(1)
        .scalar_subquery()
    )
    return select(Job.batch_id, Job.id, Job.chunk, Job.batch_index).where(
        *_waiting(batch_id), Job.chunk == first
    )


@functools.cache
def next_chunks_query() -> Select:
    """PostgreSQL: ``next_chunk_query`` for each batch of the array ``probe_batches``,
    after the chunk at the same place in ``probe_after``, in one statement whose text
    is the same however many batches it probes.

    ``unnest(...) AS b(id, after) JOIN LATERAL (the probe of b.id)``: the lateral
    subquery runs once per batch with its batch id as the index condition, as the
    probe alone does. Its ``ORDER BY`` (a message's ids in the batch's order) also
    keeps PostgreSQL from pulling it up into a plain join, which it planned, without
    statistics, as one read of the whole waiting index hashed against the batches.
    It replaced a statement per number of batches (a UNION ALL of one probe each),
    and each new number cost 15-37 ms the first time it came up (bench.backlog):
    SQLAlchemy compiled it, and PostgreSQL planned it (24 probes: 10-15 ms, at every
    run). This text is compiled once per process, planned in about 0.2 ms whatever
    the number of batches, and not planned at all once psycopg has prepared it (a
    text run five times on a connection).
    """
    batches = _unnest(
        "b", ("id", "probe_batches", _JOBS.c.batch_id.type), ("after", "probe_after", Integer())
    )
    probed = _JOBS.alias("probed")
    first = (
        select(probed.c.chunk)
        .where(probed.c.batch_id == batches.c.id, text(BULK_WAITING))
        .where(probed.c.chunk > batches.c.after)
        .order_by(probed.c.chunk)
        .limit(1)
        .correlate(batches)  # not a FROM of its own: the lateral row's batch
        .scalar_subquery()
    )
    chunk = (
        select(_JOBS.c.batch_id, _JOBS.c.id, _JOBS.c.chunk, _JOBS.c.batch_index)
        .where(_JOBS.c.batch_id == batches.c.id, text(BULK_WAITING), _JOBS.c.chunk == first)
        .order_by(_JOBS.c.batch_index)
        .lateral("next_chunk")
    )
    return select(chunk).select_from(batches).join(chunk, true())


def _unnest(name: str, *columns: tuple[str, str, TypeEngine]) -> TableValuedAlias:
    """``unnest(:param, ...) AS name(column, ...)``: arrays bound as one parameter each,
    typed as the columns they are compared with (so ids keep the id column's type)."""
    arrays = [bindparam(key, type_=postgresql.ARRAY(kind)) for _, key, kind in columns]
    return (
        func.unnest(*arrays)
        .table_valued(*(column(label, kind) for label, _, kind in columns))
        .render_derived(name=name)
    )


def _next_chunks(
    session: Session, batch_max: int, batch_ids: list[str], after: dict[str, tuple[int, int]]
) -> dict[str, Chunk]:
    """Each batch's next chunk (no ids: nothing waits): on PostgreSQL one statement
    (``next_chunks_query``), on SQLite one per batch.

    Jobs with no chunk number (put back by hand) come last, BATCH_MAX at a time: the
    batches with no numbered chunk left ask for them one by one.
    """
    found: dict[str, list] = {b: [] for b in batch_ids}
    last = {b: after.get(b, (-1, -1)) for b in batch_ids}  # chunk number, loose index
    if _is_postgres(session):
        params = {"probe_batches": batch_ids, "probe_after": [last[b][0] for b in batch_ids]}
        rows = list(session.execute(next_chunks_query(), params))
    else:
        rows = [r for b in batch_ids for r in session.execute(next_chunk_query(b, last[b][0]))]
    for row in rows:
        found[row.batch_id].append(row)
    for batch_id in [b for b, rows in found.items() if not rows]:
        found[batch_id] = list(
            session.execute(
                select(Job.batch_id, Job.id, Job.chunk, Job.batch_index)
                .where(
                    *_waiting(batch_id), Job.chunk.is_(None), Job.batch_index > last[batch_id][1]
                )
                .order_by(Job.batch_index)
                .limit(batch_max)
            )
        )
    chunks = {}
    for batch_id, rows in found.items():
        rows.sort(key=lambda row: row.batch_index)  # a message's ids in the batch's order
        number, last_index = (rows[0].chunk, rows[-1].batch_index) if rows else (None, -1)
        chunks[batch_id] = Chunk(batch_id, number, [row.id for row in rows], last_index)
    return chunks


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _mark(session: Session, chunks: list[Chunk]) -> list[list[str]]:
    """Mark the chunks dispatched; returns the ids this call won, chunk by chunk (a
    refill racing this one may have won some).

    The batch rows first, locked in id order (``SELECT ... ORDER BY id FOR UPDATE``: an
    UPDATE locks rows in its scan's order, whatever order its list is in): a cancel
    locks its batch row, then its queued jobs, and a worker's batch completion locks
    its batch rows in id order; the same order here cannot deadlock with either. Then
    the jobs (``mark_query``). A range of chunk numbers can take in lines committed
    after the probe (a retry's, between two probed chunks): those are put back at
    once, since no message carries them.
    """
    if not chunks:
        return []
    now = utcnow()
    batch_ids = sorted({chunk.batch_id for chunk in chunks})
    postgres = _is_postgres(session)
    for statement in _batch_statements(postgres):
        session.execute(statement, {"mark_batch_ids": batch_ids, "mark_now": now})
    ranges, loose = _mark_arms(chunks)
    if postgres:
        won = set(session.scalars(mark_query(), _mark_params(ranges, loose, now)))
    else:
        won = _mark_each(session, ranges, loose, now)
    strays = won.difference(j for chunk in chunks for j in chunk.ids)
    if strays:
        session.execute(
            update(Job)
            .where(Job.id.in_(sorted(strays)))
            .values(dispatched_at=None)
            .execution_options(synchronize_session=False)
        )
    return [kept for chunk in chunks if (kept := [j for j in chunk.ids if j in won])]


@functools.cache
def _batch_statements(postgres: bool) -> tuple[Select, Update]:
    """Lock the batches ``mark_batch_ids`` in id order, then set their last dispatch.
    On PostgreSQL ``id = ANY(:array)``: one text for any number of batches (an IN list
    has a placeholder per batch)."""
    if postgres:
        chosen = Batch.id == any_(
            bindparam("mark_batch_ids", type_=postgresql.ARRAY(Batch.__table__.c.id.type))
        )
    else:
        chosen = Batch.id.in_(bindparam("mark_batch_ids", expanding=True))
    return (
        select(Batch.id).where(chosen).order_by(Batch.id).with_for_update(),
        update(Batch)
        .where(chosen)
        .values(dispatched_at=bindparam("mark_now", type_=Batch.dispatched_at.type))
        .execution_options(synchronize_session=False),
    )


class _Range(NamedTuple):
    """A batch's chunks ``lo`` to ``hi``, marked together."""

    batch_id: str
    lo: int
    hi: int


def _mark_arms(chunks: Sequence[Chunk]) -> tuple[list[_Range], list[str]]:
    """What to mark: a range of chunk numbers per batch (its chunks in a refill are
    usually consecutive; lines between them that no probe saw go back, ``_mark``), and
    the jobs with no chunk number, by id."""
    numbers: dict[str, list[int]] = {}
    loose: list[str] = []
    for chunk in chunks:
        if chunk.number is None:
            loose.extend(chunk.ids)
        else:
            numbers.setdefault(chunk.batch_id, []).append(chunk.number)
    return [_Range(b, min(n), max(n)) for b, n in numbers.items()], loose


def _mark_params(ranges: list[_Range], loose: list[str], now: datetime) -> dict[str, object]:
    return {
        "mark_batches": [r.batch_id for r in ranges],
        "mark_lo": [r.lo for r in ranges],
        "mark_hi": [r.hi for r in ranges],
        "mark_loose": loose,
        "mark_now": now,
    }


@functools.cache
def mark_query() -> Update:
    """PostgreSQL: mark jobs dispatched where they still wait (of racing refills, one
    wins each job); RETURNING the ids won. The chunk ranges come as arrays
    (``mark_batches``, ``mark_lo``, ``mark_hi``: one range a batch), the jobs with no
    chunk number as ``mark_loose``: one text for any number of batches.

    ``id IN (a range of the waiting index per batch, LATERAL over the arrays, UNION ALL
    the loose ids)``: each range has its batch and chunks as the index condition, and
    the ids are then looked up in the primary key. The lateral's ``ORDER BY`` keeps it a
    subquery run per range: pulled up, PostgreSQL without statistics hashed the ranges
    against a read of the whole waiting index. Not the ids as a list: without statistics
    a long list looks unselective, and PostgreSQL read all of ``ix_jobs_batch_status``
    for ``status`` instead; nor an OR of the ranges, which it planned as a filter over
    the whole waiting index (250 ms for 24 chunks). The outer condition is what a racing
    refill's commit is checked against.
    """
    ranges = _unnest(
        "r",
        ("id", "mark_batches", _JOBS.c.batch_id.type),
        ("lo", "mark_lo", Integer()),
        ("hi", "mark_hi", Integer()),
    )
    marked = _JOBS.alias("marked")
    in_range = (
        select(marked.c.id)
        .where(marked.c.batch_id == ranges.c.id, text(BULK_WAITING))
        .where(marked.c.chunk.between(ranges.c.lo, ranges.c.hi))
        .order_by(marked.c.chunk)
        .lateral("in_range")
    )
    loose = select(func.unnest(bindparam("mark_loose", type_=postgresql.ARRAY(_JOBS.c.id.type))))
    chosen = union_all(select(in_range.c.id).select_from(ranges).join(in_range, true()), loose)
    return _mark_update(Job.id.in_(chosen))


def _mark_each(session: Session, ranges: list[_Range], loose: list[str], now: datetime) -> set[str]:
    """SQLite: one UPDATE per range (and one for the loose jobs); no planner to outwit,
    no round trips to save."""
    won: set[str] = set()
    for r in ranges:
        chosen = and_(*_waiting(r.batch_id), Job.chunk.between(r.lo, r.hi))
        won.update(session.scalars(_mark_update(chosen), {"mark_now": now}))
    if loose:
        won.update(session.scalars(_mark_update(Job.id.in_(loose)), {"mark_now": now}))
    return won


def _mark_update(chosen: ColumnElement[bool]) -> Update:
    return (
        update(Job)
        .where(chosen, text("status = 'queued' AND dispatched_at IS NULL"))
        .values(dispatched_at=bindparam("mark_now", type_=Job.dispatched_at.type))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )


def _send(
    sessions: sessionmaker[Session], celery: Celery, config: Config, chunks: list[list[str]]
) -> int:
    """Send the chunks in one go (``enqueue_bulk``: one Redis round trip); on a failure,
    un-mark those not known to be sent, for the next refill (a chunk whose delivery is
    uncertain goes out again: its second message finds its jobs claimed, or claims them
    once)."""
    if not chunks:
        return 0
    try:
        enqueue_bulk(celery, config, chunks)
    except Exception as exc:
        done = exc.sent if isinstance(exc, BulkSendError) else 0
        unsent = [job_id for chunk in chunks[done:] for job_id in chunk]
        log.warning("could not send %d bulk job(s): %r; they wait in SQL", len(unsent), exc)
        if unsent:
            _unmark(sessions, unsent)
        return sum(len(chunk) for chunk in chunks[:done])
    return sum(len(chunk) for chunk in chunks)


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
