"""Workers killed, stopped and restarted for real: every job ends once, every token is right."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from shared.models import Job
from tests import support

FINAL = {"succeeded", "failed", "canceled"}


def _submit_batch(stack, user, urls) -> str:
    resp = stack.client.post("/v1/batches", json={"urls": urls}, headers=user["headers"])
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["id"]


def _wait_all_final(stack, batch_id, total, timeout):
    def done():
        counts = stack.batch_statuses(batch_id)
        return counts if sum(counts.get(s, 0) for s in FINAL) == total else None

    return support.wait_for(done, timeout, f"all {total} jobs of {batch_id} to end", 0.25)


def _wait_processing(stack, batch_id):
    support.wait_for(
        lambda: stack.batch_statuses(batch_id).get("processing"), 60, "a batch in flight", 0.05
    )


def test_sigkill_mid_batch_redelivers_and_each_job_ends_once(photo_server, fault_stack_factory):
    stack = fault_stack_factory()
    first = stack.worker("doomed")
    user = stack.funded_user(100)
    urls = [photo_server.url(f"slow/parrot.jpg?k{i}") for i in range(12)]
    batch_id = _submit_batch(stack, user, urls)
    _wait_processing(stack, batch_id)
    first.kill()  # SIGKILL to the worker and its pool process, mid-batch
    killed_at = time.monotonic()

    stack.worker("rescuer")
    counts = _wait_all_final(stack, batch_id, 12, timeout=90)
    assert counts == {"succeeded": 12}
    # Redelivery is bounded by the visibility timeout (8 s here) plus kombu's restore cycle.
    assert time.monotonic() - killed_at < 8 + 10 + 30
    stack.assert_ledger_exact(user)
    with stack.sessions() as s:
        attempts = list(s.scalars(select(Job.attempts).where(Job.batch_id == batch_id)))
    assert max(attempts) >= 2  # the killed batch really was taken twice


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    return [int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split()]


def test_prefork_pool_process_killed_mid_batch_requeues_at_once(photo_server, fault_stack_factory):
    # A visibility timeout far beyond the test's patience: only the batcher's own
    # requeue on WorkerLostError can bring these jobs back in time.
    stack = fault_stack_factory(
        worker_pool="prefork",
        worker_concurrency=1,
        visibility_timeout_s=600,
        stale_processing_s=900,
    )
    worker = stack.worker("forked")
    user = stack.funded_user(10)
    urls = [photo_server.url(f"slow/parrot.jpg?p{i}") for i in range(4)]
    batch_id = _submit_batch(stack, user, urls)
    _wait_processing(stack, batch_id)
    [child] = _children(worker.proc.pid)
    os.kill(child, signal.SIGKILL)  # the pool process, not the worker: WorkerLostError

    counts = _wait_all_final(stack, batch_id, 4, timeout=120)
    assert counts == {"succeeded": 4}
    stack.assert_ledger_exact(user)
    assert "lost its pool process" in worker.log()


def test_two_workers_one_killed_repeatedly_through_1000_jobs(photo_server, fault_stack_factory):
    # Each kill may land on the same chunk of jobs; JOB_MAX_ATTEMPTS (3 by default)
    # would rightly fail a chunk that took down 3 workers, so allow more kills here.
    stack = fault_stack_factory(job_max_attempts=10)
    stack.worker("steady")
    user = stack.funded_user(1000)
    photos = ["dog.jpg", "parrot.jpg", "hot_dog.jpg", "eagle.jpg", "kite.jpg"]
    # Every 8th image is slow, so each batch lasts ~1.5 s and the run outlives the crashes.
    urls = [
        photo_server.url(f"{'slow/' if i % 8 == 0 else ''}{photos[i % 5]}?n{i}")
        for i in range(1000)
    ]
    batch_id = _submit_batch(stack, user, urls)
    for round_ in range(3):
        flaky = stack.worker(f"flaky{round_}")
        time.sleep(2)  # let it take a batch or two, then crash it
        flaky.kill()
    assert stack.batch_statuses(batch_id).get("queued"), "the run ended before the crashes"
    counts = _wait_all_final(stack, batch_id, 1000, timeout=300)
    assert counts == {"succeeded": 1000}
    stack.assert_ledger_exact(user)


def test_sigterm_finishes_or_returns_the_batch_in_flight(photo_server, fault_stack_factory):
    stack = fault_stack_factory()
    worker = stack.worker("stopping")
    user = stack.funded_user(100)
    urls = [photo_server.url(f"slow/bird.bmp?t{i}") for i in range(40)]
    batch_id = _submit_batch(stack, user, urls)
    _wait_processing(stack, batch_id)
    worker.proc.send_signal(signal.SIGTERM)  # warm shutdown
    assert worker.proc.wait(60) == 0
    after_stop = stack.batch_statuses(batch_id)
    assert after_stop.get("processing", 0) == 0  # nothing left half-done by a clean stop
    stack.worker("next")
    counts = _wait_all_final(stack, batch_id, 40, timeout=120)
    assert counts == {"succeeded": 40}
    stack.assert_ledger_exact(user)
