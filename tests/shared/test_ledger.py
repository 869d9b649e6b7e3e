"""Ledger and job transitions on the real databases (PostgreSQL and SQLite)."""

import pytest
from sqlalchemy import event, select, update
from sqlalchemy.exc import IntegrityError

from harness.accounts import charged_job
from shared import batches, jobs, ledger
from shared.errors import InsufficientTokens
from shared.models import Batch, Job, LedgerEntry, User, new_id
from shared.status import JobStatus
from tests import ledger_lines, support


@pytest.fixture
def account(session):
    user = support.add_account(session, tokens=2, prefix="l")
    session.commit()
    return user


def _balance(session, user) -> int:
    session.expire_all()
    return session.get(User, user.id).tokens


def test_charge_takes_tokens_and_refuses_when_short(session, account):
    charged_job(session, account.id)
    charged_job(session, account.id)
    with pytest.raises(InsufficientTokens):
        ledger.charge_jobs(session, account.id, [new_id()])
    session.rollback()
    assert _balance(session, account) == 0
    assert support.ledger_sum(session, account.id) == 0


def test_failure_refunds_exactly_once(session, account):
    job = charged_job(session, account.id)
    assert jobs.mark_failed(session, job, "fetch_failed", "HTTP 404", refund=True)
    session.commit()
    # A redelivered batch tries again: the transition no longer applies, no second refund.
    assert not jobs.mark_failed(session, job, "fetch_failed", "HTTP 404", refund=True)
    session.commit()
    assert _balance(session, account) == 2
    assert support.ledger_sum(session, account.id) == 2


def test_success_cannot_be_overwritten_by_a_late_failure(session, account):
    job = charged_job(session, account.id)
    assert jobs.mark_all_succeeded(session, {job.id: {"predictions": []}}) == {job.id}
    assert not jobs.mark_failed(session, job, "internal_error", "late", refund=True)
    session.commit()
    session.expire_all()
    assert session.get(Job, job.id).status == JobStatus.SUCCEEDED
    assert _balance(session, account) == 1


def test_cancel_only_before_processing(session, account):
    queued, started = charged_job(session, account.id), charged_job(session, account.id)
    session.execute(update(Job).where(Job.id == started.id).values(status="processing"))
    session.commit()
    assert jobs.cancel(session, queued)
    assert not jobs.cancel(session, started)
    session.commit()
    assert _balance(session, account) == 1
    assert support.ledger_sum(session, account.id) == 1


def test_the_database_refuses_a_negative_balance(session, account):
    with pytest.raises(IntegrityError):
        session.execute(update(User).where(User.id == account.id).values(tokens=-1))
        session.flush()
    session.rollback()


def test_the_database_refuses_a_second_refund_row(session, account):
    job = charged_job(session, account.id)
    ledger.refund_job(session, account.id, job.id)
    session.commit()
    with pytest.raises(IntegrityError):
        ledger.refund_job(session, account.id, job.id)
        session.flush()
    session.rollback()


def test_batch_results_in_one_statement_go_to_their_own_jobs(session, account):
    ledger.grant(session, account.id, 2, ledger.REFILL)
    session.commit()
    first, second, third, canceled = (charged_job(session, account.id) for _ in range(4))
    session.execute(update(Job).where(Job.id == second.id).values(status="processing"))
    assert jobs.cancel(session, canceled)
    session.commit()
    results = {
        j.id: {"predictions": [{"label": f"label-{i}", "score": i / 10}]}
        for i, j in enumerate((first, second, third, canceled))
    }
    won = jobs.mark_all_succeeded(session, results)
    session.commit()
    assert won == {first.id, second.id, third.id}  # the canceled job keeps its outcome
    session.expire_all()
    for job in (first, second, third):
        stored = session.get(Job, job.id)
        assert (stored.status, stored.result) == (JobStatus.SUCCEEDED, results[job.id])
        assert stored.completed_at is not None
    assert session.get(Job, canceled.id).result is None
    # A redelivered batch writes nothing more.
    assert jobs.mark_all_succeeded(session, results) == set()


