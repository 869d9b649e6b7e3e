"""The reconciler: SQL is the source of truth, so it finds jobs whose message was lost.

A job's message can vanish: Redis restarted without its data, an enqueue that
failed after the commit, a worker that died after the visibility timeout was
exceeded. SQL still says ``queued`` or ``processing``. Every
``RECONCILE_INTERVAL_S`` one worker of the cluster (a Redis lock elects it):

- re-sends ``queued`` jobs older than ``STALE_QUEUED_S`` when their queue is empty
  (a backlog is not a loss: while messages wait, nothing is re-sent);
- for ``processing`` jobs claimed longer ago than ``STALE_PROCESSING_S``
  (visibility timeout + 2 min by default), re-sends them, or, after
  ``JOB_MAX_ATTEMPTS`` claims, fails them as ``worker_lost`` with a refund.

Re-sending is always safe: the batch function only changes jobs that are still
active, so a duplicate message finds nothing to do.

One-shot run: ``python -m worker.reconciler``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

import redis
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import batches, events, jobs, webhook_events
from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.models import Job, utcnow
from shared.queue import bulk_queue, enqueue_bulk, enqueue_jobs, interactive_queue, make_celery
from shared.redis_client import make_redis
from shared.status import JobStatus

log = logging.getLogger(__name__)

SCAN_LIMIT = 5000


@dataclass
class Reconciler:
    config: Config
    sessions: sessionmaker[Session]
    redis: redis.Redis
    celery: Celery

    @classmethod
    def build(cls, config: Config) -> Reconciler:
        return cls(
            config,
            make_session_factory(make_engine(config)),
            make_redis(config),
            make_celery(config, main="imgclf-reconciler"),
        )

    def run_once(self) -> dict[str, int]:
        """One pass; returns how many jobs it re-sent and failed."""
        resent = self._resend(self._stale_queued()) + self._resend(self._stale_processing())
        failed = self._fail_exhausted()
        if resent or failed:
            log.warning("reconciler: re-sent %d job(s), failed %d lost job(s)", resent, failed)
        return {"resent": resent, "failed": failed}

    def _stale_queued(self) -> list[Job]:
        queues = (interactive_queue(self.config), bulk_queue(self.config))
        if any(self.redis.llen(q) for q in queues):
            return []
        cutoff = utcnow() - timedelta(seconds=self.config.stale_queued_s)
        return self._select(Job.status == JobStatus.QUEUED.value, Job.created_at < cutoff)

    def _stale_processing(self) -> list[Job]:
        return [j for j in self._lost() if j.attempts < self.config.job_max_attempts]

    def _lost(self) -> list[Job]:
        cutoff = utcnow() - timedelta(seconds=self.config.effective_stale_processing_s)
        return self._select(Job.status == JobStatus.PROCESSING.value, Job.claimed_at < cutoff)

    def _select(self, *conditions) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).where(*conditions).limit(SCAN_LIMIT)))

    def _resend(self, stale: list[Job]) -> int:
        single = [j.id for j in stale if j.batch_id is None]
        bulk = [j.id for j in stale if j.batch_id is not None]
        size = self.config.batch_max
        enqueue_jobs(self.celery, self.config, single)
        enqueue_bulk(
            self.celery, self.config, [bulk[i : i + size] for i in range(0, len(bulk), size)]
        )
        return len(stale)

    def _fail_exhausted(self) -> int:
        lost = [j for j in self._lost() if j.attempts >= self.config.job_max_attempts]
        if not lost:
            return 0
        with self.sessions() as session:
            ended, recorded = [], []
            for job in lost:
                if jobs.mark_failed(
                    session,
                    job,
                    "worker_lost",
                    "The job's worker stopped responding too many times.",
                    refund=True,
                ):
                    ended.append(job.id)
                    recorded.append(jobs.record_webhook(session, job, "completed"))
            recorded += batches.complete_finished(session, [j.batch_id for j in lost])
            session.commit()
        webhook_events.dispatch(self.celery, self.config, [e for e in recorded if e])
        events.publish_done(self.redis, self.config, ended)
        return len(ended)


def run_forever(config: Config, stop: threading.Event) -> None:
    """The loop a worker runs in a daemon thread; one pass per interval cluster-wide."""
    reconciler = None
    lock = f"{config.queue_prefix}:reconciler:lock"
    while not stop.wait(config.reconcile_interval_s):
        try:
            reconciler = reconciler or Reconciler.build(config)
            # Whoever sets the key first runs this interval's pass; it expires by itself.
            if reconciler.redis.set(
                lock, "1", nx=True, ex=max(1, int(config.reconcile_interval_s))
            ):
                reconciler.run_once()
        except Exception as exc:  # never let the thread die: try again next interval
            log.warning("reconciler pass failed: %r", exc)


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    print(Reconciler.build(Config.from_env()).run_once())
