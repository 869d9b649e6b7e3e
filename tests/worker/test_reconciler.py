"""The reconciler on the real database and Redis: lost messages are re-sent, hopeless jobs end."""

import base64
import json
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select

from shared import ledger
from shared.models import Job, LedgerEntry, User, new_id, utcnow
from shared.queue import bulk_queue, interactive_queue
from tests import support
from worker.reconciler import Reconciler


@pytest.fixture
def rec(api_stack):
    config = api_stack.config.replace(
        queue_prefix=support.new_prefix("rec"),
        stale_queued_s=60,
        stale_processing_s=60,
    )
    reconciler = Reconciler.build(config)
    yield reconciler
    for q in (interactive_queue(config), bulk_queue(config)):
        reconciler.redis.delete(q)


def _user(rec) -> int:
    with rec.sessions() as s:
        user = User(username=f"r{new_id()[:12]}", password_hash="x", tokens=0)
        s.add(user)
        s.flush()
        ledger.grant(s, user.id, 5, ledger.SIGNUP)
        s.commit()
        return user.id


def _job(rec, user_id, age_s: float, **fields) -> str:
    with rec.sessions() as s:
        job = Job(
            id=new_id(),
            user_id=user_id,
            model="mobilenet",
            input_url="http://x/a.jpg",
            created_at=utcnow() - timedelta(seconds=age_s),
            **fields,
        )
        ledger.charge_jobs(s, user_id, [job.id])
        s.add(job)
        s.commit()
        return job.id


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
        assert s.get(User, user).tokens == ledger.ledger_sum(s, user)
