"""The ledger as each job sees it, for tests that check charges and refunds per job.

A single job has a charge row of its own; a bulk batch's lines are charged together,
one row per batch and run (``shared.ledger.charge_batch``). A line whose ``retries``
is r was charged for each of its runs 0..r, so the batch's rows must add up to exactly
its lines' runs: ``per_job`` checks that (for batches that still have lines), then
lists each line's charges by run.
"""

from __future__ import annotations

from collections import Counter, defaultdict

from sqlalchemy import func, select

from shared.models import Job, LedgerEntry


def per_job(session, user_id: int) -> dict[str, list[tuple[str, int]]]:
    """Each job's ledger entries as ``(reason, run)``, charges and refunds in run order.

    The charges of a line charged with its batch are those its batch's rows imply; the
    function fails if those rows charged more or fewer tokens than the lines' runs.
    """
    out: dict[str, list[tuple[str, int]]] = defaultdict(list)
    rows = session.execute(
        select(LedgerEntry.job_id, LedgerEntry.reason, LedgerEntry.retry).where(
            LedgerEntry.user_id == user_id, LedgerEntry.job_id.is_not(None)
        )
    )
    for job_id, reason, run in rows:
        out[job_id].append((reason, run))
    charged = dict(
        session.execute(
            select(LedgerEntry.batch_id, -func.sum(LedgerEntry.delta))
            .where(
                LedgerEntry.user_id == user_id,
                LedgerEntry.batch_id.is_not(None),
                LedgerEntry.reason == "charge",
            )
            .group_by(LedgerEntry.batch_id)
        ).all()
    )
    runs: Counter[str] = Counter()
    lines = session.execute(
        select(Job.id, Job.batch_id, Job.retries).where(Job.batch_id.in_(list(charged)))
    )
    for job_id, batch_id, retries in lines:
        runs[batch_id] += retries + 1
        out[job_id].extend(("charge", run) for run in range(retries + 1))
    # A batch deleted (or purged) keeps its charge rows and has no lines left to compare.
    assert {b: charged[b] for b in runs} == dict(runs), (charged, runs)
    return {job_id: sorted(entries, key=lambda e: (e[1], e[0])) for job_id, entries in out.items()}


def reasons(session, user_id: int, job_id: str) -> list[str]:
    """One job's ledger reasons, sorted (``per_job``)."""
    return sorted(reason for reason, _run in per_job(session, user_id).get(job_id, []))
