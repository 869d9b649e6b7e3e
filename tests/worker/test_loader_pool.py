"""Loader processes (worker/loader_pool.py): real processes, real HTTP, real Redis and SQL.

A loader process killed mid-fetch loses no job: its image is loaded again by another
process, or, killed again, the job fails cleanly and is refunded. All the processes
decode under one pixel budget. Synced on the photo server's request log (the fetch
has arrived) and the budget's line, never on sleeps.
"""

import contextlib
import io
import os
import signal
import threading
import uuid

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from api import create_app
from harness.accounts import charged_job
from shared.images import decode_image, to_pixels
from shared.models import Job, LedgerEntry, User, new_id
from shared.redis_client import make_redis
from shared.uploads import UploadStore
from tests import support
from worker import pipeline
from worker.loader import ImageTask, load_all
from worker.loader_pool import LOST_MESSAGE, LoaderProcesses
from worker.runtime import Runtime

MOBILENET = (224, 224)
INCEPTION = (299, 299)


@pytest.fixture(scope="module")
def config(api_stack):
    return api_stack.config.replace(fetch_threads=4)


def pids(loaders: LoaderProcesses) -> list[int]:
    """The loader processes' pids, to kill one."""
    return [p.proc.pid for p in loaders._places if p.proc is not None]


@pytest.fixture(scope="module")
def pool(config):
    loaders = LoaderProcesses(config, processes=2)
    yield loaders
    loaders.close()


def _task(url: str, *sizes) -> ImageTask:
    return ImageTask(url=url, upload_id=None, sizes=sizes or (MOBILENET,))


def test_images_come_back_as_the_threads_would_load_them(pool, config, photo_server, photos_dir):
    [result] = load_all(pool, [_task(photo_server.url("parrot.jpg"), MOBILENET, INCEPTION)])
    assert result.error is None and result.fetch_s is not None
    image = decode_image(
        (photos_dir / "parrot.jpg").read_bytes(),
        max_pixels=config.max_image_pixels,
        at_least=INCEPTION,
    )
    for size in (MOBILENET, INCEPTION):
        expected = to_pixels(image, size)
        assert result.arrays[size].dtype == np.uint8
        np.testing.assert_array_equal(result.arrays[size], expected)


def test_errors_and_uploads(pool, config, photo_server, photos_dir):
    uploads = UploadStore(make_redis(config), config)
    job_id = new_id()
    uploads.put(job_id, (photos_dir / "dog.jpg").read_bytes())
    missing, notes, upload, expired = load_all(
        pool,
        [
            _task(photo_server.url("missing.jpg")),
            _task(photo_server.url("notes.jpg")),
            ImageTask(url=None, upload_id=job_id, sizes=(MOBILENET,)),
            ImageTask(url=None, upload_id=new_id(), sizes=(MOBILENET,)),
        ],
    )
    assert (missing.error.code, missing.expected) == ("fetch_failed", True)
    assert notes.error.code == "not_an_image"
    assert upload.error is None and upload.arrays[MOBILENET].shape == (224, 224, 3)
    assert expired.error.code == "upload_expired"
    uploads.delete(job_id)


def test_many_images_at_once_spread_over_the_processes(pool, photo_server):
    names = ["parrot.jpg", "dog.jpg", "hot_dog.jpg", "bird.bmp"] * 8
    results = load_all(pool, [_task(photo_server.url(f"{n}?many{i}")) for i, n in enumerate(names)])
    assert all(r.error is None for r in results)


def _background(work) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def _fetches(photo_server, key: str) -> int:
    return sum(p.startswith(f"/gate/{key}/") for p in list(photo_server.hits))


def test_a_killed_loader_process_hands_its_image_to_another(config, photo_server):
    loaders = LoaderProcesses(config, processes=2)
    try:
        key = uuid.uuid4().hex[:8]
        gate = photo_server.gate(key)
        tasks = [_task(photo_server.url(f"gate/{key}/dog.jpg?{i}")) for i in range(2)]
        results: list = []
        waiter = _background(lambda: results.extend(load_all(loaders, tasks)))
        # One task per process (least busy first): both fetches are held at the gate.
        support.wait_for(lambda: _fetches(photo_server, key) == 2, 60, "both fetches")
        victim = pids(loaders)[0]
        os.kill(victim, signal.SIGKILL)
        support.wait_for(lambda: _fetches(photo_server, key) == 3, 60, "the fetch sent again")
        assert victim not in pids(loaders) and len(pids(loaders)) == 2  # replaced
        gate.set()
        waiter.join(60)
        assert [r.error for r in results] == [None, None]
    finally:
        loaders.close()


