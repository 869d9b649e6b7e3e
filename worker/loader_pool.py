"""Loader processes: fetch, decode and resize images on every core (issue #17 item 3).

With loading in the worker process's threads (``worker.loader``), decode and resize
run behind one GIL: on a GPU host with 8-64 cores per accelerator the model would
wait for one core's worth of Pillow. ``LoaderProcesses`` starts
``LOADER_PROCESSES`` processes ('spawn': the worker holds threads and TensorFlow,
which a fork would copy half-locked). Each fetches many images at once (a thread
per fetch, ``FETCH_THREADS`` per process, so a slow host holds one fetch thread,
never a process nor a batch slot), reads uploads from Redis itself (the bytes
never pass through the worker), decodes under the one pixel budget that all the
processes share (``DECODE_BUDGET_PIXELS`` in all, ``SharedPixelBudget``) and
resizes to each model's input.

The pixels come back through shared memory: the worker owns one block of slots,
each big enough for the largest model input as uint8, and names a slot per size
in each task; the loader writes there and replies with the shape only. The worker
copies the pixels out at once and frees the slot (measured against pickling the
arrays through the pipe: docs/benchmarks.md, "Loader processes").

What stays in the worker process: the SQL claims (``worker.pipeline.load`` runs on
the ``Loader``'s threads, which wait here for their images), the forward pass and
the writes. A loader process that dies (SIGKILL, OOM) loses nothing: its tasks in
flight are sent once more to another process, then fail (``internal_error``, so
the job is refunded), the pixels it held and its places in the budget's line are
given back, and a new process takes its place.

A loader process says READY once it is set up. One that exits before that (it cannot
import the project, cannot attach the shared memory...) would only die again: it is
started again after a back-off (START_BACKOFF_S, doubling up to START_BACKOFF_MAX_S,
one log line per try), and ``health()`` reports it, which the worker publishes with
its heartbeat for /readyz.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from shared import logs
from shared.config import Config
from shared.errors import ServiceError, UploadExpired
from shared.images import decode_image, to_pixels
from shared.pixel_budget import SharedPixelBudget
from shared.redis_client import make_redis
from shared.uploads import UploadStore
from worker.fetch import Fetcher
from worker.loader import reserved_threads

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)

#: Sends of one task: the first, and once more after its loader process died.
TASK_SENDS = 2
STOP_WAIT_S = 10.0
SHM_MAX_BYTES = 256 * 1024 * 1024
RESULT_SLACK_S = 60.0
INTERACTIVE, BULK, STOP_PRIORITY = 0, 1, 2
LOST_MESSAGE = "The image loader stopped while loading the image."
#: What a loader process sends once it is set up, before it reads any task.
READY = "ready"
#: The wait before starting again a loader process that exited before READY: doubled
#: at each failure in a row, up to the cap.
START_BACKOFF_S = 0.5
START_BACKOFF_MAX_S = 30.0
#: The directory that holds the ``worker`` and ``shared`` packages.
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class ImageTask:
    """One image to load: from ``url``, or the upload of job ``upload_id``, at ``sizes``.

    ``priority``: 0 for an interactive job's image, 1 for a bulk one's (loaded after).
    """

    url: str | None
    upload_id: str | None
    sizes: tuple[Size, ...]
    priority: int = BULK


@dataclass
class ImageResult:
    """A task's arrays (uint8 HxWx3, one per size), or its error.

    ``expected``: the error is the image's own (fetch, format, size), not ours.
    """

    arrays: dict[Size, np.ndarray] | None = None
    error: ServiceError | None = None
    expected: bool = True
    fetch_s: float | None = None


@dataclass
class _Pending:
    task: ImageTask
    slots: list[int]
    future: Future
    sends: int = 0


class LoaderProcesses:
    """A pool of loader processes; ``load`` may be called from many threads at once."""

    def __init__(
        self, config: Config, sizes: Sequence[Size], processes: int, slots: int | None = None
    ) -> None:
        if processes < 1:
            raise ValueError("LoaderProcesses needs at least one process")
        self._config = config
        self._threads = config.fetch_threads
        self._slot_bytes = max(w * h * 3 for w, h in sizes)
        # Enough for every fetch thread of every process to hold one slot, twice over,
        # within SHM_MAX_BYTES (docker-compose.yml gives the worker 512 MiB of /dev/shm).
        fit = max(2 * processes, SHM_MAX_BYTES // self._slot_bytes)
        count = slots or min(2 * processes * self._threads, fit)
        self._shm = SharedMemory(create=True, size=count * self._slot_bytes)
        self._slots = np.ndarray((count, self._slot_bytes), np.uint8, buffer=self._shm.buf)
        self._free = list(range(count))
        self._ctx = multiprocessing.get_context("spawn")
        # Kept for interactive images: fetch threads per process (bulk ones take at most
        # the rest), and slots in all.
        reserve = reserved_threads(self._threads)
        self._bulk_cap = self._threads - reserve
        self._reserved_slots = min(reserve * processes, count // 4)
        # One budget for every process's decodes; owner i is loader process i (its
        # replacement too, once the dead one's share is reclaimed), the last the worker.
        self._budget = SharedPixelBudget(
            config.decode_budget_pixels,
            config.decode_wait_s,
            owners=processes + 1,
            waiters=max(self._threads, config.effective_loader_threads),
        )
        self.budget = self._budget.member(processes)
        self._lock = threading.Condition()
        # Per process index: whether the process now there said READY, how many in a
        # row exited before that, and the timer that starts the next one meanwhile.
        self._ready: list[bool] = []
        self._start_failures: list[int] = []
        self._restarts: list[threading.Timer | None] = []
        self._send_locks: list[threading.Lock] = []
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        self._in_flight: list[dict[int, _Pending]] = []
        self._next_id = 0
        self._closed = False
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        _make_project_importable()
        for index in range(processes):
            self._ready.append(False)
            self._start_failures.append(0)
            self._restarts.append(None)
            self._procs.append(None)
            self._conns.append(None)  # type: ignore[arg-type]
            self._in_flight.append({})
            self._send_locks.append(threading.Lock())
            self._start(index)
        self._reader = threading.Thread(target=self._read, daemon=True, name="loader-results")
        self._reader.start()

    # --- the worker's side ------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """The shared pixel budget now: free, waiting, and the peak held at once."""
        budget = self._budget
        return {"free": budget.free, "waiting": budget.waiting, "peak": budget.peak}

    def health(self) -> str | None:
        """None while every loader process runs or starts as usual; else what is wrong."""
        with self._lock:
            failing = [n for n in self._start_failures if n]
        if not failing:
            return None
        return (
            f"{len(failing)} of {len(self._start_failures)} loader process(es) cannot start "
            f"(exited before ready {max(failing)} time(s) in a row; see the worker's log)"
        )

    def pids(self) -> list[int]:
        """The loader processes' pids (tests kill one)."""
        with self._lock:
            return [p.pid for p in self._procs if p is not None]

    def load(self, tasks: Sequence[ImageTask]) -> list[ImageResult]:
        """Load every task across the processes; returns when all are done, in order."""
        futures = [self._submit(task) for task in tasks]
        return [self._result(f) for f in futures]

    def _result(self, future: Future) -> ImageResult:
        # A loader bounds each task (fetch deadline, decode wait); past that, something is
        # wrong there: fail the image rather than hold its message for ever. A late reply
        # still frees the task's slots.
        limit = self._config.fetch_timeout_s + self._config.decode_wait_s + RESULT_SLACK_S
        try:
            return future.result(timeout=limit)
        except TimeoutError:
            log.error("a loader process gave no answer within %.0f s", limit)
            error = ServiceError(LOST_MESSAGE, code="internal_error")
            return ImageResult(error=error, expected=False)

    def close(self) -> None:
        """Stop the processes (those loading finish their tasks) and free the memory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()  # loads waiting for a slot give up
            procs = [p for p in self._procs if p is not None]
            timers = [t for t in self._restarts if t is not None]
        for timer in timers:
            timer.cancel()
        for index, conn in enumerate(self._conns):
            try:
                with self._send_locks[index]:
                    conn.send(None)
            except (OSError, ValueError):
                pass  # already gone
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self._wake_w.send(None)
        self._reader.join(STOP_WAIT_S)
        with self._lock:
            for index in range(len(self._in_flight)):
                self._fail_all(index)
        del self._slots
        self._shm.close()
        self._shm.unlink()
        self._budget.close()

    def _submit(self, task: ImageTask) -> Future:
        future: Future = Future()
        with self._lock:
            # Waits while it may not go yet: every slot taken, or (bulk) no room left
            # outside the share kept for interactive images.
            while True:
                if self._closed:
                    raise RuntimeError("the loader processes are stopped")
                if (index := self._place_for(task)) is not None:
                    break
                self._lock.wait()
            slots = [self._free.pop() for _ in task.sizes]
            pending = _Pending(task, slots, future)
            self._next_id += 1
            task_id = self._next_id
            # Counted in flight before the lock goes: the next task sees it.
            conn = self._register(index, task_id, pending)
        self._transmit(index, conn, task_id, pending)
        return future

    def _place_for(self, task: ImageTask) -> int | None:
        """The least busy process that may take ``task`` now, or None (under the lock).

        Issue #23 item 5: one user's batch of hosts that drip a byte a second held every
        fetch thread and slot, and another user's single job waited for one of them to
        time out. So bulk images keep off ``reserve`` fetch threads of each process and
        as many slots: an interactive image finds a thread at once, whatever bulk does.
        """
        interactive = task.priority == INTERACTIVE
        spare = 0 if interactive else self._reserved_slots
        if len(self._free) < len(task.sizes) + spare:
            return None
        alive = [i for i, p in enumerate(self._procs) if p is not None]
        places = alive or list(range(len(self._procs)))  # all restarting: wait in line
        if not interactive:
            places = [i for i in places if self._bulk_in_flight(i) < self._bulk_cap]
        if not places:
            return None
        return min(places, key=lambda i: len(self._in_flight[i]))

    def _bulk_in_flight(self, index: int) -> int:
        return sum(p.task.priority != INTERACTIVE for p in self._in_flight[index].values())

    def _send(self, index: int, task_id: int, pending: _Pending) -> None:
        with self._lock:
            conn = self._register(index, task_id, pending)
        self._transmit(index, conn, task_id, pending)

    def _register(self, index: int, task_id: int, pending: _Pending) -> Connection:
        """Count ``pending`` in flight at process ``index``; its pipe (under the lock)."""
        pending.sends += 1
        self._in_flight[index][task_id] = pending
        return self._conns[index]

    def _transmit(self, index: int, conn: Connection, task_id: int, pending: _Pending) -> None:
        task = pending.task
        message = (task_id, task.url, task.upload_id, task.sizes, pending.slots, task.priority)
        try:
            with self._send_locks[index]:
                conn.send(message)
        except (OSError, ValueError):
            pass  # the process is dead: the reader sees its sentinel and resends

    def _read(self) -> None:
        """Results and deaths, for all processes (one thread, which must not die)."""
        while True:
            try:
                if self._read_once():
                    return
            except Exception:
                log.exception("loader results: unexpected error; going on")

    def _read_once(self) -> bool:
        """Handle what is ready now; True once closed."""
        with self._lock:
            # Not the pipe of a dead process waiting for its restart: it reads as ready
            # (at its end) for as long as it stays, and this loop would spin.
            conns = {c: i for i, c in enumerate(self._conns) if self._procs[i] is not None}
            sentinels = {p.sentinel: i for i, p in enumerate(self._procs) if p is not None}
        ready = wait([*conns, *sentinels, self._wake_r])
        if self._wake_r in ready:
            self._wake_r.recv()
            with self._lock:
                if self._closed:
                    return True
        for ready_one in ready:
            if ready_one in conns:
                self._receive(conns[ready_one], ready_one)
        for ready_one in ready:
            if ready_one in sentinels:
                self._died(sentinels[ready_one])
        return False

    def _receive(self, index: int, conn: Connection) -> None:
        try:
            while conn.poll():
                reply = conn.recv()
                if reply == READY:
                    self._started(index)
                else:
                    self._resolve(index, reply)
        except (EOFError, OSError):
            pass  # the process died: its sentinel says so

    def _started(self, index: int) -> None:
        with self._lock:
            self._ready[index] = True
            failures, self._start_failures[index] = self._start_failures[index], 0
        if failures:
            log.info("loader process %d started after %d failed start(s)", index, failures)

    def _resolve(self, index: int, reply: tuple) -> None:
        task_id, ok, body, fetch_s = reply
        with self._lock:
            pending = self._in_flight[index].pop(task_id, None)
        if pending is None:
            return
        if ok:
            arrays = {}
            for size, slot, shape in zip(pending.task.sizes, pending.slots, body, strict=True):
                count = int(np.prod(shape))
                arrays[size] = self._slots[slot, :count].reshape(shape).copy()
            result = ImageResult(arrays=arrays, fetch_s=fetch_s)
        else:
            code, message, expected = body
            result = ImageResult(error=ServiceError(message, code=code), expected=expected)
            result.fetch_s = fetch_s
        self._release(pending)
        pending.future.set_result(result)

    def _release(self, pending: _Pending) -> None:
        with self._lock:
            self._free.extend(pending.slots)
            self._lock.notify_all()

    def _died(self, index: int) -> None:
        with self._lock:
            proc = self._procs[index]
            if proc is None or proc.is_alive():
                return
            conn = self._conns[index]
        self._receive(index, conn)  # what it answered before it died
        with self._lock:
            self._procs[index] = None
            lost = list(self._in_flight[index].items())
            self._in_flight[index].clear()
            closed = self._closed
            if not self._ready[index]:
                self._start_failures[index] += 1
            failures = self._start_failures[index]
        # Before a replacement takes the same owner: what the dead one held would be
        # lost to every process for good (an OOM kill strikes mid-decode).
        reclaimed = self._budget.reclaim(index)
        if not closed and failures:
            self._start_later(index, proc, failures)
        elif not closed:
            log.error(
                "loader process %s died (exit code %s) with %d image(s) in flight and "
                "%d pixels of the decode budget, given back",
                proc.pid,
                proc.exitcode,
                len(lost),
                reclaimed,
            )
            self._start(index)
        for task_id, pending in lost:
            if pending.sends < TASK_SENDS and not closed:
                self._send(self._least_busy_other(index), task_id, pending)
            else:
                self._lost(pending)

    def _start_later(self, index: int, proc: Any, failures: int) -> None:
        """Start process ``index`` again after a back-off: it died before READY."""
        delay = min(START_BACKOFF_S * 2 ** (failures - 1), START_BACKOFF_MAX_S)
        log.error(
            "loader process %s exited (exit code %s) before it was ready, %d time(s) in a "
            "row; starting it again in %g s",
            proc.pid,
            proc.exitcode,
            failures,
            delay,
        )
        timer = threading.Timer(delay, self._restart, (index,))
        timer.daemon = True
        with self._lock:
            self._restarts[index] = timer
        timer.start()

    def _restart(self, index: int) -> None:
        with self._lock:
            self._restarts[index] = None
            if self._closed:
                return
        try:
            self._start(index)
        except Exception:  # a timer thread's error would go unseen: try again later
            log.exception("starting loader process %d failed", index)
            with self._lock:
                self._start_failures[index] += 1
                failures = self._start_failures[index]
            self._start_later(index, _NotStarted(), failures)

    def _least_busy_other(self, dead: int) -> int:
        with self._lock:
            others = [i for i, p in enumerate(self._procs) if p is not None and i != dead]
            if not others:
                return dead
            return min(others, key=lambda i: len(self._in_flight[i]))

    def _lost(self, pending: _Pending) -> None:
        self._release(pending)
        error = ServiceError(LOST_MESSAGE, code="internal_error")
        pending.future.set_result(ImageResult(error=error, expected=False))

    def _fail_all(self, index: int) -> None:
        # Under the lock, at close: whatever is still in flight fails (refunded).
        for pending in self._in_flight[index].values():
            self._free.extend(pending.slots)
            error = ServiceError(LOST_MESSAGE, code="internal_error")
            pending.future.set_result(ImageResult(error=error, expected=False))
        self._in_flight[index].clear()

    def _start(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(
                theirs,
                self._shm.name,
                self._slot_bytes,
                self._config,
                self._threads,
                self._budget.member(index),
            ),
            name=f"imgclf-loader-{index}",
            daemon=True,
        )
        proc.start()
        theirs.close()
        with self._lock:
            old, self._conns[index] = self._conns[index], ours
            self._procs[index] = proc
            self._ready[index] = False
            # Sent to the dead one's pipe between its death and now: never read there.
            orphans = list(self._in_flight[index].items())
        if old is not None:
            old.close()
        for task_id, pending in orphans:
            pending.sends -= 1  # that send never reached a process
            self._send(index, task_id, pending)
        if hasattr(self, "_reader"):
            self._wake_w.send(None)  # the reader waits on the new pipe and sentinel too


class _NotStarted:
    pid = exitcode = None


def _make_project_importable() -> None:
    """Put the project on sys.path, which 'spawn' children start with.

    A spawned child gets its parent's sys.path and imports ``worker.loader_pool`` from
    it before it runs anything. The ``celery`` program, as the README starts the worker,
    has no project directory on sys.path (Celery's ``import_from_cwd`` adds the working
    directory only while it imports the app), and every loader died on ``import worker``.
    Appended: it adds the project's packages, and shadows nothing found before.
    """
    here = os.path.realpath(PROJECT_ROOT)
    if not any(os.path.realpath(p or os.curdir) == here for p in sys.path):
        sys.path.append(PROJECT_ROOT)


# --- the loader process's side ------------------------------------------------------


def _child_main(
    conn: Connection,
    shm_name: str,
    slot_bytes: int,
    config: Config,
    threads: int,
    budget: SharedPixelBudget,
) -> None:
    """A loader process: tasks in from ``conn``, pixels out to the shared slots."""
    # Ctrl-C reaches the whole process group: the worker decides when loaders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(config.log_level, config.log_format)
    shm = SharedMemory(shm_name)
    slots = np.ndarray((shm.size // slot_bytes, slot_bytes), np.uint8, buffer=shm.buf)
    work = _ChildWork(config, slots, conn, budget)
    # Interactive images first (priority 0), then bulk ones, each in arrival order: a
    # single job's image waits for the images being loaded, not for bulk ones queued.
    line: queue.PriorityQueue = queue.PriorityQueue()
    fetchers = [
        threading.Thread(target=_serve, args=(line, work), name=f"fetch-{i}", daemon=True)
        for i in range(threads)
    ]
    for thread in fetchers:
        thread.start()
    conn.send(READY)  # before any task: a process that dies before this read none
    order = itertools.count()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker is gone: nobody wants the rest
                _drain(line)
                break
            if message is None:  # close(): finish what is waiting and running
                break
            *task, priority = message
            line.put((priority, next(order), task))
    finally:
        for _ in fetchers:
            line.put((STOP_PRIORITY, next(order), None))  # after every task
        for thread in fetchers:
            thread.join()
        del slots, work
        shm.close()


def _drain(line: queue.PriorityQueue) -> None:
    while True:
        try:
            line.get_nowait()
        except queue.Empty:
            return


def _serve(line: queue.PriorityQueue, work: _ChildWork) -> None:
    while True:
        _, _, task = line.get()
        if task is None:
            return
        work.run(*task)


class _ChildWork:
    """What one loader process holds: a fetcher, Redis for uploads, its share of the budget."""

    def __init__(
        self, config: Config, slots: np.ndarray, conn: Connection, budget: SharedPixelBudget
    ) -> None:
        self._config = config
        self._slots = slots
        self._conn = conn
        self._send_lock = threading.Lock()
        self._fetcher = Fetcher(config)
        self._uploads = UploadStore(make_redis(config), config)
        self._budget = budget

    def run(
        self,
        task_id: int,
        url: str | None,
        upload_id: str | None,
        sizes: tuple[Size, ...],
        slots: list[int],
    ) -> None:
        fetch_s = None
        try:
            start = time.perf_counter()
            data = self._read(url, upload_id)
            fetch_s = time.perf_counter() - start
            reply: tuple = (task_id, True, self._decode(data, sizes, slots), fetch_s)
        except ServiceError as exc:
            reply = (task_id, False, (exc.code, exc.message, True), fetch_s)
        except Exception as exc:  # one broken image must not stop the process
            log.exception("loading %s failed", url or f"upload {upload_id}")
            message = f"Could not load the image: {type(exc).__name__}"
            reply = (task_id, False, ("internal_error", message, False), fetch_s)
        with self._send_lock:
            self._conn.send(reply)

    def _read(self, url: str | None, upload_id: str | None) -> bytes:
        if url:
            return self._fetcher.fetch(url)
        data = self._uploads.get(upload_id or "")
        if data is None:
            raise UploadExpired()
        return data

    def _decode(self, data: bytes, sizes: tuple[Size, ...], slots: list[int]) -> list[tuple]:
        largest = max(sizes, key=lambda wh: wh[0] * wh[1])
        image = decode_image(
            data, max_pixels=self._config.max_image_pixels, at_least=largest, budget=self._budget
        )
        shapes = []
        for size, slot in zip(sizes, slots, strict=True):
            pixels = to_pixels(image, size)
            self._slots[slot, : pixels.size] = pixels.reshape(-1)
            shapes.append(pixels.shape)
        return shapes
