"""worker.loader's line and the loader stage with a real worker: slow image hosts hold
loading threads, not batch slots.

Issue #14 item 2: two URLs whose host dripped its headers filled both batch slots,
and another user's job waited 58.6 s behind them.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import pytest
from sqlalchemy import select

from api import create_app
from shared.db import make_engine, make_session_factory
from shared.models import Job
from tests import support
from worker.loader import (
    BULK,
    INTERACTIVE,
    SLOW_AFTER_S,
    Line,
    active_loads,
    reserved_threads,
    start_threads,
)

BLOCKED = 10


def test_the_line_serves_interactive_items_first_and_keeps_threads_from_bulk() -> None:
    threads = 4
    line = Line(threads)
    release = threading.Event()
    started: list[str] = []
    changed = threading.Condition()

    def run(item: str) -> None:
        with changed:
            started.append(item)
            changed.notify_all()
        if item.startswith("held"):
            assert release.wait(60)

    for i in range(6):  # a slow bulk batch: more items than threads
        line.put(BULK, f"held bulk {i}")
    workers = start_threads(line, run, threads)
    bulk_cap = threads - reserved_threads(threads)
    with changed:
        assert changed.wait_for(lambda: len(started) == bulk_cap, 60)
    line.put(BULK, "bulk")
    line.put(INTERACTIVE, "single")  # after every bulk item, yet on the reserved thread
    with changed:
        assert changed.wait_for(lambda: "single" in started, 60)
    assert "bulk" not in started  # bulk items wait for bulk threads
    release.set()
    line.close()
    for worker in workers:
        worker.join(60)
    assert sorted(started) == sorted([f"held bulk {i}" for i in range(6)] + ["bulk", "single"])


def test_fast_bulk_items_start_at_most_active_at_once_and_slow_ones_make_room() -> None:
    """``active`` bulk items start at once; each one still running SLOW_AFTER_S later
    (a slow host) lets one more start, up to the bulk threads; an item that ends makes
    room at once."""
    threads, active = 8, 2
    line = Line(threads, active)
    bulk_cap = threads - reserved_threads(threads)
    held = {f"bulk {i}": threading.Event() for i in range(bulk_cap + 2)}
    started: dict[str, float] = {}
    changed = threading.Condition()

    def run(item: str) -> None:
        with changed:
            started[item] = time.monotonic()
            changed.notify_all()
        assert held[item].wait(60)

    for item in held:
        line.put(BULK, item)
    workers = start_threads(line, run, threads)
    with changed:
        assert changed.wait_for(lambda: len(started) == bulk_cap, 60)
    order = sorted(started, key=started.__getitem__)
    first = started[order[0]]
    # Only the first `active` started together; each later one waited until an earlier
    # one had run for SLOW_AFTER_S (a lower bound: a busy machine only starts them later).
    for item in order[active:]:
        assert started[item] - first >= SLOW_AFTER_S, (item, started[item] - first)
    ended = order[0]
    held[ended].set()  # an item ends: the next starts without waiting for the others
    with changed:
        assert changed.wait_for(lambda: len(started) == bulk_cap + 1, 60)
    for event in held.values():
        event.set()
    line.close()
    for worker in workers:
        worker.join(60)
    assert set(started) == set(held)


def test_a_loader_runs_one_bulk_image_per_core_and_one_more() -> None:
    assert active_loads(1) == 2 and active_loads(2) == 3


@pytest.fixture(scope="module", params=["0", "2"], ids=["threads", "loader-processes"])
def slow_stack(request):
    # The gate holds the downloads for as long as the test needs, not FETCH_TIMEOUT_S.
    # With loader processes too: a slow host holds a fetch thread there, never a process.
    database_url = support.create_postgres_database()
    config = support.migrated(
        support.test_config(
            database_url, fetch_timeout_s=support.GATE_MAX_S, loader_processes=request.param
        )
    )
    worker = support.WorkerProcess(config, name="loader").start()
    try:
        worker.wait_ready()
        yield config, create_app(config).test_client(), worker
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)
        support.drop_postgres_database(database_url)


def test_ten_blocked_hosts_do_not_delay_another_users_job(slow_stack, photo_server):
    config, client, worker = slow_stack
    sessions = make_session_factory(make_engine(config))
    key = uuid.uuid4().hex[:8]
    gate = photo_server.gate(key)
    attackers = [support.new_user(client) for _ in range(2)]  # 5 tokens each
    blocked = []
    for i in range(BLOCKED):
        resp = client.post(
            "/v1/jobs",
            json={"url": photo_server.url(f"gate/{key}/dog.jpg?{i}")},
            headers=attackers[i % 2]["headers"],
        )
        assert resp.status_code == 202, resp.get_json()
        blocked.append(resp.get_json()["id"])

    def statuses() -> Counter:
        with sessions() as s:
            return Counter(s.scalars(select(Job.status).where(Job.id.in_(blocked))))

    # All ten are being fetched: the server holds each request at the gate.
    support.wait_for(
        lambda: sum(p.startswith(f"/gate/{key}/") for p in list(photo_server.hits)) == BLOCKED,
        60,
        "the worker to fetch all ten blocked URLs",
    )

    other = support.new_user(client)
    resp = client.post(
        "/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=other["headers"]
    )
    assert resp.status_code == 202
    job = client.get(f"/v1/jobs/{resp.get_json()['id']}?wait=60", headers=other["headers"])
    assert job.get_json()["status"] == "succeeded", (job.get_json(), worker.log_tail())
    # Done while the ten were still held at the gate: they held no batch slot.
    assert statuses() == {"processing": BLOCKED}

    gate.set()
    support.wait_for(
        lambda: statuses() == {"succeeded": BLOCKED}, 120, "the ten to finish once released"
    )


def test_the_worker_log_says_what_runs_each_model_before_ready(slow_stack):
    # The models load before Celery sets up logging: these lines were once lost.
    _, _, worker = slow_stack
    log = worker.log()
    assert "mobilenet: runtime " in log, worker.log_tail()
    assert log.index("mobilenet: runtime ") < log.index("ready with models")
