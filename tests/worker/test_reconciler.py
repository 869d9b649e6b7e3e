"""The reconciler on the real database and Redis: lost messages are re-sent, hopeless jobs end."""

import base64
import json
import threading
import time
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, update

from harness.accounts import charged_job
from shared import ledger
from shared.models import Batch, Job, LedgerEntry, User, new_id, utcnow
from shared.queue import bulk_queue, interactive_queue
from tests import support
from worker import liveness
from worker import reconciler as reconciler_module
from worker.reconciler import Reconciler


@pytest.fixture
def rec(api_stack):
    config = api_stack.config.replace(
        queue_prefix=support.new_prefix("rec"),
        stale_queued_s=60,
        stale_processing_s=60,
    )
    reconciler = Reconciler.build(config)
    # The database is shared with earlier tests, whose active jobs no worker will take
    # (a dispatcher pass would send their waiting bulk jobs to this test's queue, and a
    # later pass find them stale): a pass here sees only this test's jobs.
    with reconciler.sessions() as s:
        s.execute(
            update(Job).where(Job.status.in_(["queued", "processing"])).values(status="canceled")
        )
        s.commit()
    yield reconciler
    for q in (interactive_queue(config), bulk_queue(config)):
        reconciler.redis.delete(q)
    reconciler.redis.delete(liveness.heartbeat_key(config))
    # The database outlives the test: end its active jobs, so they are lost to no
    # later test's reconciler (each has its own heartbeats, so every claim looks dead).
    with reconciler.sessions() as s:
        ours = select(User.id).where(User.username.like("r%"))
        s.execute(
            update(Job)
            .where(Job.user_id.in_(ours), Job.status.in_(["queued", "processing"]))
            .values(status="canceled")
        )
        s.commit()


def _user(rec) -> int:
    return support.new_account(rec.sessions, tokens=5, prefix="r")


def _job(rec, user_id, age_s: float, **fields) -> str:
    with rec.sessions() as s:
        created_at = utcnow() - timedelta(seconds=age_s)
        return charged_job(s, user_id, "http://x/a.jpg", created_at=created_at, **fields).id


def _queued_ids(rec, queue: str) -> set[str]:
    client: redis.Redis = rec.redis
    ids = set()
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        if "body" in message:  # skip the placeholder a test pushed
            ids.update(json.loads(base64.b64decode(message["body"]))[0][0])
    return ids


def test_an_old_queued_job_with_an_empty_queue_is_resent(rec):
    user = _user(rec)
    old, fresh = _job(rec, user, age_s=600), _job(rec, user, age_s=1)
    rec.run_once()
    sent = _queued_ids(rec, interactive_queue(rec.config))
    assert old in sent and fresh not in sent


def test_nothing_is_resent_while_the_queue_has_a_backlog(rec):
    user = _user(rec)
    old = _job(rec, user, age_s=600)
    rec.redis.rpush(interactive_queue(rec.config), b"{}")  # a backlog: messages still wait
    rec.run_once()
    assert old not in _queued_ids(rec, interactive_queue(rec.config))


def test_a_processing_job_whose_worker_vanished_is_resent_then_failed(rec):
    user = _user(rec)
    stale = utcnow() - timedelta(seconds=600)
    retry = _job(rec, user, age_s=700, status="processing", claimed_at=stale, attempts=1)
    hopeless = _job(
        rec,
        user,
        age_s=700,
        status="processing",
        claimed_at=stale,
        attempts=rec.config.job_max_attempts,
    )
    recent = _job(rec, user, age_s=700, status="processing", claimed_at=utcnow(), attempts=1)
    rec.run_once()
    sent = _queued_ids(rec, interactive_queue(rec.config))
    assert retry in sent and hopeless not in sent and recent not in sent
    with rec.sessions() as s:
        job = s.get(Job, hopeless)
        assert (job.status, job.error_code) == ("failed", "worker_lost")
        reasons = sorted(
            s.scalars(select(LedgerEntry.reason).where(LedgerEntry.job_id == hopeless))
        )
        assert reasons == ["charge", "refund"]
        assert s.get(Job, retry).status == "processing"
        assert s.get(User, user).tokens == support.ledger_sum(s, user)


# --- dead workers: heartbeats, claims and (on Redis) the messages they held ---------