def test_a_process_past_a_deadline_is_killed_and_its_image_sent_again(config, photo_server, caplog):
    # Left alive, a process whose task is past its deadline looks idle (the task no
    # longer counts) and draws more work, and one that stopped reading its pipe blocks
    # the sends: it is killed, and its task goes to another process once.
    loaders = LoaderProcesses(config, processes=2)
    loaders._limit_s = 8.0  # the fetch, held at the gate, outlives it
    try:
        key = uuid.uuid4().hex[:8]
        gate = photo_server.gate(key)
        victim = pids(loaders)[0]  # the least busy first: process 0 gets the task
        future = loaders.submit(_task(photo_server.url(f"gate/{key}/dog.jpg")))
        support.wait_for(lambda: _fetches(photo_server, key) == 2, 90, "the fetch sent again")
        gate.set()
        assert future.result(60).error is None
        assert victim not in pids(loaders) and len(pids(loaders)) == 2  # replaced
        assert "gave no answer within 8 s; killing it" in caplog.text
        support.wait_for(lambda: loaders.health() is None, 60, "the new process ready")
    finally:
        gate.set()
        loaders.close()


LARGE = (2000, 1500)  # 3 million pixels: two at once do not fit in BUDGET
BUDGET = 4_000_000


def _png(size: tuple[int, int], shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (shade, 90, 160)).save(out, "PNG")  # a few KB, 9 MB decoded
    return out.getvalue()


def test_the_loader_processes_decode_under_one_budget_and_a_dead_one_leaves_its_line(config):
    # One fetch thread per process: two decodes in line are one in each process.
    cfg = config.replace(
        fetch_threads=1, max_image_pixels=BUDGET, decode_budget_pixels=BUDGET, decode_wait_s=300
    )
    pixels = LARGE[0] * LARGE[1]
    uploads = UploadStore(make_redis(cfg), cfg)
    job_ids = [new_id() for _ in range(8)]
    for shade, job_id in enumerate(job_ids):
        uploads.put(job_id, _png(LARGE, 30 * shade))
    tasks = [ImageTask(url=None, upload_id=job_id, sizes=(MOBILENET,)) for job_id in job_ids]
    loaders = LoaderProcesses(cfg, processes=2)
    try:
        results: list = []
        # The worker's own share of the budget: no large image fits beside it, in any process.
        with loaders.budget.hold(BUDGET - pixels + 1):
            waiter = _background(lambda: results.extend(load_all(loaders, tasks)))
            support.wait_for(lambda: loaders.budget.waiting == 2, 60, "both processes wait")
            # Killed in line: reaped, its place is given back (first in line, it would
            # block every process), and its image goes to the other process.
            victim = pids(loaders)[0]
            os.kill(victim, signal.SIGKILL)
            # (Replaced too: the replacement starts after the dead one leaves the line.)
            support.wait_for(
                lambda: (
                    victim not in pids(loaders)
                    and loaders.budget.waiting == 1
                    and len(pids(loaders)) == 2
                ),
                60,
                "the dead process out of the budget's line, and replaced",
            )
        waiter.join(120)
        assert [r.error for r in results] == [None] * len(tasks)
        assert all(r.arrays[MOBILENET].shape == (224, 224, 3) for r in results)
        budget = loaders.budget
        # Eight large images over two processes, one at a time: a budget per process
        # would have let two decode at once (2 x 3 million pixels, over BUDGET).
        assert budget.peak == pixels
        assert budget.free == BUDGET and budget.waiting == 0
    finally:
        loaders.close()
        uploads.delete(*job_ids)


@pytest.fixture(scope="module")
def null_runtime(config):
    rt = Runtime.build(config.replace(runtime="null"))
    rt.start_loader_processes(1)
    yield rt
    rt.stop_loader_processes()
    rt.io_pool.shutdown()


