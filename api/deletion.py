"""Deleting a finished job or an ended batch at once, with its input, result and webhook
events; the ledger keeps their charges and refunds (the account's history).

The DELETEs themselves are shared.jobs.delete_finished and shared.batches.delete_ended;
this module adds the caller's checks and their answers.
"""

from __future__ import annotations

import contextlib

from api.auth import owned
from api.bulk import locked_batch
from api.ratelimit import limits
from api.services import services, unit_of_work
from shared import batches, jobs
from shared.errors import Conflict
from shared.models import Job, User


def delete_job(user: User, job_id: str) -> None:
    """Delete the user's finished job; 409 while it runs or when it is a batch's line."""
    limits().check_deletion(user.id)
    with unit_of_work() as session:
        job = owned(Job, job_id, "job", user)
        if job.batch_id is not None:
            # A batch's counts are its jobs: one job less would make them lie.
            raise Conflict(
                f"The job belongs to batch {job.batch_id}; delete the whole batch "
                f"(DELETE /v1/batches/{job.batch_id}).",
                code="job_in_batch",
            )
        if not jobs.delete_finished(session, Job.id == job_id):
            raise Conflict(
                f"The job is {job.status}; cancel it first (POST /v1/jobs/{job_id}/cancel) "
                "or wait until it has finished, then delete it.",
                code="job_not_finished",
            )
    # Best effort: SQL already says the job is gone, and the upload's TTL removes it anyway.
    with contextlib.suppress(Exception):
        services().uploads.delete(job_id)


def delete_batch(user: User, batch_id: str) -> None:
    """Delete the user's ended batch and all its jobs; 409 while any line may still run."""
    limits().check_deletion(user.id)
    with unit_of_work() as session:
        batch = locked_batch(session, user, batch_id)
        if batch.completed_at is None:
            first = (
                ""
                if batch.canceled_at
                else f"cancel it first (POST /v1/batches/{batch_id}/cancel), "
            )
            raise Conflict(
                f"The batch is still running; {first}wait until its running jobs have "
                "finished (its completed_at is then set), then delete it.",
                code="batch_running",
            )
        batches.delete_ended(session, batch_id)
