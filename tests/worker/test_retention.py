"""Retention on the real database: old finished work goes in chunks; the ledger and
unfinished work stay."""

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from harness.accounts import charged_job
from shared import jobs, ledger
from shared.models import (
    Batch,
    IdempotencyRecord,
    Job,
    LedgerEntry,
    User,
    WebhookAttempt,
    WebhookEvent,
    new_id,
    utcnow,
)
from tests import support
from worker import retention as retention_module
from worker.retention import Retention

CHUNK = 2
OLD = timedelta(days=40)  # past the 30 days kept


@pytest.fixture
def ret(api_stack):
    config = api_stack.config.replace(
        retention_days=30, retention_chunk=CHUNK, idempotency_ttl_s=3600
    )
    return Retention.build(config)


def _user(ret) -> int:
    return support.new_account(ret.sessions, tokens=50, prefix="ret")


def _job(ret, user_id: int, age: timedelta, status: str = "succeeded", **fields) -> str:
    """A charged job that ended ``age`` ago (or, active, was created then)."""
    with ret.sessions() as s:
        ended = utcnow() - age if status in ("succeeded", "failed", "canceled") else None
        return charged_job(
            s,
            user_id,
            "http://x/a.jpg",
            status=status,
            created_at=utcnow() - age,
            completed_at=ended,
            **fields,
        ).id


def _batch(ret, user_id: int, age: timedelta, statuses: list[str]) -> tuple[str, list[str]]:
    ended = all(s in ("succeeded", "failed", "canceled") for s in statuses)
    with ret.sessions() as s:
        batch = Batch(
            id=new_id(),
            user_id=user_id,
            total=len(statuses),
            model="mobilenet",
            created_at=utcnow() - age,
            completed_at=utcnow() - age if ended else None,
        )
        s.add(batch)
        s.commit()
    ids = [
        _job(ret, user_id, age, st, batch_id=batch.id, batch_index=i)
        for i, st in enumerate(statuses)
    ]
    return batch.id, ids


def _event(ret, user_id: int, age: timedelta, status: str, job_id: str | None = None) -> str:
    with ret.sessions() as s:
        event = WebhookEvent(
            id=f"msg_{new_id().replace('-', '')}",
            user_id=user_id,
            job_id=job_id,
            event_type="job.completed",
            url="http://x/hook",
            payload={"type": "job.completed", "data": {}},
            status=status,
            created_at=utcnow() - age,
            completed_at=utcnow() - age if status in ("succeeded", "failed") else None,
        )
        s.add(event)
        s.flush()
        s.add(WebhookAttempt(event_id=event.id, number=1, status_code=200, duration_ms=5))
        s.commit()
        return event.id


def _idempotency(ret, user_id: int, age: timedelta) -> int:
    with ret.sessions() as s:
        record = IdempotencyRecord(
            user_id=user_id,
            key=new_id(),
            fingerprint="f" * 64,
            status_code=202,
            body={"id": new_id()},
            created_at=utcnow() - age,
        )
        s.add(record)
        s.commit()
        return record.id


def _exists(ret, model, row_id) -> bool:
    with ret.sessions() as s:
        return s.get(model, row_id) is not None


def test_old_finished_work_goes_in_chunks_and_the_ledger_stays(ret, monkeypatch):
    user = _user(ret)
    old_jobs = [_job(ret, user, OLD, st) for st in ("succeeded", "failed", "canceled")]
    recent = _job(ret, user, timedelta(days=1))
    old_active = [_job(ret, user, OLD, "queued"), _job(ret, user, OLD, "processing")]
    old_batch, old_batch_jobs = _batch(ret, user, OLD, ["succeeded"] * 4 + ["failed"])
    # Still running: even its finished jobs stay, or its counts would lie.
    running, running_jobs = _batch(ret, user, OLD, ["succeeded", "processing"])
    delivered = _event(ret, user, OLD, "succeeded", job_id=old_jobs[0])
    undelivered = _event(ret, user, OLD, "retrying", job_id=old_jobs[1])
    expired, live = (
        _idempotency(ret, user, timedelta(hours=2)),
        _idempotency(ret, user, timedelta(0)),
    )
    with ret.sessions() as s:
        ledger_before = s.scalars(
            select(LedgerEntry.job_id).where(LedgerEntry.user_id == user)
        ).all()

    sizes = []  # every DELETE of jobs, as the purge made it: spy, not fake
    real = jobs.delete_finished

    def spy(*args, **kwargs):
        deleted = real(*args, **kwargs)
        sizes.append(len(deleted))
        return deleted

    monkeypatch.setattr(jobs, "delete_finished", spy)
    purged = ret.run_once()

    assert purged["jobs"] >= 3 and purged["batches"] >= 1
    assert purged["webhook_events"] >= 1 and purged["idempotency_keys"] >= 1
    assert max(sizes) <= CHUNK and sum(sizes) >= len(old_jobs) + len(old_batch_jobs)
    for job_id in old_jobs + old_batch_jobs:
        assert not _exists(ret, Job, job_id)
    assert not _exists(ret, Batch, old_batch)
    assert not _exists(ret, WebhookEvent, delivered)
    assert not _exists(ret, IdempotencyRecord, expired)
    for job_id in [recent, *old_active, *running_jobs]:
        assert _exists(ret, Job, job_id)
    assert _exists(ret, Batch, running)
    assert _exists(ret, WebhookEvent, undelivered)  # its job is gone; it is still owed
    assert _exists(ret, IdempotencyRecord, live)
    with ret.sessions() as s:
        attempts = select(func.count()).where(WebhookAttempt.event_id == delivered)
        assert s.scalar(attempts) == 0
        ledger_after = s.scalars(
            select(LedgerEntry.job_id).where(LedgerEntry.user_id == user)
        ).all()
        assert sorted(map(str, ledger_after)) == sorted(map(str, ledger_before))
        assert s.get(User, user).tokens == support.ledger_sum(s, user)