def test_a_success_write_runs_one_sql_text_whatever_the_batch_size(session, account):
    """On PostgreSQL the write of several successes is one text for any batch size
    (``unnest`` of ids and results), which psycopg prepares once; a ``CASE`` with a
    branch per job was a new text, compiled and planned, per size: 1.5-2.4 CPU ms more
    per batch of 16-32 in the worker, and 2.3-2.5 ms in PostgreSQL (bench.bookkeeping's
    steps, docs/benchmarks.md, session 12)."""
    engine = session.get_bind()
    if engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL's statement; SQLite's write is a CASE per job")
    ledger.grant(session, account.id, 7, ledger.REFILL)
    session.commit()

    def written(size: int) -> tuple[set[str], set[str]]:
        done = [charged_job(session, account.id) for _ in range(size)]
        results = {j.id: {"predictions": [{"label": "macaw", "score": 0.9}]} for j in done}
        seen: list[str] = []
        record = lambda *args: seen.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", record)
        try:
            rows = jobs.mark_all_succeeded_rows(session, results)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        session.commit()
        assert {i: r.result for i, r in rows.items()} == results
        return set(seen), set(rows)

    (two, _), (five, won) = written(2), written(5)
    assert two == five and len(won) == 5


def test_a_retried_line_is_charged_and_refunded_once_per_run(session, account):
    batch = Batch(id=new_id(), user_id=account.id, total=1, model="mobilenet")
    session.add(batch)
    session.flush()
    job = Job(id=new_id(), user_id=account.id, model="mobilenet", input_url="http://x/y.jpg")
    job.batch_id, job.batch_index = batch.id, 0
    ledger.charge_batch(session, account.id, batch.id, 1)
    session.add(job)
    session.commit()
    assert jobs.mark_failed(session, job, "fetch_failed", "HTTP 503", refund=True)
    session.commit()

    runs = jobs.requeue_failed(session, batch.id, ["fetch_failed"])
    assert runs == {job.id: 1}
    ledger.charge_batch(session, account.id, batch.id, len(runs), batch.retries + 1)
    batches.reopen(session, batch)
    session.commit()
    # A late worker of the first run still holds the job as it loaded it (retries 0):
    # its failure refunds the run it ended, the second one, once.
    assert job.retries == 0
    assert jobs.mark_failed(session, job, "fetch_failed", "HTTP 503", refund=True)
    assert not jobs.mark_failed(session, job, "fetch_failed", "HTTP 503", refund=True)
    session.commit()
    assert ledger_lines.per_job(session, account.id)[job.id] == [
        ("charge", 0),
        ("refund", 0),
        ("charge", 1),
        ("refund", 1),
    ]
    # One charge row per run of the batch, none per line.
    charges = session.execute(
        select(LedgerEntry.batch_id, LedgerEntry.job_id, LedgerEntry.delta, LedgerEntry.retry)
        .where(LedgerEntry.user_id == account.id, LedgerEntry.reason == ledger.CHARGE)
        .order_by(LedgerEntry.id)
    ).all()
    assert [tuple(r) for r in charges] == [(batch.id, None, -1, 0), (batch.id, None, -1, 1)]
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 2
    # A second charge of the same run is refused by the database itself.
    with pytest.raises(IntegrityError):
        ledger.charge_batch(session, account.id, batch.id, 1, 1)
        session.flush()
    session.rollback()
    # Only the lines failed with the codes asked for are taken.
    assert jobs.requeue_failed(session, batch.id, ["not_an_image"]) == {}


def test_a_claim_takes_active_jobs_once_and_skips_final_ones(session, account):
    first, second = charged_job(session, account.id), charged_job(session, account.id)
    assert jobs.cancel(session, second)
    session.commit()
    claimed = jobs.claim(session, [first.id, second.id], "worker-a")
    session.commit()
    assert [(j.id, j.status, j.attempts, j.claimed_by) for j in claimed] == [
        (first.id, JobStatus.PROCESSING.value, 1, "worker-a")
    ]
    started = claimed[0].started_at
    # A redelivery takes the job over: one more attempt, the first start kept.
    [again] = jobs.claim(session, [first.id], "worker-b")
    session.commit()
    assert (again.attempts, again.claimed_by, again.started_at) == (2, "worker-b", started)


