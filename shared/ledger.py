"""Token ledger operations. Each runs inside the caller's transaction.

The balance on ``users.tokens`` is a cached sum of ``token_ledger``: every
function here changes both in the same transaction, and the conditional
UPDATE (``tokens >= n``) plus the CHECK constraint keep concurrent charges
from ever taking a balance below zero.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Insert, bindparam, delete, func, insert, literal, null, select, update
from sqlalchemy.orm import Session

from shared.db import bulk_insert
from shared.errors import InsufficientTokens
from shared.models import Job, LedgerEntry, User, utcnow

SIGNUP, CHARGE, REFUND, REFILL = "signup", "charge", "refund", "refill"


def grant(
    session: Session, user_id: int, amount: int, reason: str, actor_id: int | None = None
) -> int:
    """Add tokens (signup grant or admin refill); returns the new balance."""
    new_balance = session.execute(
        update(User)
        .where(User.id == user_id)
        .values(tokens=User.tokens + amount)
        .returning(User.tokens)
    ).scalar_one()
    session.add(LedgerEntry(user_id=user_id, delta=amount, reason=reason, actor_id=actor_id))
    return new_balance


def charge_jobs(
    session: Session, user_id: int, job_ids: Sequence[str], runs: Mapping[str, int] | None = None
) -> int:
    """Take one token per job, or raise InsufficientTokens and take nothing.

    ``runs``: each job's ``retries`` for a retried batch line (the run being charged);
    a job not in it is on its first run (0).
    """
    n = len(job_ids)
    users = User.__table__
    # On the table, not the entity: the ORM's UPDATE would also search the session's
    # identity map for User objects to synchronise, a cost on every submission.
    new_balance = session.execute(
        update(users)
        .where(users.c.id == user_id, users.c.tokens >= n)
        .values(tokens=users.c.tokens - n)
        .returning(users.c.tokens)
    ).scalar_one_or_none()
    if new_balance is None:
        raise _short(session, user_id, n)
    bulk_insert(
        session,
        LedgerEntry.__table__,
        [_entry(user_id, -1, CHARGE, j, runs) for j in job_ids],
    )
    return new_balance


def charge_new_job(session: Session, job_row: Mapping[str, Any]) -> None:
    """Take one token from the job's user, write its ledger row and insert the job, or
    raise InsufficientTokens and write nothing. ``job_row`` gives every ``jobs`` column.

    The hottest write of the service (POST /v1/jobs). On PostgreSQL it is one statement,
    one round trip: the conditional UPDATE and both INSERTs in data-modifying CTEs, the
    INSERTs selecting from the UPDATE's RETURNING, so when the balance is short nothing
    is inserted (see ``_charge_and_insert``). SQLite has no data-modifying CTEs: there it
    is ``charge_jobs`` and an INSERT, three statements in-process.
    """
    if session.get_bind().dialect.name == "postgresql":
        # Prefixed names: a parameter named after a users column (id, created_at) would
        # become a SET of the UPDATE.
        params = {f"job_{name}": value for name, value in job_row.items()}
        if session.execute(_charge_and_insert(), params).first() is None:
            raise _short(session, job_row["user_id"], 1)
        return
    charge_jobs(session, job_row["user_id"], [job_row["id"]])
    # Core, the row as parameters: the statement is the same each time, compiled once.
    session.execute(insert(Job.__table__), dict(job_row))


@functools.cache
def _charge_and_insert() -> Insert:
    """WITH charged AS (UPDATE users SET tokens = tokens - 1 WHERE id = :job_user_id AND
    tokens >= 1 RETURNING id), entry AS (INSERT INTO token_ledger ... SELECT ... FROM
    charged) INSERT INTO jobs ... SELECT ... FROM charged RETURNING id.

    Built once: its parameters are the job's columns, so its compiled form (and
    psycopg's prepared statement) is reused by every submission.
    """
    users, entries, jobs = User.__table__, LedgerEntry.__table__, Job.__table__

    def param(name: str) -> Any:
        return bindparam(f"job_{name}", type_=jobs.c[name].type)

    charged = (
        update(users)
        .where(users.c.id == param("user_id"), users.c.tokens >= 1)
        .values(tokens=users.c.tokens - 1)
        .returning(users.c.id)
        .cte("charged")
    )
    entry = insert(entries).from_select(
        ["user_id", "delta", "reason", "job_id", "retry", "actor_id", "created_at"],
        select(
            charged.c.id,
            literal(-1),
            literal(CHARGE),
            param("id"),
            literal(0),
            null(),
            param("created_at"),
        ),
    )
    columns = [c.name for c in jobs.columns]
    job = select(*[charged.c.id if name == "user_id" else param(name) for name in columns])
    return insert(jobs).from_select(columns, job).add_cte(entry.cte("entry")).returning(jobs.c.id)


def _short(session: Session, user_id: int, cost: int) -> InsufficientTokens:
    balance = session.execute(select(User.tokens).where(User.id == user_id)).scalar_one()
    # Users cannot buy tokens themselves: say who can add them.
    return InsufficientTokens(
        f"This needs {cost} token(s) and your balance is {balance}. "
        "An administrator adds tokens (POST /v1/admin/refill); ask yours for more.",
        details={"balance": balance, "cost": cost},
    )


def _entry(
    user_id: int, delta: int, reason: str, job_id: str, runs: Mapping[str, int] | None
) -> dict:
    # Core inserts skip ORM defaults, so every column is given here.
    return {
        "user_id": user_id,
        "delta": delta,
        "reason": reason,
        "job_id": job_id,
        "retry": (runs or {}).get(job_id, 0),
        "actor_id": None,
        "created_at": utcnow(),
    }


def refund_job(session: Session, user_id: int, job_id: str, run: int = 0) -> None:
    """Give a job's token back. Call only after winning the job's conditional status change,
    with the ``retries`` that change returned (the run being refunded)."""
    session.execute(update(User).where(User.id == user_id).values(tokens=User.tokens + 1))
    session.add(LedgerEntry(user_id=user_id, delta=1, reason=REFUND, job_id=job_id, retry=run))


def refund_jobs(
    session: Session, user_id: int, job_ids: Sequence[str], runs: Mapping[str, int] | None = None
) -> None:
    """Bulk ``refund_job`` for jobs whose conditional status change the caller just won."""
    if not job_ids:
        return
    session.execute(
        update(User).where(User.id == user_id).values(tokens=User.tokens + len(job_ids))
    )
    bulk_insert(
        session, LedgerEntry.__table__, [_entry(user_id, 1, REFUND, j, runs) for j in job_ids]
    )


def void_charges(session: Session, user_id: int, job_ids: Sequence[str]) -> None:
    """Undo the charges of jobs the caller just took back unstarted (their message may never
    have reached a worker): the charge rows go and the tokens come back, so the answer can
    truly say nothing was charged. Call only with the ids a conditional DELETE returned
    (a job deleted unstarted was never retried: its one charge is run 0)."""
    if not job_ids:
        return
    voided = session.execute(
        delete(LedgerEntry).where(
            LedgerEntry.user_id == user_id,
            LedgerEntry.job_id.in_(list(job_ids)),
            LedgerEntry.reason == CHARGE,
        )
    ).rowcount
    # Exactly the tokens whose rows went, so the balance stays the sum of the ledger.
    if voided:
        session.execute(update(User).where(User.id == user_id).values(tokens=User.tokens + voided))


def ledger_sum(session: Session, user_id: int) -> int:
    total = session.execute(
        select(func.coalesce(func.sum(LedgerEntry.delta), 0)).where(LedgerEntry.user_id == user_id)
    ).scalar_one()
    return int(total)
