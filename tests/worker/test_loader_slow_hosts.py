"""One user's batch of held fetches must not hold another user's single job (issue #23 item 5).

A batch of 400 URLs on hosts that drip a byte a second held every fetch thread of the
loader processes, and each single job of another user waited 8.4-9.2 s for one of
them to time out. Here the hosts are the photo server's gates (held until the test
opens them), with FETCH_THREADS=4 and four times as many URLs as threads: the other
user's job must finish while every one of them is still held.
"""

from __future__ import annotations

import uuid
from collections import Counter

import pytest
from sqlalchemy import select

from api import create_app
from shared.db import make_engine, make_session_factory
from shared.models import Job
from tests import support
from worker.loader import reserved_threads

THREADS = 4
HELD = 4 * THREADS


@pytest.fixture(scope="module", params=["1", "0"], ids=["loader-processes", "loader-threads"])
def held_stack(request):
    database_url = support.create_postgres_database()
    config = support.migrated(
        support.test_config(
            database_url,
            runtime="null",
            loader_processes=request.param,
            fetch_threads=THREADS,
            # Chunks of 4, all sent at once: as many bulk messages loading as there are
            # loader threads (the prefetch window, 2 * 4 * 2 ids), each held by its fetches.
            batch_max=THREADS,
            bulk_window_batches=HELD // THREADS,
            fetch_timeout_s=support.GATE_MAX_S,
            signup_tokens=HELD,
        )
    )
    worker = support.WorkerProcess(config, name=f"held{request.param}").start()
    try:
        worker.wait_ready()
        yield config, create_app(config).test_client(), worker
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)
        support.drop_postgres_database(database_url)


def test_a_batch_of_held_fetches_does_not_hold_another_users_single_job(held_stack, photo_server):
    config, client, worker = held_stack
    key = uuid.uuid4().hex[:8]
    gate = photo_server.gate(key)
    attacker = support.new_user(client)
    urls = [photo_server.url(f"gate/{key}/dog.jpg?{i}") for i in range(HELD)]
    resp = client.post(
        "/v1/batches", data="\n".join(urls), content_type="text/plain", headers=attacker["headers"]
    )
    assert resp.status_code == 202, resp.get_json()
    batch_id = resp.get_json()["id"]

    def held() -> int:
        return sum(p.startswith(f"/gate/{key}/") for p in list(photo_server.hits))

    # Bulk fetches take at least every thread not kept for interactive images.
    expected = THREADS - reserved_threads(THREADS)
    support.wait_for(lambda: held() >= expected, 60, f"{expected} held fetches")

    other = support.new_user(client)
    resp = client.post(
        "/v1/jobs", json={"url": photo_server.url("parrot.jpg")}, headers=other["headers"]
    )
    assert resp.status_code == 202
    job = client.get(f"/v1/jobs/{resp.get_json()['id']}?wait=30", headers=other["headers"])
    assert job.get_json()["status"] == "succeeded", (job.get_json(), worker.log_tail())

    sessions = make_session_factory(make_engine(config))

    def statuses() -> Counter:
        with sessions() as s:
            return Counter(s.scalars(select(Job.status).where(Job.batch_id == batch_id)))

    assert "succeeded" not in statuses()  # the batch was still held meanwhile
    gate.set()
    support.wait_for(
        lambda: statuses() == {"succeeded": HELD}, 120, "the held batch to finish once released"
    )
