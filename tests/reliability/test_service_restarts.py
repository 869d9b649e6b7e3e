"""Redis and PostgreSQL restarted under load (private servers, so nothing else is disturbed)."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from shared.models import Job
from tests import support
from tests.faults import PostgresCluster, RedisServer

FINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture
def private_redis():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def private_postgres():
    cluster = PostgresCluster().start()
    yield cluster
    cluster.cleanup()


def _all_final(stack, job_ids, timeout):
    def done():
        counts = stack.statuses(job_ids)
        return counts if sum(counts.get(s, 0) for s in FINAL) == len(job_ids) else None

    return support.wait_for(done, timeout, f"{len(job_ids)} jobs to end", 0.25)


def test_redis_restart_during_submissions_and_processing(
    private_redis, photo_server, fault_stack_factory
):
    stack = fault_stack_factory(redis_url=private_redis.url)
    stack.worker("w")
    user = stack.funded_user(500)
    accepted, refused, stop = [], [], threading.Event()

    def submit_forever():
        i = 0
        while not stop.is_set():
            resp = stack.client.post(
                "/v1/jobs",
                json={"url": photo_server.url(f"slow/eagle.jpg?r{i}")},
                headers=user["headers"],
            )
            if resp.status_code == 202:
                accepted.append(resp.get_json()["id"])
            else:
                assert resp.status_code == 503, resp.get_json()
                assert resp.get_json()["error"]["code"] == "service_unavailable"
                refused.append(i)
            i += 1
            time.sleep(0.05)

    submitter = threading.Thread(target=submit_forever)
    submitter.start()
    try:
        support.wait_for(lambda: len(accepted) >= 15, 30, "submissions before the restart")
        private_redis.restart(down_s=2)
        before = len(accepted)
        support.wait_for(lambda: len(accepted) > before + 5, 30, "submissions after the restart")
    finally:
        stop.set()
        submitter.join()
    assert refused, "no submission saw the outage"
    counts = _all_final(stack, accepted, timeout=120)
    assert counts == {"succeeded": len(accepted)}
    # Every 503 left nothing behind: the user's jobs are exactly the accepted ones.
    with stack.sessions() as s:
        mine = set(s.scalars(select(Job.id).where(Job.user_id == user["id"])))
    assert mine == set(accepted)
    stack.assert_ledger_exact(user)


def test_postgres_restart_during_processing(private_postgres, photo_server, fault_stack_factory):
    stack = fault_stack_factory(private_postgres.url)
    stack.worker("w")
    user = stack.funded_user(100)
    urls = [photo_server.url(f"slow/dog.jpg?p{i}") for i in range(30)]
    resp = stack.client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert resp.status_code == 202
    batch_id = resp.get_json()["id"]
    support.wait_for(
        lambda: stack.batch_statuses(batch_id).get("processing"), 60, "a batch in flight", 0.05
    )
    private_postgres.restart(down_s=3)  # the worker's result write meets a dead database

    def done():
        try:
            counts = stack.batch_statuses(batch_id)
        except Exception:  # the test's own reads may hit the restart too
            return None
        return counts if sum(counts.get(s, 0) for s in FINAL) == 30 else None

    counts = support.wait_for(done, 180, "the batch to finish after the restart", 0.5)
    assert counts == {"succeeded": 30}
    stack.assert_ledger_exact(user)
    # And the API answers again without a restart of its own.
    assert stack.client.get("/readyz").status_code == 200