def _submit(rt, url: str) -> tuple[str, str]:
    with rt.sessions() as s:
        user = support.add_account(s, tokens=5, prefix="lp")
        return user.id, charged_job(s, user.id, url).id


def test_an_image_whose_loader_dies_twice_fails_the_job_with_a_refund(null_runtime, photo_server):
    rt = null_runtime
    key = uuid.uuid4().hex[:8]
    gate = photo_server.gate(key)
    user_id, doomed = _submit(rt, photo_server.url(f"gate/{key}/dog.jpg"))
    loaded: list = []
    waiter = _background(lambda: loaded.append(pipeline.load(rt, [doomed])))
    for sends in (1, 2):  # the first send, then the one to the replacement process
        support.wait_for(lambda n=sends: _fetches(photo_server, key) == n, 60, f"fetch {sends}")
        os.kill(pids(rt.loader)[0], signal.SIGKILL)
    waiter.join(60)
    gate.set()
    assert pipeline.process(rt, [doomed], loaded) is None
    _, fine = _submit(rt, photo_server.url("parrot.jpg"))
    assert pipeline.process(rt, [fine]) is None  # the replacement process loads it
    with rt.sessions() as s:
        failed, done = s.get(Job, doomed), s.get(Job, fine)
        assert (failed.status, failed.error_code) == ("failed", "internal_error")
        assert failed.error_message == LOST_MESSAGE
        assert done.status == "succeeded"
        reasons = sorted(s.scalars(select(LedgerEntry.reason).where(LedgerEntry.job_id == doomed)))
        assert reasons == ["charge", "refund"]
        assert s.get(User, user_id).tokens == support.ledger_sum(s, user_id) == 5


# --- a real worker with loader processes ----------------------------------------------


@pytest.fixture(scope="module")
def worker_stack():
    database_url = support.create_postgres_database()
    config = support.migrated(
        support.test_config(
            database_url, runtime="null", loader_processes="2", fetch_timeout_s=support.GATE_MAX_S
        )
    )
    worker = support.WorkerProcess(config, name="loaderprocs").start()
    try:
        worker.wait_ready()
        yield config, create_app(config).test_client(), worker
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)
        support.drop_postgres_database(database_url)


def _loader_pids(worker) -> list[int]:
    return [p for p in _descendants(worker.proc.pid) if b"spawn_main" in _cmdline(p)]


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        for tid in os.listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP connection to 127.0.0.1:``port``."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(int(r[2].split(":")[1], 16) == port and r[9] in inodes for r in rows)


def test_a_worker_loads_in_processes_survives_a_killed_one_and_stops_them(
    worker_stack, photo_server
):
    _, client, worker = worker_stack
    user = support.new_user(client)
    loaders = _loader_pids(worker)
    assert len(loaders) == 2, worker.log_tail()
    key = uuid.uuid4().hex[:8]
    gate = photo_server.gate(key)
    url = photo_server.url(f"gate/{key}/parrot.jpg")
    held = client.post("/v1/jobs", json={"url": url}, headers=user["headers"]).get_json()["id"]
    support.wait_for(lambda: _fetches(photo_server, key) == 1, 60, "the held fetch")
    port = int(photo_server.base_url.rsplit(":", 1)[1].split("/")[0])
    [holder] = [pid for pid in loaders if _connected_to(pid, port)]
    os.kill(holder, signal.SIGKILL)
    support.wait_for(lambda: _fetches(photo_server, key) == 2, 60, "the fetch sent again")
    gate.set()
    job = client.get(f"/v1/jobs/{held}?wait=60", headers=user["headers"]).get_json()
    assert job["status"] == "succeeded", (job, worker.log_tail())
    replaced = _loader_pids(worker)
    assert len(replaced) == 2 and holder not in replaced

    wait = {**user["headers"], "Prefer": "wait=60"}
    resp = client.post("/v1/jobs", json={"url": photo_server.url("dog.jpg")}, headers=wait)
    assert resp.get_json()["status"] == "succeeded"

    worker.stop()  # SIGTERM: a warm shutdown stops the loader processes with the worker
    assert worker.proc.returncode == 0, worker.log_tail()
    assert not any(os.path.exists(f"/proc/{pid}") for pid in replaced)
    assert "leaked shared_memory" not in worker.log()
