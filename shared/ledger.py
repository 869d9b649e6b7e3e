"""Token ledger operations. Each runs inside the caller's transaction.

The balance on ``users.tokens`` is a cached sum of ``token_ledger``: every
function here changes both in the same transaction, and the conditional
UPDATE (``tokens >= n``) plus the CHECK constraint keep concurrent charges
from ever taking a balance below zero.
"""

from __future__ import annotations

from collections import Counter
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


def charge_jobs(session: Session, user_id: int, job_ids: Sequence[str]) -> int:
    """Take one token per job, a charge row each (its first run: 0), or raise
    InsufficientTokens and take nothing. For single jobs (a bulk batch's lines, and the
    lines a retry re-queues, are charged by ``charge_batch``)."""
    new_balance = _take(session, user_id, len(job_ids))
    bulk_insert(session, ENTRIES, [_entry(user_id, -1, CHARGE, j, 0) for j in job_ids])
    return new_balance


def charge_batch(session: Session, user_id: int, batch_id: str, lines: int, run: int = 0) -> int:
    """Take one token per line of a bulk batch's charge, in ONE ledger row (delta -lines,
    no job_id), or raise InsufficientTokens and take nothing; returns the new balance.

    ``run``: 0 for the lines of a new batch, else the batch's run that retries its failed
    lines (``batches.retries`` once the retry is made); one charge per batch and run (a
    unique index). A line's refund stays a row of its own, keyed by the line's run
    (``refund_job``); a line withdrawn unstarted shrinks this row (``void_charges``).
    A row per line was about 200 bytes of every finished line (issue #26).
    """
    if lines < 1:
        raise ValueError("a batch charge covers at least one line")
    new_balance = _take(session, user_id, lines)
    row = _entry(user_id, -lines, CHARGE, None, run)
    session.execute(insert(ENTRIES), {**row, "batch_id": batch_id})
    return new_balance


def _take(session: Session, user_id: int, n: int) -> int:
    """Take n tokens off the balance, or raise InsufficientTokens and take nothing."""
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


def _entry(user_id: int, delta: int, reason: str, job_id: str | None, run: int) -> dict:
    # Core inserts skip ORM defaults, so every column is given here.
    return {
        "user_id": user_id,
        "delta": delta,
        "reason": reason,
        "job_id": job_id,
        "batch_id": None,
        "retry": run,
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
        session, ENTRIES, [_entry(user_id, 1, REFUND, j, (runs or {}).get(j, 0)) for j in job_ids]
    )


def void_charges(session: Session, user_id: int, lines: Mapping[str, str | None]) -> None:
    """Undo the charges of jobs the caller just took back unstarted (their message may never
    have reached a worker): their charges go and the tokens come back, so the answer can
    truly say nothing was charged. ``lines``: each job id the caller's conditional DELETE
    returned, with its batch (None for a single job). A job deleted unstarted was never
    retried: its one charge is run 0.

    A line of a batch charged in one row (``charge_batch``) has no row of its own: the
    batch's run-0 row shrinks by such lines, and goes when none is left. A single job's
    charge row is deleted, and so is a line's of a batch accepted before migration 0010.
    A job whose charge is not found raises: the caller's rollback keeps it, charged.
    """
    if not lines:
        return
    shares = Counter(_by_batch_row(session, user_id, lines))
    own = [job for job, batch in lines.items() if batch not in shares]
    if own:
        gone = session.execute(
            delete(ENTRIES).where(
                ENTRIES.c.user_id == user_id,
                ENTRIES.c.job_id.in_(own),
                ENTRIES.c.reason == CHARGE,
            )
        )
        if rowcount(gone) != len(own):
            raise RuntimeError(f"{len(own) - rowcount(gone)} withdrawn job(s) had no charge row")
    for batch_id, count in shares.items():
        _void_share(session, user_id, batch_id, count)
    # Exactly the tokens whose charges went, so the balance stays the sum of the ledger.
    session.execute(
        update(USERS).where(USERS.c.id == user_id).values(tokens=USERS.c.tokens + len(lines))
    )


def _by_batch_row(session: Session, user_id: int, lines: Mapping[str, str | None]) -> list[str]:
    """The batch of each line in ``lines`` whose batch was charged in one row (run 0)."""
    batch_ids = {batch for batch in lines.values() if batch is not None}
    if not batch_ids:
        return []
    one_row = set(
        session.scalars(
            select(ENTRIES.c.batch_id).where(
                ENTRIES.c.user_id == user_id,
                ENTRIES.c.batch_id.in_(batch_ids),
                ENTRIES.c.reason == CHARGE,
                ENTRIES.c.retry == 0,
            )
        )
    )
    return [batch for batch in lines.values() if batch is not None and batch in one_row]


def _void_share(session: Session, user_id: int, batch_id: str, lines: int) -> None:
    """Take ``lines`` lines out of a batch's run-0 charge row: delete it if they are all
    it covers, else shrink it; raise (the caller rolls back) if it covers fewer."""
    row = (
        ENTRIES.c.user_id == user_id,
        ENTRIES.c.batch_id == batch_id,
        ENTRIES.c.reason == CHARGE,
        ENTRIES.c.retry == 0,
    )
    if rowcount(session.execute(delete(ENTRIES).where(*row, ENTRIES.c.delta == -lines))):
        return
    shrunk = session.execute(
        update(ENTRIES).where(*row, ENTRIES.c.delta < -lines).values(delta=ENTRIES.c.delta + lines)
    )
    if not rowcount(shrunk):
        raise RuntimeError(f"batch {batch_id}'s charge does not cover {lines} withdrawn line(s)")
