"""The bulk dispatcher on the real databases and Redis: window, turns, chunks, failures.

No worker: a test plays the worker by ending jobs in SQL, and reads what was sent
from the bulk queue in Redis. Each test has its own database rows and queue prefix;
the module has its own database, so no other test's waiting batches are dispatched.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import timedelta

import pytest
import redis
from kombu.exceptions import OperationalError
from sqlalchemy import event, select, update
from sqlalchemy.engine.interfaces import CacheStats

from shared import dispatch
from shared.db import make_engine, make_session_factory
from shared.models import Batch, Job, new_id, utcnow
from shared.queue import BulkSendError, bulk_queue, heartbeat_key, make_celery
from shared.redis_client import make_redis
from tests import support

BATCH_MAX = 4


@pytest.fixture(scope="module")
def database(db_url, tmp_path_factory):
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path_factory.mktemp('dispatch') / 'dispatch.db'}"
        return
    url = support.create_postgres_database()
    yield url
    support.drop_postgres_database(url)


@pytest.fixture
def sender(database):
    """refill() with a window of two chunks of BATCH_MAX (one worker, or none alive)."""
    config = support.migrated(
        support.test_config(database, batch_max=BATCH_MAX, bulk_window_batches=2)
    )
    sessions = make_session_factory(make_engine(config))
    s = Sender(config, sessions, make_redis(config), make_celery(config))
    yield s
    # The database outlives the test: nothing of this test may wait for the next one's refill.
    with sessions() as session:
        session.execute(
            update(Job).where(Job.status.in_(["queued", "processing"])).values(status="canceled")
        )
        session.commit()
    support.delete_redis_prefix(config.queue_prefix)


class Sender:
    def __init__(self, config, sessions, client, celery) -> None:
        self.config, self.sessions, self.redis, self.celery = config, sessions, client, celery
        # Each batch is a second younger than the one made before it: order by age is exact.
        self.clock = utcnow() - timedelta(hours=1)

    def refill(self) -> int:
        return dispatch.refill(self.sessions, self.redis, self.celery, self.config)

    def sent(self) -> list[list[str]]:
        """The messages on the bulk queue, oldest first (kombu LPUSHes, workers BRPOP)."""
        raw = self.redis.lrange(bulk_queue(self.config), 0, -1)
        return [json.loads(base64.b64decode(json.loads(m)["body"]))[0][0] for m in raw[::-1]]

    def user(self) -> int:
        return support.new_account(self.sessions, prefix="d")

    def batch(self, user_id: int, chunks: list[int], urls: list[str] | None = None) -> list[str]:
        """A batch whose jobs are numbered in chunks of the given sizes; returns the job ids."""
        numbers = [n for n, size in enumerate(chunks) for _ in range(size)]
        ids = [new_id() for _ in numbers]
        with self.sessions() as session:
            self.clock += timedelta(seconds=1)
            batch = Batch(id=new_id(), user_id=user_id, total=len(ids), model="mobilenet")
            batch.created_at = self.clock
            session.add(batch)
            session.flush()
            for i, (job_id, n) in enumerate(zip(ids, numbers, strict=True)):
                url = urls[i] if urls else f"http://x/{job_id}.jpg"
                session.add(
                    Job(
                        id=job_id,
                        user_id=user_id,
                        batch_id=batch.id,
                        batch_index=i,
                        model="mobilenet",
                        input_url=url,
                        chunk=n,
                    )
                )
            session.commit()
        return ids

    def finish(self, job_ids: list[str]) -> None:
        """What a worker's write does to its batch's jobs."""
        with self.sessions() as session:
            session.execute(
                update(Job)
                .where(Job.id.in_(job_ids))
                .values(status="succeeded", completed_at=utcnow())
            )
            session.commit()


def owner(chunk: list[str], *users: list[str]) -> int:
    """Which of the users' job lists the chunk came from."""
    (found,) = {i for i, ids in enumerate(users) if set(chunk) <= set(ids)}
    return found