def _beat(rec, name: str, age_s: float) -> None:
    rec.redis.hset(liveness.heartbeat_key(rec.config), name, time.time() - age_s)


def _claimed(rec, user, by: str, claimed_s_ago: float, attempts: int = 1) -> str:
    return _job(
        rec,
        user,
        age_s=700,
        status="processing",
        claimed_at=utcnow() - timedelta(seconds=claimed_s_ago),
        claimed_by=by,
        attempts=attempts,
    )


def test_a_dead_workers_jobs_are_resent_once_a_live_workers_are_left_alone(rec):
    user = _user(rec)
    dead_after = rec.config.worker_dead_after_s
    _beat(rec, "dead/1", age_s=dead_after + 5)
    _beat(rec, "alive/1", age_s=1)
    orphan = _claimed(rec, user, "dead/1", claimed_s_ago=dead_after + 10)
    unknown = _claimed(rec, user, "never-beat/1", claimed_s_ago=dead_after + 10)
    busy = _claimed(rec, user, "alive/1", claimed_s_ago=dead_after + 10)
    # Claimed a moment ago: its worker may not have written its first heartbeat yet.
    just_claimed = _claimed(rec, user, "starting/1", claimed_s_ago=1)
    hopeless = _claimed(
        rec, user, "dead/1", claimed_s_ago=dead_after + 10, attempts=rec.config.job_max_attempts
    )

    rec.run_once()
    sent = _queued_ids(rec, interactive_queue(rec.config))
    assert {orphan, unknown} <= sent
    assert not {busy, just_claimed, hopeless} & sent
    with rec.sessions() as s:
        released = s.get(Job, orphan)
        assert (released.status, released.claimed_by) == ("processing", None)
        assert s.get(Job, busy).claimed_by == "alive/1"
        assert s.get(Job, just_claimed).claimed_by == "starting/1"
        assert (s.get(Job, hopeless).status, s.get(Job, hopeless).error_code) == (
            "failed",
            "worker_lost",
        )
    # The next pass finds nothing new: a released job is not re-sent in a loop.
    before = rec.redis.llen(interactive_queue(rec.config))
    assert rec.run_once()["resent"] == 0
    assert rec.redis.llen(interactive_queue(rec.config)) == before


def test_just_after_a_redis_outage_no_worker_is_judged_dead(rec):
    """Every heartbeat is stale after an outage: re-sending would duplicate all work."""
    user = _user(rec)
    dead_after = rec.config.worker_dead_after_s
    _beat(rec, "paused/1", age_s=dead_after + 5)
    held = _claimed(rec, user, "paused/1", claimed_s_ago=dead_after + 10)
    assert rec.run_once(judge_liveness=False) == {"restored": 0, "resent": 0, "failed": 0}
    with rec.sessions() as s:
        assert s.get(Job, held).claimed_by == "paused/1"
    assert held not in _queued_ids(rec, interactive_queue(rec.config))
    assert rec.run_once()["resent"] == 1  # once trusted again, the same job is recovered


def test_a_queued_job_is_resent_at_most_once_per_stale_period(rec):
    user = _user(rec)
    old = _job(rec, user, age_s=600)
    rec.run_once()
    assert old in _queued_ids(rec, interactive_queue(rec.config))
    rec.redis.delete(interactive_queue(rec.config))  # taken by a worker, not yet claimed
    rec.run_once()
    assert old not in _queued_ids(rec, interactive_queue(rec.config))


def _hold(rec, job_ids: list[str]) -> str:
    """Send a message and take it as a worker would, unacknowledged; returns its tag."""
    rec.celery.send_task("imgclf.classify", args=(job_ids,), queue=interactive_queue(rec.config))
    with rec.celery.connection_for_read() as conn:
        channel = conn.default_channel
        channel.qos.restore_at_shutdown = False  # the holder dies: nothing goes back at close
        message = channel.basic_get(interactive_queue(rec.config), no_ack=False)
        return message.delivery_tag