def test_a_batch_cancel_refunds_its_queued_lines_and_ends_the_batch(session, account):
    batch = Batch(id=new_id(), user_id=account.id, total=2, model="mobilenet")
    session.add(batch)
    session.flush()
    lines = []
    for i in range(2):
        job = Job(id=new_id(), user_id=account.id, model="mobilenet", input_url="http://x/y.jpg")
        job.batch_id, job.batch_index = batch.id, i
        lines.append(job)
    ledger.charge_batch(session, account.id, batch.id, len(lines))
    session.add_all(lines)
    session.commit()
    jobs.claim(session, [lines[0].id], "worker-a")  # running: it finishes, charged
    session.commit()
    canceled, _events = batches.cancel(session, batches.lock(session, batch.id))
    session.commit()
    assert canceled == [lines[1].id]
    assert batch.canceled_at is not None and batch.completed_at is None
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 1
    assert jobs.mark_all_succeeded(session, {lines[0].id: {"predictions": []}})
    assert batches.complete_finished(session, [batch.id]) == []  # no webhook asked for
    session.commit()
    session.refresh(batch)
    assert batch.completed_at is not None


def _new_job_row(user) -> dict:
    """Every ``jobs`` column, as api/submission.py builds them for ``insert_charged``."""
    return jobs.new_row(
        user_id=user.id,
        model="mobilenet",
        top_k=5,
        input_url="http://x/y.jpg",
        webhook_url="http://hook/x",
        webhook_events=["completed"],
    )


def test_a_new_row_gives_every_column_with_the_models_defaults():
    """shared.jobs builds every new job's row (single and bulk) from the model's defaults."""
    row = jobs.new_row(user_id=1, model="mobilenet", top_k=3, input_url="http://x/y.jpg")
    assert set(row) == {c.name for c in Job.__table__.columns}
    assert (row["status"], row["attempts"], row["retries"], row["top_k"]) == ("queued", 0, 0, 3)
    assert row["dispatched_at"] is None and row["batch_id"] is None and row["id"]


def test_a_new_job_is_charged_and_inserted_together_or_not_at_all(session, account):
    """jobs.insert_charged: one statement on PostgreSQL, three on SQLite; the same rows."""
    statements = []
    engine = session.get_bind()
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listen)
    try:
        rows = [_new_job_row(account) for _ in range(3)]
        for row in rows[:2]:
            jobs.insert_charged(session, row)
        session.commit()
        # Not SQLite's BEGIN IMMEDIATE (shared/db.py), sent as a statement.
        charged_statements = len([s for s in statements if not s.startswith("BEGIN")])
        with pytest.raises(InsufficientTokens) as short:
            jobs.insert_charged(session, rows[2])
        session.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    per_job = 1 if engine.dialect.name == "postgresql" else 3
    assert charged_statements == 2 * per_job
    assert short.value.details == {"balance": 0, "cost": 1}
    assert _balance(session, account) == 0 == support.ledger_sum(session, account.id)
    stored = session.scalars(select(Job).where(Job.user_id == account.id)).all()
    assert sorted(j.id for j in stored) == sorted(r["id"] for r in rows[:2])
    job = session.get(Job, rows[0]["id"])
    assert (job.status, job.webhook_events, job.result, job.attempts) == (
        "queued",
        ["completed"],
        None,
        0,
    )
    charges = session.scalars(
        select(LedgerEntry).where(LedgerEntry.user_id == account.id, LedgerEntry.delta < 0)
    ).all()
    assert sorted((e.job_id, e.delta, e.reason, e.retry) for e in charges) == sorted(
        (r["id"], -1, ledger.CHARGE, 0) for r in rows[:2]
    )


def _batch(session, user, lines: int, charge=ledger.charge_batch) -> tuple[Batch, list[Job]]:
    """A batch of ``lines`` queued lines, never sent, charged by ``charge``: one row for
    the batch (``charge_batch``), or a row per line (``charge_jobs``, as before 0010)."""
    batch = Batch(id=new_id(), user_id=user.id, total=lines, model="mobilenet")
    session.add(batch)
    session.flush()
    made = []
    for i in range(lines):
        job = Job(id=new_id(), user_id=user.id, model="mobilenet", input_url="http://x/y.jpg")
        job.batch_id, job.batch_index = batch.id, i
        made.append(job)
    if charge is ledger.charge_batch:
        ledger.charge_batch(session, user.id, batch.id, lines)
    else:
        ledger.charge_jobs(session, user.id, [j.id for j in made])
    session.add_all(made)
    session.commit()
    return batch, made


def _charge_rows(session, user) -> list[tuple]:
    return [
        tuple(r)
        for r in session.execute(
            select(LedgerEntry.batch_id, LedgerEntry.job_id, LedgerEntry.delta)
            .where(LedgerEntry.user_id == user.id, LedgerEntry.reason == ledger.CHARGE)
            .order_by(LedgerEntry.id)
        )
    ]


