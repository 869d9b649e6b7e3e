"""The reconciler: SQL is the source of truth, so it finds jobs whose message was lost.

A job's message can vanish with its worker (SIGKILL, OOM, preemption), or for
good: Redis restarted without its data, an enqueue failed after the commit. SQL
still says ``queued`` or ``processing``. Every ``RECONCILE_INTERVAL_S`` one worker
of the cluster (elected by a lease: ``worker.periodic``) runs a pass:

- on a Redis broker, restores to their queue the unacknowledged messages whose
  lease no live worker renewed for ``WORKER_DEAD_AFTER_S`` (``worker.liveness``):
  a dead worker's batches in flight and its prefetched messages alike (RabbitMQ
  does this by itself when the dead consumer's connection closes);
- finds ``processing`` jobs that are lost: claimed by a worker whose heartbeat is
  older than ``WORKER_DEAD_AFTER_S``, or claimed longer ago than
  ``STALE_PROCESSING_S`` (by anyone). It re-sends them (unless the first step just
  restored their message), or, after ``JOB_MAX_ATTEMPTS`` claims, fails them as
  ``worker_lost`` with a refund;
- re-sends ``queued`` jobs whose message was sent longer than ``STALE_QUEUED_S``
  ago (single jobs at submission, bulk jobs when dispatched) when their queues are
  empty, at most once per ``STALE_QUEUED_S`` (such a job may only be waiting,
  prefetched, in a live worker: re-sending it every pass would flood the queue).
  Bulk jobs still waiting in SQL for their turn (never dispatched) are not stale:
  sending them would defeat the bulk window;
- refills the bulk window (``shared.dispatch``): a safety net for a refill that
  failed, and how a new worker's share of the window goes out.

Re-sending is always safe: the batch function only changes jobs that are still
active, so a duplicate message finds nothing to do. A released job is no longer
claimed by its dead worker, so it is re-sent once, not at every pass.

One-shot run: ``python -m worker.reconciler``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery import Celery
from redis import Redis
from sqlalchemy import ColumnElement, Select, and_, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from shared import batches, dispatch, events, jobs, webhook_events
from shared.config import Config
from shared.db import make_engine, make_session_factory
from shared.models import BULK_OUT, PROCESSING, Job, utcnow
from shared.queue import classify_queues, enqueue_bulk, enqueue_jobs, make_celery, queue_depth
from shared.redis_client import make_redis, once_per
from shared.status import JobStatus
from worker import liveness
from worker.periodic import Lease, Periodic

log = logging.getLogger(__name__)

SCAN_LIMIT = 5000


@dataclass
class Reconciler:
    config: Config
    sessions: sessionmaker[Session]
    redis: Redis
    celery: Celery
    broker: Redis | None = None  # the Redis broker's own client; None on RabbitMQ

    @classmethod
    def build(cls, config: Config) -> Reconciler:
        return cls(
            config,
            make_session_factory(make_engine(config)),
            make_redis(config),
            make_celery(config, main="imgclf-reconciler"),
            liveness.make_broker_redis(config) if config.broker_is_redis else None,
        )

    def run_once(self, judge_liveness: bool = True) -> dict[str, int]:
        """One pass; returns how many messages it restored and jobs it re-sent and failed.

        ``judge_liveness=False``: treat no worker as dead from its heartbeat or its
        leases (just after Redis was unreachable, when every heartbeat is stale through
        no worker's fault); only ``STALE_PROCESSING_S`` then finds lost jobs.
        """
        restored_ids, restored = self._restore_orphans() if judge_liveness else (set(), 0)
        lost, still_lost = self._lost(judge_liveness)
        retry = [j for j in lost if j.attempts < self.config.job_max_attempts]
        released = self._release(retry, still_lost)
        # A restored message already carries these jobs: one more would be a duplicate.
        resend = [j for j in retry if j.id in released and j.id not in restored_ids]
        resent = self._resend(resend) + self._resend(self._stale_queued())
        failed = self._fail_exhausted(
            [j for j in lost if j.attempts >= self.config.job_max_attempts]
        )
        dispatched = dispatch.refill(self.sessions, self.redis, self.celery, self.config)
        if dispatched:
            log.info("reconciler: dispatched %d waiting bulk job(s)", dispatched)
        if restored or resent or failed:
            log.warning(
                "reconciler: restored %d message(s) of dead workers, re-sent %d job(s), "
                "failed %d lost job(s)",
                restored,
                resent,
                failed,
            )
        return {"restored": restored, "resent": resent, "failed": failed}

    def _restore_orphans(self) -> tuple[set[str], int]:
        """Put dead workers' unacknowledged messages back on their queue (Redis broker)."""
        if self.broker is None:
            return set(), 0
        queues = classify_queues(self.config)
        orphans = liveness.orphaned_deliveries(self.broker, self.config, queues, SCAN_LIMIT)
        if not orphans:
            return set(), 0
        with self.celery.connection_for_write() as conn:
            qos = conn.default_channel.qos
            for orphan in orphans:
                # kombu's own restore: atomic, and a no-op for a message acked meanwhile.
                qos.restore_by_tag(orphan.tag)
        return {j for o in orphans for j in o.job_ids}, len(orphans)

    def _stale_queued(self) -> list[Job]:
        if queue_depth(self.celery, classify_queues(self.config)):
            return []
        scan_key = f"{self.config.queue_prefix}:reconciler:queued-scan"
        if not once_per(self.redis, scan_key, self.config.stale_queued_s):
            return []  # scanned less than STALE_QUEUED_S ago
        cutoff = utcnow() - timedelta(seconds=self.config.stale_queued_s)
        return [job for query in stale_queued_queries(cutoff) for job in self._select(query)]

    def _lost(self, judge_liveness: bool = True) -> tuple[list[Job], ColumnElement[bool]]:
        """Processing jobs whose worker is gone, and the condition that found them."""
        now = utcnow()
        condition = Job.claimed_at < now - timedelta(
            seconds=self.config.effective_stale_processing_s
        )
        if judge_liveness:
            orphaned = and_(
                Job.claimed_by.is_not(None),
                Job.claimed_by.not_in(liveness.live_workers(self.redis, self.config)),
                # A claim younger than that may precede its worker's first heartbeat.
                Job.claimed_at < now - timedelta(seconds=self.config.worker_dead_after_s),
            )
            condition = or_(condition, orphaned)
        return self._select(lost_query(condition)), condition

    def _select(self, query: Select) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(query.limit(SCAN_LIMIT)))

    def _release(self, lost: list[Job], still_lost: ColumnElement[bool]) -> set[str]:
        if not lost:
            return set()
        with self.sessions() as session:
            released = jobs.release_lost(session, [j.id for j in lost], still_lost)
            session.commit()
        return released

    def _resend(self, stale: list[Job]) -> int:
        single = [j.id for j in stale if j.batch_id is None]
        bulk = [j.id for j in stale if j.batch_id is not None]
        size = self.config.batch_max
        enqueue_jobs(self.celery, self.config, single)
        enqueue_bulk(
            self.celery, self.config, [bulk[i : i + size] for i in range(0, len(bulk), size)]
        )
        return len(stale)

    def _fail_exhausted(self, lost: list[Job]) -> int:
        if not lost:
            return 0
        with self.sessions() as session:
            ended: list[str] = []
            recorded: list[str | None] = []
            for job in lost:
                if jobs.mark_failed(
                    session,
                    job,
                    "worker_lost",
                    "The job's worker stopped responding too many times.",
                    refund=True,
                ):
                    ended.append(job.id)
                    recorded.append(jobs.record_webhook(session, job, webhook_events.COMPLETED))
            recorded += batches.complete_finished(session, [j.batch_id for j in lost if j.batch_id])
            session.commit()
        webhook_events.dispatch(self.celery, self.config, [e for e in recorded if e is not None])
        events.publish_done(self.redis, self.config, ended)
        return len(ended)