def test_nothing_waiting_sends_nothing(sender):
    assert sender.refill() == 0
    assert sender.sent() == []


def test_the_window_bounds_what_is_out_and_finished_work_makes_room(sender):
    ids = sender.batch(sender.user(), [BATCH_MAX] * 5)
    assert sender.refill() == 2 * BATCH_MAX
    assert sender.sent() == [ids[:4], ids[4:8]]
    assert sender.refill() == 0  # full: nothing more until something finishes
    sender.finish(ids[:4])
    assert sender.refill() == BATCH_MAX
    assert sender.sent()[-1] == ids[8:12]
    with sender.sessions() as session:
        waiting = session.scalars(
            select(Job.id).where(Job.id.in_(ids), Job.dispatched_at.is_(None))
        ).all()
    assert set(waiting) == set(ids[12:])


def test_live_workers_each_widen_the_window(sender):
    ids = sender.batch(sender.user(), [BATCH_MAX] * 6)
    now = time.time()
    sender.redis.hset(
        heartbeat_key(sender.config),
        mapping={"w1": now, "w2": now, "dead": now - 10 * sender.config.worker_dead_after_s},
    )
    assert sender.refill() == 4 * BATCH_MAX  # two live workers, two chunks each
    assert [j for chunk in sender.sent() for j in chunk] == ids[:16]


@pytest.mark.parametrize("late", [1, 2])
def test_a_late_user_waits_for_one_finished_chunk_not_for_the_backlog(sender, late):
    first = sender.batch(sender.user(), [BATCH_MAX] * 10)
    assert sender.refill() == 2 * BATCH_MAX
    others = [sender.batch(sender.user(), [BATCH_MAX] * 2) for _ in range(late)]
    assert sender.refill() == 0
    sender.finish(first[:4])  # A: 1 chunk out, the others none
    sender.refill()
    sender.finish(first[4:8])
    sender.refill()
    users = (first, *others)
    turns = [owner(chunk, *users) for chunk in sender.sent()]
    if late == 1:  # B's first chunk goes out at the first finished chunk of A
        assert turns == [0, 0, 1, 0]
    else:  # B (as few out as C, waiting longer), then C (never served, as few as A)
        assert turns == [0, 0, 1, 2]


def test_three_users_with_equal_work_share_the_window_evenly(sender):
    users = [sender.batch(sender.user(), [BATCH_MAX] * 9) for _ in range(3)]
    done: list[int] = []
    sender.refill()
    # Play the worker: finish the oldest chunk out, refill, until all is done.
    while len(done) < len(sender.sent()):
        chunk = sender.sent()[len(done)]
        sender.finish(chunk)
        done.append(owner(chunk, *users))
        sender.refill()
    assert len(done) == 27
    # Every user's last chunk ends within the last 3 of 27: they finish together.
    last = [max(i for i, u in enumerate(done) if u == user) for user in range(3)]
    assert min(last) >= 24, done


def test_a_chunk_goes_out_whole_and_unnumbered_jobs_go_out_batch_max_at_a_time(sender):
    # A URL's 6 duplicates form one chunk larger than BATCH_MAX (api.bulk.chunk's rule).
    ids = sender.batch(sender.user(), [6, 2])
    assert sender.refill() == 8
    assert [sorted(c) for c in sender.sent()] == [sorted(ids[:6]), sorted(ids[6:])]
    loose = sender.batch(sender.user(), [10])
    with sender.sessions() as session:
        session.execute(update(Job).where(Job.id.in_(loose)).values(chunk=None))
        session.commit()
    sender.finish(ids)
    assert sender.refill() == 8
    assert sender.sent()[2:] == [loose[:4], loose[4:8]]


def test_a_batch_canceled_before_its_turn_is_never_sent(sender):
    ids = sender.batch(sender.user(), [BATCH_MAX] * 3)
    with sender.sessions() as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(status="canceled"))
        session.commit()
    assert sender.refill() == 0 and sender.sent() == []


