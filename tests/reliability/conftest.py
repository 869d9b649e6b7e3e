"""Fault-injection set-up: real workers that tests kill, private servers that tests restart."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sqlalchemy import func, select

from api import create_app
from shared import ledger
from shared.db import make_engine, make_session_factory
from shared.models import Job, User
from tests import ledger_lines, support

BROKERS = {"redis": "", "rabbitmq": support.RABBITMQ_URL}


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request) -> str:
    """Worker fault tests run on both brokers: Redis (the default) and RabbitMQ."""
    return BROKERS[request.param]


def fault_config(database_url: str, redis_url: str = support.REDIS_URL, **overrides):
    """Short timeouts, so redelivery and reconciliation happen within a test's patience."""
    values = dict(
        redis_url=redis_url,
        visibility_timeout_s=8,
        reconcile_interval_s=2,
        stale_queued_s=6,
        stale_processing_s=30,
        queue_prefix=support.new_prefix("fault"),
    )
    values.update(overrides)
    return support.migrated(support.test_config(database_url, **values))


@dataclass
class FaultStack:
    config: object
    workers: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.app = create_app(self.config)
        self.client = self.app.test_client()
        self.sessions = make_session_factory(make_engine(self.config))

    def worker(self, name: str) -> support.WorkerProcess:
        before = support.WorkerProcess(self.config).ready_count()
        worker = support.WorkerProcess(self.config, name=name).start().wait_ready(before)
        self.workers.append(worker)
        return worker

    def start_worker(self, name: str) -> support.WorkerProcess:
        """Start a worker without waiting for it: see wait_ready."""
        worker = support.WorkerProcess(self.config, name=name)
        worker.ready_before = worker.ready_count()
        self.workers.append(worker.start())
        return worker

    def wait_ready(self, *workers: support.WorkerProcess) -> None:
        """Wait until the workers started together have all loaded their models."""
        before = min(w.ready_before for w in workers)

        def ready() -> bool:
            for w in workers:
                if w.proc.poll() is not None:
                    raise AssertionError(f"{w.name} exited: {w.log_tail()}")
            return workers[0].ready_count() >= before + len(workers)

        support.wait_for(ready, support.WORKER_START_TIMEOUT_S, "the workers to be ready", 0.1)

    def funded_user(self, tokens: int) -> dict:
        user = support.new_user(self.client)
        with self.sessions() as s:
            user_id = s.scalars(select(User.id).where(User.username == user["username"])).one()
            ledger.grant(s, user_id, tokens, ledger.REFILL)
            s.commit()
        user["id"] = user_id
        return user

    def statuses(self, job_ids) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(
                select(Job.status, func.count())
                .where(Job.id.in_(list(job_ids)))
                .group_by(Job.status)
            )
            return dict(rows.all())

    def batch_statuses(self, batch_id: str) -> dict[str, int]:
        with self.sessions() as s:
            rows = s.execute(
                select(Job.status, func.count())
                .where(Job.batch_id == batch_id)
                .group_by(Job.status)
            )
            return dict(rows.all())

    def assert_ledger_exact(self, user: dict) -> None:
        """One charge per job, one refund per failed or canceled job, balance = ledger sum.

        A batch line's charge is its batch's row (``ledger_lines.per_job`` checks the
        batch's rows add up to its lines)."""
        with self.sessions() as s:
            jobs = s.execute(select(Job.id, Job.status).where(Job.user_id == user["id"])).all()
            by_job = ledger_lines.per_job(s, user["id"])
            for job_id, status in jobs:
                expected = ["charge", "refund"] if status in ("failed", "canceled") else ["charge"]
                reasons = sorted(reason for reason, _run in by_job.get(job_id, []))
                assert reasons == expected, (job_id, status)
            balance = s.get(User, user["id"]).tokens
            assert balance == support.ledger_sum(s, user["id"])

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        support.delete_redis_prefix(self.config.queue_prefix)
        if not self.config.broker_is_redis:
            support.delete_rabbitmq_queues(self.config)


@pytest.fixture
def fault_stack_factory():
    """Stacks on databases of their own (a fresh one on the shared PostgreSQL unless a
    private server's URL is given): their reconcilers must see only their own jobs."""
    made, databases = [], []

    def make(
        database_url: str | None = None, redis_url: str = support.REDIS_URL, **overrides
    ) -> FaultStack:
        if database_url is None:
            database_url = support.create_postgres_database()
            databases.append(database_url)
        stack = FaultStack(fault_config(database_url, redis_url, **overrides))
        made.append(stack)
        return stack

    yield make
    for stack in made:
        stack.close()
    for url in databases:
        support.drop_postgres_database(url)
