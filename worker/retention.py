"""Retention: finished work older than ``RETENTION_DAYS`` is purged; the ledger is kept.

Every ``RETENTION_INTERVAL_S`` one worker of the cluster (a lease of its own elects
it: ``worker.periodic``) deletes:

- single jobs that ended (succeeded, failed, canceled) before the cutoff;
- batches that ended (``completed_at``: all their jobs are final) before the
  cutoff, with all their jobs: a batch's counts are its jobs, so they go together.
  Each chunk locks the batch row and re-checks the cutoff, and a retry refuses a
  batch with lines gone (410 ``batch_expired``): a batch is purged whole or kept whole;
- webhook events whose delivery ended (delivered or given up) before the cutoff,
  with their attempts. An event still to be delivered is never purged, even when
  its job is: it carries its own copy of what it reports;
- idempotency records past ``IDEMPOTENCY_TTL_S``: expired, they answer nothing.

The token ledger is never purged: it is the account's history, and a row whose job
is gone keeps its job id (it is no foreign key). Each transaction selects at most
``RETENTION_CHUNK`` ids and deletes those by id (a DELETE takes no LIMIT on both
databases), children before parents: a batch's jobs in chunks before the batch; an
event's attempts (a handful) in the same statement as the event, by ON DELETE
CASCADE. So no lock is held long, and the API and the workers keep writing between
chunks. A pass stops after ``RETENTION_INTERVAL_S`` (or before its next chunk when
its worker stops), and the next one goes on where it stopped.

``RETENTION_DAYS=0`` keeps everything. One-shot run: ``python -m worker.retention``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session, sessionmaker

from shared import batches, jobs, webhook_events
from shared.config import Config
from shared.db import make_engine, make_session_factory, rowcount
from shared.models import Batch, IdempotencyRecord, Job, WebhookEvent, utcnow
from shared.redis_client import make_redis
from shared.status import TERMINAL
from worker.periodic import Lease, Periodic

log = logging.getLogger(__name__)

FINAL = [s.value for s in TERMINAL]


@dataclass
class Retention:
    config: Config
    sessions: sessionmaker[Session]

    @classmethod
    def build(cls, config: Config) -> Retention:
        return cls(config, make_session_factory(make_engine(config)))

    def run_once(
        self, budget_s: float = math.inf, stop: threading.Event | None = None
    ) -> dict[str, int]:
        """One pass, for at most ``budget_s`` seconds and no further chunk once ``stop``
        is set (a worker shutting down); returns the rows purged per kind."""
        if not self.config.retention_days:
            return {}
        now = utcnow()
        cutoff = now - timedelta(seconds=self.config.retention_s)
        end = time.monotonic() + budget_s

        def more() -> bool:
            return time.monotonic() < end and not (stop is not None and stop.is_set())

        purged = {
            "jobs": self._drain(self._old_jobs(cutoff), self._delete_jobs, more),
            "batches": self._purge_batches(cutoff, more),
            "webhook_events": self._drain(
                select(WebhookEvent.id).where(WebhookEvent.completed_at < cutoff),
                webhook_events.delete_events,
                more,
            ),
            "idempotency_keys": self._drain(
                select(IdempotencyRecord.id).where(
                    IdempotencyRecord.created_at
                    < now - timedelta(seconds=self.config.idempotency_ttl_s)
                ),
                _delete_idempotency,
                more,
            ),
        }
        if any(purged.values()):
            log.info("retention: purged %s", ", ".join(f"{n} {k}" for k, n in purged.items()))
        return purged

    @staticmethod
    def _old_jobs(cutoff: datetime) -> Select:
        # A batch's jobs go with their batch only.
        return select(Job.id).where(
            Job.batch_id.is_(None), Job.completed_at < cutoff, Job.status.in_(FINAL)
        )

    @staticmethod
    def _delete_jobs(session: Session, ids: Sequence[str]) -> int:
        return len(jobs.delete_finished(session, Job.id.in_(list(ids)), with_events=False))

    def _drain(
        self,
        ids: Select,
        remove: Callable[[Session, Sequence], int],
        more: Callable[[], bool],
    ) -> int:
        """Delete what ``ids`` selects, a chunk per transaction, until none is left."""
        total, chunk = 0, self.config.retention_chunk
        while more():
            with self.sessions() as session:
                found = list(session.scalars(ids.limit(chunk)))
                removed = remove(session, found) if found else 0
                session.commit()
            total += removed
            if len(found) < chunk or not removed:  # the rest is younger, or not ours to delete
                break
        return total

    def _purge_batches(self, cutoff: datetime, more: Callable[[], bool]) -> int:
        ended = select(Batch.id).where(Batch.completed_at < cutoff)
        purged = 0
        while more():
            with self.sessions() as session:
                batch_ids = list(session.scalars(ended.limit(self.config.retention_chunk)))
                session.commit()
            for batch_id in batch_ids:
                if self._purge_batch(batch_id, cutoff, more):
                    purged += 1
            if len(batch_ids) < self.config.retention_chunk:
                break
        return purged

    def _purge_batch(self, batch_id: str, cutoff: datetime, more: Callable[[], bool]) -> bool:
        """Its jobs a chunk per transaction, then the batch; False if time ran out first.

        Each chunk locks the batch and re-checks that it ended before ``cutoff``: a retry
        (or any change) that reopened it first makes the purge leave it whole, and one
        that comes after a chunk went is refused (``batches.check_whole``)."""
        while more():
            with self.sessions() as session:
                done = batches.delete_ended(
                    session,
                    batch_id,
                    chunk=self.config.retention_chunk,
                    with_events=False,
                    ended_before=cutoff,
                )
                session.commit()
            if done:
                return True
        return False


def _delete_idempotency(session: Session, ids: Sequence[int]) -> int:
    return rowcount(
        session.execute(
            delete(IdempotencyRecord)
            .where(IdempotencyRecord.id.in_(list(ids)))
            .execution_options(synchronize_session=False)
        )
    )


def loop(config: Config, stop: threading.Event) -> Periodic | None:
    """The loop a worker runs (``.start()``): one pass per interval cluster-wide; None
    when ``RETENTION_DAYS=0`` keeps everything."""
    if not config.retention_days:
        return None
    retention: Retention | None = None

    def run_pass() -> None:
        nonlocal retention
        retention = retention or Retention.build(config)
        # A pass stops after one interval (the next goes on where it stopped), so a
        # lease of two covers it, the chunk it was in when its time ran out included.
        retention.run_once(budget_s=config.retention_interval_s, stop=stop)

    lease_s = 2 * config.retention_interval_s
    lock = f"{config.queue_prefix}:retention:lock"
    return Periodic(
        "retention",
        config.retention_interval_s,
        run_pass,
        stop,
        lease=Lease(make_redis(config), lock, lease_s),
    )


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    settings = Config.from_env()
    if not settings.retention_days:
        print("RETENTION_DAYS=0: everything is kept; nothing purged.")
    else:
        print(Retention.build(settings).run_once())
