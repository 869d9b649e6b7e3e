"""Job representation and every job status transition, for the API and the worker alike.

This module is the one writer of ``jobs.status`` (and the bookkeeping that moves with
it: claim, attempts, retries, outcome); batch-level transitions (cancel, completion,
reopen) live in shared/batches.py, which owns batches, and the dispatch window's
``dispatched_at`` marks in shared/dispatch.py. It is also the one place that builds and
inserts new job rows (``new_row``, ``insert_charged``, ``insert_new``), for single jobs
and bulk batches alike. A token moves only through shared/ledger.py, called here in the
same transaction as the transition (or insert) that earns it.

Every transition is an ``UPDATE ... WHERE status IN (...)``: whoever changes the
row first wins, and a second attempt (a redelivered message, a cancel racing
the worker) changes nothing and refunds nothing.

The statements are SQLAlchemy Core on the ``jobs`` table, not ORM-enabled UPDATEs:
the worker runs a claim and a write per batch, and at batch 1 the ORM's statement
set-up and the Job objects it loaded cost more CPU than the worker's SQL round trips
(issue #22). A claimed job is a ``Row`` of every ``jobs`` column, read like a ``Job``
(``row.id``, ``row.status``) but never tracked by a session.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import (
    ARRAY,
    JSON,
    BindParameter,
    ColumnElement,
    Engine,
    Insert,
    Row,
    Table,
    Text,
    Update,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy import cast as sql_cast
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session

from shared import ledger, webhook_events
from shared.db import DriverStatement, bulk_insert, commits_async, dump_json, one_statement
from shared.models import Job, as_utc, is_row_id, new_id, utcnow
from shared.results import pack
from shared.status import ACTIVE, TERMINAL, JobStatus

# Typed as the Table it is (declarative classes declare __table__ as a FromClause).
JOBS = cast(Table, Job.__table__)
#: A job as a claim or a transition's RETURNING read it: every column, by attribute.
JobRow = Row[Any]
ACTIVE_VALUES = tuple(s.value for s in ACTIVE)


#: A new job's value of every column that has one before anything happens to it: the
#: model's own scalar defaults (shared/models.py spells them, once), and NULL for the
#: other nullable columns. Core inserts and COPY skip the model's defaults, so every row
#: is built from this (``new_row``); computed once, at import.
NEW_JOB: dict[str, Any] = {
    c.name: getattr(c.default, "arg", None)
    for c in JOBS.c
    if (c.default is not None and c.default.is_scalar) or (c.default is None and c.nullable)
}


def new_row(*, user_id: int, model: str, top_k: int, **columns: Any) -> dict[str, Any]:
    """A new job's row, every ``jobs`` column, for ``insert_charged`` or ``insert_new``:
    ``NEW_JOB``'s values unless ``columns`` gives them, and a fresh ``id`` and
    ``created_at`` unless given (a batch gives its lines one ``created_at``).

    A plain dict, no ORM object: a bulk batch builds 10,000 of them, and a single
    submission is the service's hottest path.
    """
    row = {**NEW_JOB, "user_id": user_id, "model": model, "top_k": top_k, **columns}
    if "id" not in columns:
        row["id"] = new_id()
    if "created_at" not in columns:
        row["created_at"] = utcnow()
    return row


def insert_charged(session: Session, row: Mapping[str, Any], alone: bool = False) -> None:
    """Insert a new job (``new_row``) and charge its user one token, in the caller's
    transaction, or raise InsufficientTokens and write nothing. ``alone``: the
    transaction holds nothing else, so on PostgreSQL the statement runs on the driver
    and commits by itself (``_alone``).

    The hottest write of the service (POST /v1/jobs). On PostgreSQL it is one statement,
    one round trip: the ledger's charge (``ledger.charge_one``) in data-modifying CTEs and
    this INSERT selecting from its RETURNING, so when the balance is short nothing is
    inserted (``_charged_insert``). SQLite has no data-modifying CTEs: there it is
    ``ledger.charge_jobs`` and an INSERT, three statements in-process.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Prefixed names: a parameter named after a users column (id, created_at) would
        # become a SET of the charge's UPDATE.
        params = {f"job_{name}": value for name, value in row.items()}
        if not _execute(session, _charged_insert(), params, alone):
            raise ledger.insufficient(session, row["user_id"], 1)
        return
    ledger.charge_jobs(session, row["user_id"], [row["id"]])
    # Core, the row as parameters: the statement is the same each time, compiled once.
    session.execute(insert(JOBS), dict(row))


