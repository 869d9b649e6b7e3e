"""/metrics' job and token numbers come from counters the database keeps (migration 0009),
and they stay exactly what counting the tables would say through every way rows change:
submission, cancel with refunds, deletion, retention's purge, a user's deletion (the
foreign keys' cascade), an operator's bulk SQL. Runs on PostgreSQL and on SQLite."""

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select, text

from api.metrics import read_counters
from shared.db import make_engine, make_session_factory
from shared.models import Counter, Job, LedgerEntry, new_id, utcnow
from shared.status import JobStatus
from tests import support
from worker.retention import Retention


def _counted(sessions) -> dict[str, dict[str, int]]:
    """What the counters said /metrics used to compute: whole-table aggregates."""
    with sessions() as s:
        jobs = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        tokens = dict(
            s.execute(
                select(LedgerEntry.reason, func.sum(LedgerEntry.delta)).group_by(LedgerEntry.reason)
            ).all()
        )
    return {"jobs": jobs, "tokens": {k: int(v) for k, v in tokens.items()}}


def _nonzero(counts: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {m: {k: v for k, v in counts.get(m, {}).items() if v} for m in ("jobs", "tokens")}


def assert_exact(sessions) -> None:
    with sessions() as s:
        kept = read_counters(s)
    assert _nonzero(kept) == _nonzero(_counted(sessions))


@pytest.fixture
def sessions(api_stack):
    # An engine of its own: inside the app's context the test client's requests would
    # share it and keep their sessions (and SQLite's write lock) open.
    engine = make_engine(api_stack.config)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def rich(api_stack):
    return support.funded_user(api_stack.client(), api_stack.app, 200)


def test_counts_stay_exact_through_submission_cancel_and_deletion(api_stack, sessions, rich):
    client = api_stack.client()
    assert_exact(sessions)
    urls = [f"https://images.example.com/c{i}.jpg" for i in range(120)]
    resp = client.post("/v1/batches", json={"urls": urls}, headers=rich["headers"])
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]
    single = client.post(
        "/v1/jobs", json={"url": "https://images.example.com/s.jpg"}, headers=rich["headers"]
    )
    assert single.status_code == 202, single.get_json()
    assert_exact(sessions)
    # No worker: everything is queued, so the cancel refunds all 120 lines.
    assert client.post(f"/v1/batches/{batch_id}/cancel", headers=rich["headers"]).status_code == 200
    assert_exact(sessions)
    assert client.delete(f"/v1/batches/{batch_id}", headers=rich["headers"]).status_code == 204
    # A queued single job taken back unstarted: its charge row goes (void_charges).
    job_id = single.get_json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=rich["headers"]).status_code in (204, 409)
    assert_exact(sessions)


def test_counts_stay_exact_through_retention_and_a_users_deletion(api_stack, sessions):
    user_id = support.new_account(sessions, tokens=10, prefix="cnt")
    old = utcnow() - timedelta(days=40)
    with sessions() as s:
        s.add_all(
            Job(
                id=new_id(),
                user_id=user_id,
                model="mobilenet",
                status=status,
                created_at=old,
                completed_at=old if status != "queued" else None,
            )
            for status in ("succeeded", "failed", "canceled", "queued")
        )
        s.commit()
    assert_exact(sessions)
    purged = Retention.build(api_stack.config.replace(retention_days=30)).run_once()
    assert purged.get("jobs", 0) >= 3, purged
    assert_exact(sessions)
    with sessions() as s:  # as an operator would: the cascade takes jobs and ledger rows
        s.execute(text("DELETE FROM users WHERE id = :id"), {"id": user_id})
        s.commit()
    assert_exact(sessions)


def test_a_bulk_statement_adds_one_counter_row_per_status(api_stack, sessions):
    """PostgreSQL counts per statement (transition tables), not per row; SQLite keeps one
    row per label. Either way a 2,000-row statement leaves the counters table small.
    (An executemany is one statement per row on PostgreSQL: shared.db.bulk_insert COPYs
    from 32 rows up.)"""
    user_id = support.new_account(sessions, prefix="cnt")
    rows = [
        {"id": new_id(), "user_id": user_id, "model": "mobilenet", "status": "queued"}
        for _ in range(2000)
    ]
    with sessions() as s:
        read_counters(s)  # folded: one row per label
        before = s.scalar(select(func.count()).select_from(Counter))
        s.execute(insert(Job).values(rows))  # one statement, as COPY is
        s.execute(text("UPDATE jobs SET status = 'canceled' WHERE user_id = :u"), {"u": user_id})
        s.commit()
        grown = s.scalar(select(func.count()).select_from(Counter)) - before
    assert grown <= 3  # queued +2,000; queued -2,000 and canceled +2,000
    assert_exact(sessions)


def test_metrics_report_every_status_from_the_counters(api_stack, sessions):
    text_out = api_stack.client().get("/metrics").get_data(as_text=True)
    jobs = {
        sample.labels["status"]: sample.value
        for family in text_string_to_metric_families(text_out)
        if family.name == "imgclf_jobs"
        for sample in family.samples
    }
    assert set(jobs) == {s.value for s in JobStatus}
    counted = _counted(sessions)["jobs"]
    assert jobs == {s.value: counted.get(s.value, 0) for s in JobStatus}