def test_a_pass_stops_when_its_time_is_up_and_the_next_goes_on(ret):
    user = _user(ret)
    old = _job(ret, user, OLD)
    assert not any(ret.run_once(budget_s=0).values())
    assert _exists(ret, Job, old)
    ret.run_once()
    assert not _exists(ret, Job, old)


def test_retention_days_zero_keeps_everything(ret):
    user = _user(ret)
    old = _job(ret, user, OLD)
    assert Retention(ret.config.replace(retention_days=0), ret.sessions).run_once() == {}
    assert _exists(ret, Job, old)


def test_the_worker_loop_purges_every_interval(ret):
    user = _user(ret)
    old = _job(ret, user, OLD)
    config = ret.config.replace(retention_interval_s=0.2, queue_prefix=support.new_prefix("ret"))
    stop = threading.Event()
    loop = retention_module.loop(config, stop)
    assert loop is not None
    loop.start()
    try:
        support.wait_for(lambda: not _exists(ret, Job, old), 30, "the loop's purge")
    finally:
        stop.set()
        assert loop.join(30)
    assert retention_module.loop(config.replace(retention_days=0), stop) is None


def test_a_pass_stops_between_chunks_when_its_worker_stops(ret):
    user = _user(ret)
    old = _job(ret, user, OLD)
    stopped = threading.Event()
    stopped.set()
    assert not any(ret.run_once(stop=stopped).values())
    assert _exists(ret, Job, old)


def _api_user(ret, client, tokens: int) -> tuple[dict, int]:
    user = support.new_user(client)
    with ret.sessions() as s:
        user_id = s.scalars(select(User.id).where(User.username == user["username"])).one()
        ledger.grant(s, user_id, tokens, ledger.REFILL)
        s.commit()
    return user, user_id


def _between_chunks(monkeypatch, before: int, action) -> None:
    """Run ``action`` once, just before the purge's call number ``before`` (0: the first)
    of ``batches.delete_ended``: a retry between two of its transactions, deterministic."""
    real, calls = retention_module.batches.delete_ended, []

    def interleaved(*args, **kwargs):
        if len(calls) == before:
            action()
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(retention_module.batches, "delete_ended", interleaved)


def _lines(ret, batch_id: str) -> int:
    with ret.sessions() as s:
        return s.scalar(select(func.count()).where(Job.batch_id == batch_id))


def _balanced(ret, user_id: int) -> int:
    with ret.sessions() as s:
        tokens = s.get(User, user_id).tokens
        assert tokens == support.ledger_sum(s, user_id)
        return tokens


def test_a_retry_in_mid_purge_is_refused_and_the_batch_goes_whole(ret, api_stack, monkeypatch):
    client = api_stack.client()
    user, user_id = _api_user(ret, client, 10)
    batch_id, _ = _batch(ret, user_id, OLD, ["succeeded"] * 3 + ["failed"] * 2)
    before = _balanced(ret, user_id)
    answers = []

    def retry():
        resp = client.post(f"/v1/batches/{batch_id}/retry", headers=user["headers"])
        answers.append((resp.status_code, resp.get_json()))

    _between_chunks(monkeypatch, 1, retry)  # after the first chunk of lines went
    purged = ret.run_once()

    [(status, body)] = answers
    assert status == 410 and body["error"]["code"] == "batch_expired", body
    assert purged["batches"] >= 1
    assert not _exists(ret, Batch, batch_id) and _lines(ret, batch_id) == 0
    assert _balanced(ret, user_id) == before  # the refused retry charged nothing


def test_a_retry_that_reopened_the_batch_first_keeps_it_whole(ret, api_stack, monkeypatch):
    client = api_stack.client()
    user, user_id = _api_user(ret, client, 10)
    batch_id, _ = _batch(ret, user_id, OLD, ["succeeded"] * 3 + ["failed"] * 2)
    before = _balanced(ret, user_id)
    answers = []

    def retry():
        resp = client.post(f"/v1/batches/{batch_id}/retry", headers=user["headers"])
        answers.append((resp.status_code, resp.get_json()))

    _between_chunks(monkeypatch, 0, retry)  # after the purge chose it, before any chunk
    ret.run_once()

    [(status, body)] = answers
    assert status == 202 and body["retried"] == 2, body
    assert _exists(ret, Batch, batch_id) and _lines(ret, batch_id) == 5
    with ret.sessions() as s:
        assert s.get(Batch, batch_id).completed_at is None
        kept = s.scalars(select(Job.status).where(Job.batch_id == batch_id)).all()
        assert sorted(kept) == ["queued"] * 2 + ["succeeded"] * 3
    assert _balanced(ret, user_id) == before - 2