def _waiting(sender, ids: list[str]) -> set[str]:
    with sender.sessions() as session:
        return set(
            session.scalars(select(Job.id).where(Job.id.in_(ids), Job.dispatched_at.is_(None)))
        )


def _pipelines(monkeypatch, fail: bool = False) -> list[int]:
    """Each Redis pipeline run: how many commands it carried (``fail``: it raises instead,
    as when the connection drops)."""
    real, runs = redis.client.Pipeline.execute, []

    def execute(self, *args, **kwargs):
        runs.append(len(self.command_stack))
        if fail:
            raise redis.exceptions.ConnectionError("connection lost")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    return runs


def test_a_refill_sends_its_chunks_in_one_round_trip(sender, monkeypatch):
    config = sender.config.replace(bulk_window_batches=6)
    users = [sender.batch(sender.user(), [BATCH_MAX] * 2) for _ in range(3)]
    runs = _pipelines(monkeypatch)
    assert dispatch.refill(sender.sessions, sender.redis, sender.celery, config) == 24
    assert runs == [6]  # one pipeline, one LPUSH per chunk
    assert sender.sent() == [u[i : i + 4] for i in (0, 4) for u in users]


def test_a_failed_send_leaves_every_chunk_waiting(sender, monkeypatch):
    """A failed pipeline's delivery is uncertain (kombu's BatchPublishError): every chunk
    goes back, for the next refill (a duplicate costs work, never a second outcome)."""
    ids = sender.batch(sender.user(), [BATCH_MAX] * 2)
    runs = _pipelines(monkeypatch, fail=True)
    assert sender.refill() == 0
    assert runs == [2] and sender.sent() == []
    assert _waiting(sender, ids) == set(ids)
    monkeypatch.undo()
    assert sender.refill() == 2 * BATCH_MAX  # the next refill sends them
    assert sender.sent() == [ids[:4], ids[4:]]


def test_a_send_that_fails_halfway_leaves_the_unsent_chunks_waiting(sender, monkeypatch):
    """As on RabbitMQ, where each message is published as it is built."""
    ids = sender.batch(sender.user(), [BATCH_MAX] * 2)
    real = dispatch.enqueue_bulk

    def first_only(celery, config, chunks):
        real(celery, config, chunks[:1])
        raise BulkSendError(1) from OperationalError("connection lost")

    monkeypatch.setattr(dispatch, "enqueue_bulk", first_only)
    assert sender.refill() == BATCH_MAX
    assert _waiting(sender, ids) == set(ids[4:])
    monkeypatch.undo()
    assert sender.refill() == BATCH_MAX  # the next refill sends it
    assert sender.sent() == [ids[:4], ids[4:]]


def test_a_refill_probes_the_batches_its_room_likely_takes(sender, monkeypatch):
    """Chunks of BATCH_MAX for users served before: a window of 2 chunks probes 3 batches
    (one spare), not one per FIRST_CHUNK of room (16)."""
    config = sender.config.replace(batch_max=32)
    with sender.sessions() as session:  # earlier tests' batches (nothing waits there) shut
        session.execute(update(Batch).values(completed_at=utcnow()))
        session.commit()
    users = [sender.user() for _ in range(10)]
    batches = [sender.batch(u, [32] * 3) for u in users]
    with sender.sessions() as session:  # each served once, long ago: no first chunks left
        old = utcnow() - timedelta(hours=1)
        session.execute(update(Batch).where(Batch.user_id.in_(users)).values(dispatched_at=old))
        session.commit()
    real, probed = dispatch._next_chunks, []

    def spy(session, batch_max, batch_ids, after):
        probed.extend(batch_ids)
        return real(session, batch_max, batch_ids, after)

    monkeypatch.setattr(dispatch, "_next_chunks", spy)
    assert dispatch.refill(sender.sessions, sender.redis, sender.celery, config) == 64
    assert len(probed) == 3
    assert sender.sent() == [batches[0][:32], batches[1][:32]]