@functools.cache
def _charged_insert() -> Insert:
    """WITH charged AS (UPDATE users ... RETURNING id), entry AS (INSERT INTO token_ledger
    ... SELECT ... FROM charged) INSERT INTO jobs ... SELECT ... FROM charged RETURNING id.

    Built once: its parameters are the job's columns, so its compiled form (and
    psycopg's prepared statement) is reused by every submission.
    """

    def param(name: str) -> Any:
        return bindparam(f"job_{name}", type_=JOBS.c[name].type)

    charged, entry = ledger.charge_one(param("user_id"), param("id"), param("created_at"))
    columns = [c.name for c in JOBS.columns]
    job = select(*[charged.c.id if name == "user_id" else param(name) for name in columns])
    return insert(JOBS).from_select(columns, job).add_cte(entry).returning(JOBS.c.id)


def insert_new(session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert new jobs (``new_row``; a bulk batch's lines, already charged by the caller)
    in the caller's transaction: COPY on PostgreSQL from a few dozen rows up."""
    bulk_insert(session, JOBS, rows)


def iso(dt: datetime | None) -> str | None:
    if dt is None:
        return None
    return as_utc(dt).astimezone(UTC).isoformat().replace("+00:00", "Z")


def _error(job: Job | JobRow) -> dict[str, str] | None:
    if not job.error_code:
        return None
    return {"code": job.error_code, "message": job.error_message or ""}


def job_to_dict(job: Job | JobRow | Mapping[str, Any]) -> dict[str, Any]:
    """A job as every answer shows it: the API, the web pages and webhook events.

    ``job`` is an ORM ``Job``, a Core row of every ``jobs`` column (``JobRow``) or a new
    job's row as ``new_row`` built it.
    """
    if isinstance(job, Mapping):  # read by attribute, as the others are
        return job_to_dict(cast(JobRow, SimpleNamespace(**job)))
    error = _error(job)
    source = {"url": job.input_url} if job.input_url else {"filename": job.input_filename}
    webhook = {"url": job.webhook_url, "events": job.webhook_events} if job.webhook_url else None
    return {
        "id": job.id,
        "status": job.status,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "input": source,
        "model": job.model,
        "top_k": job.top_k,
        "result": job.result,
        "error": error,
        "batch_id": job.batch_id,
        "custom_id": job.custom_id,
        "retries": job.retries,
        "webhook": webhook,
        "request_id": job.request_id,
    }


def result_line(job: Job) -> dict[str, Any]:
    """A batch line as its results show it (GET /v1/batches/{id}/results, a row of the CSV)."""
    return {
        "index": job.batch_index,
        "custom_id": job.custom_id,
        "url": job.input_url,
        "status": job.status,
        "predictions": job.result["predictions"] if job.result else None,
        "error": _error(job),
        "retries": job.retries,
    }


def _transition(
    session: Session,
    job_ids: Iterable[str],
    from_: Iterable[JobStatus],
    *still: ColumnElement[bool],
    **values: Any,
) -> set[str]:
    """Move the jobs still in ``from_`` (and matching ``still``) to ``values``.

    Returns the ids whose move won.
    """
    return set(_transition_runs(session, job_ids, from_, *still, **values))


def _transition_runs(
    session: Session,
    job_ids: Iterable[str],
    from_: Iterable[JobStatus],
    *still: ColumnElement[bool],
    **values: Any,
) -> dict[str, int]:
    """``_transition``, returning each won job's ``retries`` as the move wrote it: the run
    a refund belongs to, read in the same statement (a retry may have run the job again
    since the caller loaded it)."""
    moved = _moved(session, job_ids, from_, *still, returning=(JOBS.c.id, JOBS.c.retries), **values)
    return {row.id: row.retries for row in moved}


def _moved(
    session: Session,
    job_ids: Iterable[str],
    from_: Iterable[JobStatus],
    *still: ColumnElement[bool],
    returning: Iterable[ColumnElement[Any]],
    **values: Any,
) -> list[JobRow]:
    """The one UPDATE of the transitions above: ``returning`` of each job that moved."""
    return list(
        session.execute(
            update(JOBS)
            .where(
                JOBS.c.id.in_(list(job_ids)), JOBS.c.status.in_([s.value for s in from_]), *still
            )
            .values(**values)
            .returning(*returning)
        ).all()
    )


#: The columns a worker reads to process a job (``claim_alone`` returns these).
WORK_COLUMNS = (
    "id",
    "user_id",
    "batch_id",
    "model",
    "top_k",
    "input_url",
    "status",
    "attempts",
    "retries",
    "claimed_by",
    "webhook_url",
    "webhook_events",
    "request_id",
)


def _ids_match(dialect: str, name: str) -> ColumnElement[bool]:
    """``id`` among the list bound as ``name``: ``= ANY(array)`` on PostgreSQL, one SQL
    text for every list length (psycopg prepares it once; an expanding IN is re-rendered
    per call), an expanding ``IN`` elsewhere."""
    if dialect == "postgresql":
        # An array of the column's own type (uuid): ``uuid = ANY(varchar[])`` has no operator.
        return JOBS.c.id == any_(bindparam(name, type_=ARRAY(JOBS.c.id.type)))
    return JOBS.c.id.in_(bindparam(name, expanding=True))


def _is_active(dialect: str) -> ColumnElement[bool]:
    """``status`` among ``ACTIVE``: ``= ANY(array)`` on PostgreSQL, a parameter like any
    other (an expanding ``IN`` is re-rendered per call, and a ``DriverStatement`` renders
    none), an ``IN`` elsewhere."""
    if dialect == "postgresql":
        return JOBS.c.status == any_(literal(list(ACTIVE_VALUES), ARRAY(JOBS.c.status.type)))
    return JOBS.c.status.in_(ACTIVE_VALUES)


def _async_where(dialect: str, commit_async: bool) -> list[ColumnElement[bool]]:
    """``shared.db.commits_async`` where asked for and the database has it (PostgreSQL)."""
    return [commits_async()] if commit_async and dialect == "postgresql" else []


@functools.cache
def _claim_statement(dialect: str, plain: bool, commit_async: bool = False) -> Update:
    """Built once per dialect: a statement built per call cost more CPU than its round trip."""
    now: BindParameter[datetime] = bindparam("claim_now")
    where = [_ids_match(dialect, "claim_ids"), _is_active(dialect)]
    # A RETURNING column costs the driver a description entry on every execution.
    returning = [JOBS.c[name] for name in WORK_COLUMNS] if plain else list(JOBS.c)
    if plain:
        where.append(JOBS.c.webhook_url.is_(None))
    where += _async_where(dialect, commit_async)
    return (
        update(JOBS)
        .where(*where)
        .values(
            status=JobStatus.PROCESSING.value,
            attempts=JOBS.c.attempts + 1,
            claimed_at=now,
            claimed_by=bindparam("claim_by"),
            started_at=case((JOBS.c.started_at.is_(None), now), else_=JOBS.c.started_at),
        )
        .returning(*returning)
    )


def _claim(
    session: Session,
    job_ids: list[str],
    worker_id: str | None,
    plain: bool,
    commit_async: bool = False,
):
    connection = session.connection()
    stmt = _claim_statement(connection.dialect.name, plain, commit_async)
    return list(connection.execute(stmt, _claim_params(job_ids, worker_id)))


def _claim_params(job_ids: list[str], worker_id: str | None) -> dict[str, Any]:
    # An id no row can have (a malformed message) is left out, as a job that does not
    # exist is: PostgreSQL would refuse the whole uuid array, and the message come back.
    ids = [job_id for job_id in job_ids if is_row_id(job_id)]
    return {"claim_ids": ids, "claim_now": utcnow(), "claim_by": worker_id}


def claim(session: Session, job_ids: list[str], worker_id: str | None) -> list[JobRow]:
    """Mark the active jobs among ``job_ids`` processing by ``worker_id``; a final job is
    skipped.

    A job processing elsewhere is taken over: its message came back, so its worker
    is presumed gone (a duplicate message costs work, never a second outcome). Returns
    the claimed rows as the UPDATE wrote them (Core rows of every column, see
    ``JobRow``); the caller commits.
    """
    # One round trip: the claimed rows come back with RETURNING (PostgreSQL, SQLite >= 3.35).
    return _claim(session, job_ids, worker_id, plain=False)


def claim_alone(session: Session, job_ids: list[str], worker_id: str | None) -> list[JobRow]:
    """``claim`` of the jobs among ``job_ids`` that have no webhook (the worker's hot
    path), as a statement of its own (``_alone``) that commits without waiting for the
    disk (``shared.db.commits_async``; PostgreSQL). Rows carry only ``WORK_COLUMNS``.
    """
    stmt = _claim_statement(session.get_bind().dialect.name, plain=True, commit_async=True)
    return _execute(session, stmt, _claim_params(job_ids, worker_id), alone=True)


def _execute(
    session: Session, stmt: Update | Insert, params: dict[str, Any], alone: bool
) -> list[JobRow]:
    """``stmt``'s rows, run in the session's transaction, or as a statement of its own
    where ``alone`` (``_alone`` says where: on PostgreSQL, on the driver)."""
    engine = _alone(session) if alone else None
    if engine is None:
        return list(session.execute(stmt, params))
    return _driver_statement(stmt, engine.dialect).rows(engine, params)


def _alone(session: Session) -> Engine | None:
    """Where a statement of its own runs. On PostgreSQL with no transaction open: on the
    driver (the engine returned; ``shared.db.DriverStatement``), one round trip that
    commits by itself. Otherwise (SQLite, or a session bound to a connection) in the
    session: None, with its next transaction made autocommit on PostgreSQL
    (``shared.db.one_statement``), for the caller to commit."""
    bind = session.get_bind()
    on_driver = isinstance(bind, Engine) and bind.dialect.name == "postgresql"
    if on_driver and not session.in_transaction():
        return cast(Engine, bind)
    one_statement(session)
    return None


@functools.cache
def _driver_statement(stmt: Update | Insert, dialect: Dialect) -> DriverStatement:
    # Compiled once per dialect (it holds the JSON serializer the binds use), not per
    # engine: a cached engine would keep its pool's connections open. Its rows are the
    # statement's own RETURNING columns, so callers do not name them a second time.
    return DriverStatement(stmt, dialect, stmt.exported_columns)


@functools.cache
def _succeeded_one_statement(dialect: str, commit_async: bool, rows: bool) -> Update:
    """The success write of a lone job: its id and result bound as they are."""
    result = bindparam("done_result", type_=JOBS.c.result.type)
    return _succeeded(dialect, commit_async, rows, JOBS.c.id == bindparam("done_id"), result)


@functools.cache
def _succeeded_many_statement(commit_async: bool, rows: bool) -> Update:
    """PostgreSQL's success write for several jobs: one SQL text for every batch size
    (psycopg prepares it once), each result paired with its id by ``unnest``."""
    done = (
        func.unnest(
            bindparam("done_ids", type_=ARRAY(JOBS.c.id.type)),
            bindparam("done_results", type_=ARRAY(Text())),
        )
        .table_valued("id", "result")
        .render_derived(name="done")
    )
    result = sql_cast(done.c.result, JSON)
    return _succeeded("postgresql", commit_async, rows, JOBS.c.id == done.c.id, result)


def _succeeded(
    dialect: str,
    commit_async: bool,
    rows: bool,
    matched: ColumnElement[bool],
    result: ColumnElement[Any],
) -> Update:
    """The success write the two above share: the ``matched`` jobs still active get
    ``result``, at the time bound as ``done_now``."""
    return (
        update(JOBS)
        .where(matched, _is_active(dialect), *_async_where(dialect, commit_async))
        .values(
            status=JobStatus.SUCCEEDED.value,
            result=result,
            completed_at=bindparam("done_now"),
            claimed_by=None,
        )
        .returning(*_returned(rows))
    )


def _returned(rows: bool) -> Iterable[ColumnElement[Any]]:
    """What a success's UPDATE returns: whole rows (``mark_all_succeeded_rows``), or ids."""
    return JOBS.c if rows else (JOBS.c.id,)


def mark_all_succeeded(
    session: Session,
    results: dict[str, dict[str, Any]],
    commit_async: bool = False,
    alone: bool = False,
) -> set[str]:
    """Store each job's result in one statement; returns the ids whose transition won.

    A worker's batch ends with one UPDATE, not one per job: each result is paired with
    its id by ``unnest`` of two arrays on PostgreSQL (one SQL text for every batch size,
    prepared once), by ``CASE id WHEN ... THEN ...`` on SQLite; RETURNING tells which
    jobs were still active (a job canceled or finished meanwhile keeps its outcome).
    ``commit_async``: the transaction commits without waiting for the disk
    (``shared.db.commits_async``; PostgreSQL). ``results`` are full results
    (``{"predictions": [...]}``); the column's type stores them compactly
    (``shared.results.StoredResult``). ``claimed_by`` is cleared: only the reconciler
    reads it, and only for processing jobs, so a finished row need not carry the
    worker's name (about 30 bytes a job, issue #26). ``alone``: the write is a
    statement of its own (``_alone``): on PostgreSQL one round trip on the driver.
    """
    return {row.id for row in _mark_succeeded(session, results, commit_async, False, alone)}


def mark_all_succeeded_rows(
    session: Session,
    results: dict[str, dict[str, Any]],
    commit_async: bool = False,
    alone: bool = False,
) -> dict[str, JobRow]:
    """``mark_all_succeeded``, returning each won job's whole row as the UPDATE wrote it
    (by id): what ``job_to_dict`` needs to answer a waiting request without a read."""
    return {row.id: row for row in _mark_succeeded(session, results, commit_async, True, alone)}


def _mark_succeeded(
    session: Session,
    results: dict[str, dict[str, Any]],
    commit_async: bool,
    rows: bool,
    alone: bool,
) -> list[JobRow]:
    if not results:
        return []
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql" or len(results) == 1:
        stmt, params = _succeeded_statement(dialect, results, commit_async, rows)
        return _execute(session, stmt, params, alone)
    # SQLite: the result picked per row by a CASE (no arrays there).
    result = case(
        {
            literal(job_id, JOBS.c.id.type): literal(value, JOBS.c.result.type)
            for job_id, value in results.items()
        },
        value=JOBS.c.id,
    )
    return _moved(
        session,
        results,
        ACTIVE,
        *_async_where(dialect, commit_async),
        returning=_returned(rows),
        status=JobStatus.SUCCEEDED.value,
        result=result,
        completed_at=utcnow(),
        claimed_by=None,
    )


def _succeeded_statement(
    dialect: str, results: dict[str, dict[str, Any]], commit_async: bool, rows: bool
) -> tuple[Update, dict[str, Any]]:
    """The success write's statement and parameters: a lone job's, or (PostgreSQL only)
    several jobs' in one text."""
    if len(results) == 1:  # a lone job: a statement built once, no unnest or CASE
        [(job_id, value)] = results.items()
        params = {"done_id": job_id, "done_result": value, "done_now": utcnow()}
        return _succeeded_one_statement(dialect, commit_async, rows), params
    params = {
        "done_ids": list(results),
        # The text StoredResult would bind: packed, then the engine's compact JSON.
        "done_results": [dump_json(pack(v)) for v in results.values()],
        "done_now": utcnow(),
    }
    return _succeeded_many_statement(commit_async, rows), params


def release_lost(session: Session, job_ids: Iterable[str], *still: ColumnElement[bool]) -> set[str]:
    """Give back processing jobs whose worker is gone, before they are re-sent.

    They stay ``processing`` (they did start), claimed by nobody; ``claimed_at``
    becomes the time of the re-send, so a re-sent message that is lost too is
    caught again after STALE_PROCESSING_S. ``still`` re-checks, in the same
    UPDATE, that no live worker claimed them meanwhile; returns the ids released.
    """
    return _transition(
        session,
        job_ids,
        (JobStatus.PROCESSING,),
        *still,
        claimed_by=None,
        claimed_at=utcnow(),
    )


def mark_failed(session: Session, job: Job | JobRow, code: str, message: str, refund: bool) -> bool:
    won = _transition_runs(
        session,
        [job.id],
        ACTIVE,
        status=JobStatus.FAILED.value,
        error_code=code,
        error_message=message[:2000],
        completed_at=utcnow(),
    )
    if won and refund:
        ledger.refund_job(session, job.user_id, job.id, won[job.id])
    return bool(won)


def cancel(session: Session, job: Job) -> bool:
    """Cancel a job that has not started; refunds its token. False if it already started."""
    won = _transition_runs(
        session,
        [job.id],
        (JobStatus.QUEUED,),
        status=JobStatus.CANCELED.value,
        completed_at=utcnow(),
    )
    if won:
        ledger.refund_job(session, job.user_id, job.id, won[job.id])
    return bool(won)


def record_webhook(
    session: Session, job: Job | JobRow, choice: str, as_written: JobRow | None = None
) -> str | None:
    """Record job.started / job.completed for a job that asked for it; returns the event id.

    The event shows the job as just written: ``as_written`` (a RETURNING row of this
    transaction), else the row read again here.
    """
    if not job.webhook_url or not webhook_events.wants(job.webhook_events, choice):
        return None
    if as_written is None:
        as_written = session.execute(select(*JOBS.c).where(JOBS.c.id == job.id)).one()
    job = as_written
    return webhook_events.record(
        session,
        user_id=job.user_id,
        url=job.webhook_url,
        event_type=f"job.{choice}",
        data=job_to_dict(job),
        job_id=job.id,
    )


def withdraw_unstarted(session: Session, user_id: int, *where: ColumnElement[bool]) -> list[str]:
    """Delete the matching jobs that are still ``queued`` and void their charges.

    The submission's undo when the queue failed after the commit. The conditional
    DELETE is a status transition like the worker's claim, so exactly one of them
    wins per job: a job a worker already claimed stays, charged. Returns the ids
    deleted; the caller commits.
    """
    removed = dict(
        session.execute(
            delete(Job)
            .where(*where, Job.status == JobStatus.QUEUED.value)
            .returning(Job.id, Job.batch_id)  # a batch line's charge is its batch's row
            .execution_options(synchronize_session=False)
        ).all()
    )
    ledger.void_charges(session, user_id, removed)
    return list(removed)


def cancel_queued(session: Session, user_id: int, *where: ColumnElement[bool]) -> list[str]:
    """queued -> canceled for the matching jobs, one refund (of its current run) per job
    actually changed. Returns the ids canceled; the caller commits."""
    runs = dict(
        session.execute(
            update(Job)
            .where(*where, Job.status == JobStatus.QUEUED.value)
            .values(status=JobStatus.CANCELED.value, completed_at=utcnow())
            .returning(Job.id, Job.retries)
            .execution_options(synchronize_session=False)
        ).all()
    )
    ledger.refund_jobs(session, user_id, list(runs), runs)
    return list(runs)


def requeue_failed(
    session: Session, batch_id: str, codes: Sequence[str] | None = None
) -> dict[str, int]:
    """failed -> queued for a batch's failed lines (only ``codes``, when given): a new run.

    ``retries`` goes up by one and the last run's outcome and worker bookkeeping are
    cleared (``attempts`` too, so the run gets JOB_MAX_ATTEMPTS deliveries of its own).
    Like every transition, a line that is no longer ``failed`` is not taken: of two
    concurrent retries each line goes to one. Returns {job id: its new ``retries``}, the
    run the caller charges; the caller charges and commits.
    """
    where = [Job.batch_id == batch_id, Job.status == JobStatus.FAILED.value]
    if codes:
        where.append(Job.error_code.in_(list(codes)))
    return dict(
        session.execute(
            update(Job)
            .where(*where)
            .values(
                status=JobStatus.QUEUED.value,
                retries=Job.retries + 1,
                attempts=0,
                result=None,
                error_code=None,
                error_message=None,
                started_at=None,
                completed_at=None,
                claimed_at=None,
                claimed_by=None,
                dispatched_at=None,  # waiting in SQL again, for shared.dispatch to send
            )
            .returning(Job.id, Job.retries)
            .execution_options(synchronize_session=False)
        ).all()
    )


def delete_finished(
    session: Session, *where: ColumnElement[bool], with_events: bool = True
) -> list[str]:
    """Delete the matching jobs that have ended; returns the ids deleted.

    Only a terminal job goes: nothing changes it any more, so no worker can be writing
    it. The ledger keeps its rows, and their job ids (the account's history).
    ``with_events`` (a user's DELETE) also drops the jobs' webhook events, delivered or
    not; retention leaves them to be purged by their own age, once delivered. The
    caller commits.
    """
    removed = list(
        session.scalars(
            delete(Job)
            .where(*where, Job.status.in_([s.value for s in TERMINAL]))
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )
    if with_events:
        webhook_events.forget(session, job_ids=removed)
    return removed