def test_messages_held_by_a_dead_worker_go_back_to_their_queue(rec):
    user = _user(rec)
    dead_after = rec.config.worker_dead_after_s
    _beat(rec, "dead/2", age_s=dead_after + 5)
    in_flight = _claimed(rec, user, "dead/2", claimed_s_ago=dead_after + 10)
    prefetched = _job(rec, user, age_s=5)
    held_by_dead = _hold(rec, [in_flight, prefetched])
    fresh = _job(rec, user, age_s=5)
    held_by_live = _hold(rec, [fresh])
    broker = liveness.make_broker_redis(rec.config)
    # The dead holder's lease stopped; the live one renews its own.
    broker.zadd(liveness.UNACKED_INDEX, {held_by_dead: time.time() - dead_after - 5})
    liveness.renew_leases(broker, [held_by_live])

    assert rec.run_once()["restored"] == 1
    # Back once, as the very message: the released job is not sent a second time.
    messages = [
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]
        for raw in rec.redis.lrange(interactive_queue(rec.config), 0, -1)
    ]
    assert [ids for ids in messages if in_flight in ids] == [[in_flight, prefetched]]
    with rec.sessions() as s:
        assert s.get(Job, in_flight).claimed_by is None  # released: not re-sent next pass
    assert broker.hexists(liveness.UNACKED, held_by_live)
    assert not broker.hexists(liveness.UNACKED, held_by_dead)
    broker.zrem(liveness.UNACKED_INDEX, held_by_live)
    broker.hdel(liveness.UNACKED, held_by_live)


# --- bulk jobs: waiting in SQL for their turn, or dispatched and lost ----------------


def _bulk(rec, user_id, dispatched_s_ago: float | None) -> str:
    """A queued bulk job created 10 minutes ago, dispatched that long ago (None: never)."""
    created = utcnow() - timedelta(seconds=600)
    with rec.sessions() as s:
        batch = Batch(id=new_id(), user_id=user_id, total=1, model="mobilenet", created_at=created)
        s.add(batch)
        s.flush()
        sent = None if dispatched_s_ago is None else utcnow() - timedelta(seconds=dispatched_s_ago)
        job = Job(
            id=new_id(),
            user_id=user_id,
            batch_id=batch.id,
            batch_index=0,
            chunk=0,
            model="mobilenet",
            input_url="http://x/a.jpg",
            created_at=created,
            dispatched_at=sent,
        )
        ledger.charge_jobs(s, user_id, [job.id])
        s.add(job)
        s.commit()
        return job.id


def test_a_bulk_job_is_stale_only_when_dispatched_long_ago(rec):
    """Never-sent jobs wait for their turn in the bulk window: re-sending them as stale
    would send every waiting job at once; a dispatched one whose message was lost is."""
    user = _user(rec)
    waiting = _bulk(rec, user, dispatched_s_ago=None)
    lost = _bulk(rec, user, dispatched_s_ago=600)
    recent = _bulk(rec, user, dispatched_s_ago=1)
    stale = {j.id for j in rec._stale_queued()}
    assert lost in stale
    assert not {waiting, recent} & stale


def test_a_pass_dispatches_bulk_jobs_waiting_for_their_turn(rec):
    # A wide window: other tests' jobs in this shared database may be out, never finished.
    wide = Reconciler(
        rec.config.replace(bulk_window_batches=10_000), rec.sessions, rec.redis, rec.celery
    )
    waiting = _bulk(rec, _user(rec), dispatched_s_ago=None)
    wide.run_once()
    assert waiting in _queued_ids(rec, bulk_queue(rec.config))
    with rec.sessions() as s:
        assert s.get(Job, waiting).dispatched_at is not None


def test_after_a_failed_try_the_loop_judges_no_worker_dead_for_two_heartbeats(rec, monkeypatch):
    """Redis away: every heartbeat is stale through no worker's fault, the election's
    failure included (no pass ran): the next passes find lost jobs by age only."""
    down = rec.config.replace(redis_url="redis://127.0.0.1:1/0")
    loop = reconciler_module.loop(down, threading.Event())
    with pytest.raises(redis.ConnectionError):
        loop.run_once()  # the election itself fails
    passes = loop.run_pass.__self__
    assert loop.on_failure == passes.failed
    judged: list[bool] = []
    monkeypatch.setattr(rec, "run_once", lambda judge_liveness: judged.append(judge_liveness))
    passes.reconciler = rec
    passes.run()
    passes.failed(redis.ConnectionError("down"))
    passes.run()
    assert judged == [True, False]
