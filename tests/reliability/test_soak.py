"""Soak: mixed traffic for SOAK_S seconds (45 in CI; 600 for the recorded run in
docs/reliability.md), then every job final, every ledger exact, memory flat.

    SOAK_S=600 SOAK_RATE=18 scripts/test.sh tests/reliability/test_soak.py -s  # the long run
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.webhook_receiver import Receiver
from tests import support

SOAK_S = float(os.environ.get("SOAK_S", "45"))
RATE = float(os.environ.get("SOAK_RATE", "8"))  # operations per second, all kinds together
CLIENT_THREADS = 16  # operations in flight at most (the rate is open-loop; these are the clients)
PHOTOS = ["dog.jpg", "parrot.jpg", "hot_dog.jpg", "bird.bmp", "eagle.jpg", "cat.bmp"]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a prefork worker's pool), in MB."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            if int(proc.name) == pid or int(stat[3]) == pid:
                total += int(stat[23]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e6


# The suite's per-test timeout (300 s) is for hangs; a soak runs as long as it is told.
@pytest.mark.timeout(SOAK_S + 420)
def test_mixed_traffic_soak(photo_server, photos_dir, fault_stack_factory):
    stack = fault_stack_factory()
    # The webhook deliverer starts while the worker loads its model, not after it.
    worker = stack.start_worker("soak")
    webhooks = support.WebhookWorkerProcess(stack.config).start()
    stack.workers.append(webhooks)
    webhooks.wait_ready()
    stack.wait_ready(worker)
    user = stack.funded_user(100_000)
    headers = user["headers"]
    rng = random.Random(7)
    outcomes: Counter = Counter()
    unexpected: list = []
    jobs, batches = [], []
    lock = threading.Lock()

    def one_operation(i: int, client) -> None:
        kind = rng.choice(["url", "url", "upload", "longpoll", "batch", "webhook"])
        photo = rng.choice(PHOTOS)
        url = photo_server.url(f"{photo}?s{i}")
        if kind == "upload":
            data = (photos_dir / photo).read_bytes()
            resp = client.post(
                "/v1/jobs", data={"file": (io.BytesIO(data), photo)}, headers=headers
            )
        elif kind == "batch":
            urls = [photo_server.url(f"{rng.choice(PHOTOS)}?b{i}-{k}") for k in range(10)]
            resp = client.post("/v1/batches", json={"urls": urls}, headers=headers)
        elif kind == "webhook":
            resp = client.post(
                "/v1/jobs", json={"url": url, "webhook": receiver.url()}, headers=headers
            )
        elif kind == "longpoll":
            resp = client.post(
                "/v1/jobs", json={"url": url}, headers={**headers, "Prefer": "wait=20"}
            )
        else:
            resp = client.post("/v1/jobs", json={"url": url}, headers=headers)
        with lock:
            outcomes[(kind, resp.status_code)] += 1
            if resp.status_code not in (200, 202):
                unexpected.append((kind, resp.status_code, resp.get_data(as_text=True)[:200]))
            elif kind == "batch":
                batches.append(resp.get_json()["id"])
            else:
                jobs.append(resp.get_json()["id"])

    # The worker, the webhook worker, and this process (which serves the API in-process).
    processes = {"worker": worker.proc.pid, "webhooks": webhooks.proc.pid, "api": os.getpid()}

    def rss() -> dict[str, float]:
        return {name: _rss_mb(pid) for name, pid in processes.items()}

    # A fixed set of client threads: with a thread per operation, a slow (busy) machine
    # held more of them at once, and each new thread's malloc arena grew this process's
    # RSS by the machine's load, not by a leak (once 151 MB at load 10-15).
    with Receiver() as receiver, ThreadPoolExecutor(CLIENT_THREADS) as clients:
        warm_rss, stop = None, time.monotonic() + SOAK_S
        sent, i = [], 0
        start = time.monotonic()
        while time.monotonic() < stop:
            if warm_rss is None and time.monotonic() - start > min(60, SOAK_S / 3):
                warm_rss = rss()
            sent.append(clients.submit(one_operation, i, stack.app.test_client()))
            i += 1
            time.sleep(1 / RATE)
        for future in sent:
            future.result(120)
        assert not unexpected, unexpected[:5]

        def all_final() -> bool:
            counts = stack.statuses(jobs)
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "canceled"))
            return done == len(jobs) and all(
                stack.batch_statuses(b).keys() <= {"succeeded", "failed", "canceled"}
                for b in batches
            )

        sent_s = time.monotonic() - start
        support.wait_for(all_final, 300, "every soak job to end", 0.5)
        drained_s = time.monotonic() - start
        end_rss = rss()
    assert stack.statuses(jobs).get("failed", 0) == 0
    stack.assert_ledger_exact(user)
    # Memory flat after warm-up: no process grew by more than a margin.
    growth = {name: end_rss[name] - warm_rss[name] for name in processes}
    assert all(mb < 150 for mb in growth.values()), (warm_rss, end_rss)
    images = len(jobs) + 10 * len(batches)
    print(
        f"\nsoak: {i} operations sent in {sent_s:.0f} s ({i / sent_s:.1f}/s), "
        f"{images} images ({images / sent_s:.1f}/s), all final {drained_s - sent_s:.1f} s "
        f"after the last send; responses {dict(sorted(outcomes.items()))}; "
        + ", ".join(
            f"{name} RSS {warm_rss[name]:.0f} -> {end_rss[name]:.0f} MB" for name in processes
        )
    )