def test_refills_racing_send_every_chunk_once(sender):
    config = sender.config.replace(bulk_window_batches=100)
    ids = [j for _ in range(4) for j in sender.batch(sender.user(), [BATCH_MAX] * 10)]
    start = threading.Barrier(8)

    def refill() -> None:
        start.wait()
        dispatch.refill(sender.sessions, sender.redis, sender.celery, config)

    threads = [threading.Thread(target=refill) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [j for chunk in sender.sent() for j in chunk]
    assert sorted(sent) == sorted(ids)  # all of them, none twice


def _around_each_pass(monkeypatch, action) -> list[int]:
    """Run ``action(pass number)`` after each of a refill's passes (redis-py's Lock held);
    returns what each pass sent."""
    real, sent = dispatch._refill_once, []

    def one_pass(*args) -> int:
        sent.append(real(*args))
        action(len(sent))
        return sent[-1]

    monkeypatch.setattr(dispatch, "_refill_once", one_pass)
    return sent


def test_a_refill_asked_for_while_one_runs_is_done_by_the_holder(sender, monkeypatch):
    """The caller that finds the lock taken leaves a note and returns at once; the holder
    refills once more for it, so what was committed meanwhile goes out now."""
    user, asked = sender.user(), []
    first = sender.batch(user, [BATCH_MAX])

    def committed_meanwhile(n: int) -> None:
        if n == 1:
            later.extend(sender.batch(user, [BATCH_MAX]))
            asked.append(sender.refill())

    later: list[str] = []
    passes = _around_each_pass(monkeypatch, committed_meanwhile)
    assert sender.refill() == 2 * BATCH_MAX
    assert asked == [0] and passes == [BATCH_MAX, BATCH_MAX]
    assert sender.sent() == [first, later]


def test_each_pass_renews_the_lock(sender, monkeypatch):
    lock = f"{sender.config.queue_prefix}:dispatch:lock"
    sender.batch(sender.user(), [BATCH_MAX])
    ttls = []

    def nearly_expired_then_noted(n: int) -> None:
        ttls.append(sender.redis.pttl(lock))
        if n == 1:  # the pass was slow: its lock has 3 s left, and a caller left a note
            sender.redis.pexpire(lock, 3000)
            sender.redis.set(f"{sender.config.queue_prefix}:dispatch:again", 1)

    _around_each_pass(monkeypatch, nearly_expired_then_noted)
    sender.refill()
    assert len(ttls) == 2 and ttls[1] > 5000  # the second pass began with a full TTL
    assert not sender.redis.exists(lock)  # released after the last pass


def test_a_refill_that_lost_its_lock_stops_and_leaves_the_new_holder_alone(sender, monkeypatch):
    lock = f"{sender.config.queue_prefix}:dispatch:lock"
    sender.batch(sender.user(), [BATCH_MAX] * 3)

    def expired_and_taken(n: int) -> None:
        # Its lock expired mid-pass; another refill took it, and a caller left a note.
        sender.redis.set(lock, "another refill", ex=dispatch.LOCK_TTL_S)
        sender.redis.set(f"{sender.config.queue_prefix}:dispatch:again", 1)

    passes = _around_each_pass(monkeypatch, expired_and_taken)
    sender.refill()
    assert len(passes) == 1  # no pass more under a lock it no longer holds
    assert sender.redis.get(lock) == b"another refill"  # nor released someone else's


def test_a_refill_with_redis_down_raises_nothing_and_sends_nothing(sender):
    ids = sender.batch(sender.user(), [BATCH_MAX])
    down = make_redis(sender.config, "redis://127.0.0.1:1/0")
    assert dispatch.refill(sender.sessions, down, sender.celery, sender.config) == 0
    with sender.sessions() as session:
        assert session.scalar(select(Job.dispatched_at).where(Job.id == ids[0])) is None


def test_a_job_dispatched_long_ago_counts_as_out(sender):
    """Out until final: a lost message holds its room until the reconciler re-sends it."""
    ids = sender.batch(sender.user(), [BATCH_MAX] * 3)
    old = utcnow() - timedelta(hours=1)
    with sender.sessions() as session:
        session.execute(update(Job).where(Job.id.in_(ids[:8])).values(dispatched_at=old))
        session.commit()
    assert sender.refill() == 0


def test_lines_between_two_probed_chunks_that_no_message_carries_go_back(sender):
    # As after a retry committed lines in chunk 1 between a refill's probe (it saw
    # chunks 0 and 2) and its mark: the mark's range takes them in, and they go back.
    ids = sender.batch(sender.user(), [2, 2, 2])
    with sender.sessions() as session:
        batch_id = session.scalar(select(Job.batch_id).where(Job.id == ids[0]))
        probed = [
            dispatch.Chunk(batch_id, 0, ids[0:2], 1),
            dispatch.Chunk(batch_id, 2, ids[4:6], 5),
        ]
        assert dispatch._mark(session, probed) == [ids[0:2], ids[4:6]]
        session.commit()
    with sender.sessions() as session:
        rows = session.execute(select(Job.id, Job.dispatched_at).where(Job.id.in_(ids)))
        marked = {job_id: at for job_id, at in rows}
    assert [marked[j] is not None for j in ids] == [True, True, False, False, True, True]


def test_a_refill_runs_the_same_sql_whatever_the_number_of_batches(sender, database):
    """PostgreSQL plans, and SQLAlchemy compiles, a statement text the first time it
    comes: a probe or a mark whose text grew with the batches cost 15-37 ms per new
    number of batches (bench.backlog). A refill of one batch and one of five run the
    same texts."""
    if not database.startswith("postgresql"):
        pytest.skip("PostgreSQL's statements; SQLite's mark is one statement per batch")
    config = sender.config.replace(bulk_window_batches=100)  # room for every batch
    engine = sender.sessions.kw["bind"]

    def refill_of(batches: int) -> tuple[int, set[str]]:
        for _ in range(batches):
            sender.batch(sender.user(), [BATCH_MAX, BATCH_MAX])
        seen: list[str] = []

        def record(conn, cursor, statement, parameters, context, executemany) -> None:
            seen.append(statement)

        event.listen(engine, "before_cursor_execute", record)
        try:
            sent = dispatch.refill(sender.sessions, sender.redis, sender.celery, config)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        return sent, set(seen)

    one, five = refill_of(1), refill_of(5)
    assert (one[0], five[0]) == (2 * BATCH_MAX, 10 * BATCH_MAX)  # every batch marked
    assert five[1] == one[1]


def test_a_warmed_up_dispatcher_compiles_nothing_in_its_first_refill(sender):
    """A process's first refill cost 3-4 times the next ones (bench.backlog): each
    statement's first compile, Celery's first send. ``warm`` pays those when the
    dispatcher starts: its first refill runs every statement from the cache."""
    engine = make_engine(sender.config)  # a fresh engine: nothing compiled yet
    sessions, celery = make_session_factory(engine), make_celery(sender.config)
    dispatch.warm(sessions, sender.redis, celery, sender.config)
    ids = sender.batch(sender.user(), [BATCH_MAX, BATCH_MAX])
    compiled: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        # Only statements built in SQLAlchemy (SQLite's BEGIN IMMEDIATE is raw SQL).
        if context.compiled is not None and context.cache_hit is not CacheStats.CACHE_HIT:
            compiled.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        assert dispatch.refill(sessions, sender.redis, celery, sender.config) == len(ids)
    finally:
        event.remove(engine, "before_cursor_execute", record)
        engine.dispose()
    assert compiled == []
    assert sender.sent() == [ids[:BATCH_MAX], ids[BATCH_MAX:]]