def stale_queued_queries(cutoff: datetime) -> tuple[Select, Select]:
    """Queued jobs whose message went out before ``cutoff``: single jobs (sent at
    submission) and dispatched bulk jobs. A bulk job still waiting for its turn
    (``dispatched_at`` NULL) is never stale.

    Two queries, each the condition of one small index, so that neither reads the
    backlog: single queued jobs through ``ix_jobs_batch_status`` (batch_id NULL,
    status), bulk jobs out through the partial ``ix_jobs_bulk_out`` (a few batches'
    worth whatever waits in SQL). As one OR they matched no index and read every
    queued job: 160-390 ms at 1M waiting.
    """
    queued = Job.status == JobStatus.QUEUED.value
    return (
        select(Job).where(Job.batch_id.is_(None), queued, Job.created_at < cutoff),
        select(Job).where(text(BULK_OUT), queued, Job.dispatched_at < cutoff),
    )


def lost_query(condition: ColumnElement[bool]) -> Select:
    """Processing jobs matching ``condition``, through the partial ``ix_jobs_processing``."""
    return select(Job).where(text(PROCESSING), condition)


#: The reconciler's lease, in intervals: longer than any pass (a few SCAN_LIMIT scans).
#: A pass that ran longer still would let a second start beside it, which is harmless
#: (re-sending is safe) and logged.
LEASE_INTERVALS = 4


def loop(config: Config, stop: threading.Event) -> Periodic:
    """The loop a worker runs (``.start()``): one pass per interval cluster-wide."""
    passes = _Passes(config)
    return Periodic(
        "reconciler",
        config.reconcile_interval_s,
        passes.run,
        stop,
        on_failure=passes.failed,
        lease=Lease(
            make_redis(config),
            f"{config.queue_prefix}:reconciler:lock",
            LEASE_INTERVALS * config.reconcile_interval_s,
        ),
    )


@dataclass
class _Passes:
    """The loop's passes, and what one tells the next."""

    config: Config
    reconciler: Reconciler | None = None
    # After a failed pass (Redis unreachable, most often), heartbeats and leases are
    # stale through no worker's fault: judge none dead until every live worker has
    # had time to beat again, or a Redis outage would re-send the whole cluster's work.
    trust_after: float = 0.0

    def run(self) -> None:
        if self.reconciler is None:
            rec = self.reconciler = Reconciler.build(self.config)
            dispatch.warm(rec.sessions, rec.redis, rec.celery, rec.config)
        self.reconciler.run_once(judge_liveness=time.monotonic() >= self.trust_after)

    def failed(self, _exc: Exception) -> None:
        self.trust_after = time.monotonic() + 2 * self.config.heartbeat_interval_s


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    print(Reconciler.build(Config.from_env()).run_once())
