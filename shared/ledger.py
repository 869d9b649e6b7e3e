"""Token ledger operations. Each runs inside the caller's transaction.

The balance on ``users.tokens`` is a cached sum of ``token_ledger``: every
function here changes both in the same transaction, and the conditional
UPDATE (``tokens >= n``) plus the CHECK constraint keep concurrent charges
from ever taking a balance below zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import CTE, Table, delete, insert, literal, null, select, update
from sqlalchemy.orm import Session

from shared.db import bulk_insert, rowcount
from shared.errors import InsufficientTokens
from shared.models import LedgerEntry, User, utcnow

# Typed as the Tables they are (declarative classes declare __table__ as a FromClause).
USERS = cast(Table, User.__table__)
ENTRIES = cast(Table, LedgerEntry.__table__)

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
    users = USERS
    # On the table, not the entity: the ORM's UPDATE would also search the session's
    # identity map for User objects to synchronise, a cost on every submission.
    new_balance = session.execute(
        update(users)
        .where(users.c.id == user_id, users.c.tokens >= n)
        .values(tokens=users.c.tokens - n)
        .returning(users.c.tokens)
    ).scalar_one_or_none()
    if new_balance is None:
        raise insufficient(session, user_id, n)
    bulk_insert(
        session,
        ENTRIES,
        [_entry(user_id, -1, CHARGE, j, runs) for j in job_ids],
    )
    return new_balance


def charge_one(user_id: Any, job_id: Any, at: Any) -> tuple[CTE, CTE]:
    """The charge of one token for one job, as data-modifying CTEs for a statement that
    also inserts the job (``shared.jobs.insert_charged``): one round trip. PostgreSQL only.

    ``charged`` is ``UPDATE users SET tokens = tokens - 1 WHERE id = user_id AND tokens >= 1
    RETURNING id``: one row when the balance covers the job, none otherwise; ``entry``
    inserts the job's ledger row selecting from it, so a short balance writes nothing.
    The arguments are SQL expressions (the statement's bound parameters).
    """
    users, entries = USERS, ENTRIES
    charged = (
        update(users)
        .where(users.c.id == user_id, users.c.tokens >= 1)
        .values(tokens=users.c.tokens - 1)
        .returning(users.c.id)
        .cte("charged")
    )
    entry = insert(entries).from_select(
        ["user_id", "delta", "reason", "job_id", "retry", "actor_id", "created_at"],
        select(charged.c.id, literal(-1), literal(CHARGE), job_id, literal(0), null(), at),
    )
    return charged, entry.cte("entry")


def insufficient(session: Session, user_id: int, cost: int) -> InsufficientTokens:
    """The 402 for a charge of ``cost`` tokens that the balance did not cover."""
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
    bulk_insert(session, ENTRIES, [_entry(user_id, 1, REFUND, j, runs) for j in job_ids])


def void_charges(session: Session, user_id: int, job_ids: Sequence[str]) -> None:
    """Undo the charges of jobs the caller just took back unstarted (their message may never
    have reached a worker): the charge rows go and the tokens come back, so the answer can
    truly say nothing was charged. Call only with the ids a conditional DELETE returned
    (a job deleted unstarted was never retried: its one charge is run 0)."""
    if not job_ids:
        return
    result = session.execute(
        delete(LedgerEntry).where(
            LedgerEntry.user_id == user_id,
            LedgerEntry.job_id.in_(list(job_ids)),
            LedgerEntry.reason == CHARGE,
        )
    )
    voided = rowcount(result)
    # Exactly the tokens whose rows went, so the balance stays the sum of the ledger.
    if voided:
        session.execute(update(User).where(User.id == user_id).values(tokens=User.tokens + voided))