def test_a_batch_is_charged_in_one_row_and_refunded_per_line(session, account):
    ledger.grant(session, account.id, 1, ledger.REFILL)
    batch, lines = _batch(session, account, 3)
    assert _charge_rows(session, account) == [(batch.id, None, -3)]
    assert jobs.mark_failed(session, lines[0], "fetch_failed", "HTTP 404", refund=True)
    session.commit()
    assert not jobs.mark_failed(session, lines[0], "fetch_failed", "HTTP 404", refund=True)
    session.commit()
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 1
    seen = ledger_lines.per_job(session, account.id)
    assert seen[lines[0].id] == [("charge", 0), ("refund", 0)]
    assert seen[lines[1].id] == seen[lines[2].id] == [("charge", 0)]
    with pytest.raises(InsufficientTokens):  # all or nothing
        ledger.charge_batch(session, account.id, new_id(), 2)
    session.rollback()
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 1


def test_a_cancel_withdraws_unsent_lines_out_of_the_batchs_row(session, account):
    ledger.grant(session, account.id, 1, ledger.REFILL)
    batch, lines = _batch(session, account, 3)
    # One line was sent (the dispatcher marked it): it stays and is refunded on its own.
    session.execute(update(Job).where(Job.id == lines[0].id).values(dispatched_at=batch.created_at))
    session.commit()
    canceled, _events = batches.cancel(session, batches.lock(session, batch.id))
    session.commit()
    assert sorted(canceled) == sorted(j.id for j in lines)
    # The two withdrawn lines left the row; the sent one is charged by it, and refunded.
    assert _charge_rows(session, account) == [(batch.id, None, -1)]
    assert ledger_lines.per_job(session, account.id) == {
        lines[0].id: [("charge", 0), ("refund", 0)]
    }
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 3


def test_a_cancel_of_a_batch_never_sent_leaves_no_charge(session, account):
    batch, _lines = _batch(session, account, 2)
    canceled, _events = batches.cancel(session, batches.lock(session, batch.id))
    session.commit()
    assert len(canceled) == 2
    assert _charge_rows(session, account) == []  # nothing was charged
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 2


def test_a_cancel_voids_the_line_rows_of_a_batch_charged_before_0010(session, account):
    """The upgrade path: a batch accepted by the previous release has a charge row per
    line; its cancel still voids exactly those."""
    batch, _lines = _batch(session, account, 2, charge=ledger.charge_jobs)
    canceled, _events = batches.cancel(session, batches.lock(session, batch.id))
    session.commit()
    assert len(canceled) == 2
    assert _charge_rows(session, account) == []
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 2


def test_a_cancel_after_a_retry_refunds_the_retried_lines_run(session, account):
    ledger.grant(session, account.id, 1, ledger.REFILL)
    batch, lines = _batch(session, account, 2)
    jobs.claim(session, [j.id for j in lines], "worker-a")
    assert jobs.mark_failed(session, lines[0], "fetch_failed", "HTTP 503", refund=True)
    assert jobs.mark_all_succeeded(session, {lines[1].id: {"predictions": []}})
    session.commit()
    runs = jobs.requeue_failed(session, batch.id, [])
    ledger.charge_batch(session, account.id, batch.id, len(runs), batch.retries + 1)
    batches.reopen(session, batch)
    session.commit()
    canceled, _events = batches.cancel(session, batches.lock(session, batch.id))
    session.commit()
    assert canceled == [lines[0].id]  # a retried line is canceled, not withdrawn
    assert _charge_rows(session, account) == [(batch.id, None, -2), (batch.id, None, -1)]
    assert ledger_lines.per_job(session, account.id)[lines[0].id] == [
        ("charge", 0),
        ("refund", 0),
        ("charge", 1),
        ("refund", 1),
    ]
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 2


def test_a_void_that_would_lose_tokens_raises(session, account):
    """A line withdrawn with no charge to void (not its own row, not its batch's) is a
    broken ledger: the withdrawal fails, and its rollback keeps the job and the balance."""
    _batch_made, lines = _batch(session, account, 1)
    with pytest.raises(RuntimeError):
        ledger.void_charges(session, account.id, {lines[0].id: new_id()})
    session.rollback()
    with pytest.raises(RuntimeError):
        ledger.void_charges(session, account.id, {new_id(): None})
    session.rollback()
    assert _balance(session, account) == support.ledger_sum(session, account.id) == 1
