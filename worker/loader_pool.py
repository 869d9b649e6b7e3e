"""Loader processes: the ``worker.loader.Loader`` that uses every core (issue #17 item 3).

With loading in the worker process's threads (``worker.loader.ThreadLoader``), decode
and resize run behind one GIL: on a GPU host with 8-64 cores per accelerator the model
would wait for one core's worth of Pillow. ``LoaderProcesses`` starts
``LOADER_PROCESSES`` processes ('spawn': the worker holds threads and TensorFlow,
which a fork would copy half-locked). Each runs what ``ThreadLoader`` runs, on
``FETCH_THREADS`` threads of its own with the same line (interactive images first,
bulk ones kept off the reserved threads): it fetches, reads uploads from Redis
itself (the bytes never pass through the worker), decodes under the one pixel budget
that all the processes share and resizes to each model's input. The uint8 arrays
come back pickled through the process's pipe (150 KB for MobileNet: tens of
microseconds of an image's ~8 ms; a shared-memory block of slots saved about 40 µs
an image and is gone, docs/benchmarks.md, "Loader processes").

A loader process that dies (SIGKILL, OOM) loses nothing: its tasks in flight are sent
once more to another process, then fail (``internal_error``, so the job is refunded),
the pixels it held and its places in the budget's line are given back, and a new
process takes its place. A process with a task past its deadline (fetch, decode wait
and slack) is killed, and its tasks go the same way; ``health()`` reports it until
its successor is ready.

A loader process says READY once it is set up. One that exits before that (it cannot
import the project...) would only die again: it is started again after a back-off
(START_BACKOFF_S, doubling up to START_BACKOFF_MAX_S, one log line per try), and
``health()`` reports it, which the worker publishes with its heartbeat for /readyz.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from shared import logs
from shared.config import Config
from shared.errors import ServiceError
from shared.pixel_budget import PixelBudget
from shared.redis_client import make_redis
from shared.uploads import UploadStore
from worker.loader import (
    ImageResult,
    ImageTask,
    ImageWork,
    Line,
    active_loads,
    failed,
    start_threads,
)

log = logging.getLogger(__name__)

#: Sends of one task: the first, and once more after its loader process died.
TASK_SENDS = 2
STOP_WAIT_S = 10.0
RESULT_SLACK_S = 60.0
LOST_MESSAGE = "The image loader stopped while loading the image."
#: What a loader process sends once it is set up, before it reads any task.
READY = "ready"
#: The wait before starting again a loader process that exited before READY: doubled
#: at each failure in a row, up to the cap.
START_BACKOFF_S = 0.5
START_BACKOFF_MAX_S = 30.0
#: The directory that holds the ``worker`` and ``shared`` packages.
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass
class _Pending:
    task: ImageTask
    future: Future
    deadline: float
    sends: int = 0


@dataclass
class _Process:
    """Loader process ``index``'s place: the process now there, and how it started."""

    proc: Any = None  # None: dead, waiting for its restart
    conn: Any = None
    ready: bool = False
    start_failures: int = 0  # exits before READY in a row
    hung: bool = False  # killed for a task past its deadline; until its successor is READY
    killed: Any = None  # the process killed as hung (its death not yet read)
    restart: threading.Timer | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: dict[int, _Pending] = field(default_factory=dict)


class LoaderProcesses:
    """A ``worker.loader.Loader`` on loader processes; thread-safe."""

    def __init__(self, config: Config, processes: int) -> None:
        if processes < 1:
            raise ValueError("LoaderProcesses needs at least one process")
        self._config = config
        self._limit_s = config.fetch_timeout_s + config.decode_wait_s + RESULT_SLACK_S
        self._ctx = multiprocessing.get_context("spawn")
        # One budget for every process's decodes; owner i is loader process i (its
        # replacement too, once the dead one's share is reclaimed), the last this one.
        self.budget = PixelBudget(
            config.decode_budget_pixels,
            config.decode_wait_s,
            owners=processes + 1,
            waiters=config.fetch_threads,
        )
        self._lock = threading.Lock()
        self._places = [_Process() for _ in range(processes)]
        self._next_id = 0
        self._closed = False
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        _make_project_importable()
        for index in range(processes):
            self._start(index)
        self._reader = threading.Thread(target=self._read, daemon=True, name="loader-results")
        self._reader.start()

    # --- the worker's side ------------------------------------------------------

    def health(self) -> str | None:
        """None while every loader process runs or starts as usual; else what is wrong."""
        with self._lock:
            failing = [p.start_failures for p in self._places if p.start_failures]
            hung = sum(p.hung for p in self._places)
        if failing:
            return (
                f"{len(failing)} of {len(self._places)} loader process(es) cannot start "
                f"(exited before ready {max(failing)} time(s) in a row; see the worker's log)"
            )
        if hung:
            return (
                f"{hung} of {len(self._places)} loader process(es) gave no answer within "
                f"{self._limit_s:.0f} s and were killed; restarting"
            )
        return None

    def submit(self, task: ImageTask) -> Future[ImageResult]:
        """Send ``task`` to the least busy process; its line there puts interactive first."""
        future: Future[ImageResult] = Future()
        pending = _Pending(task, future, time.monotonic() + self._limit_s)
        with self._lock:
            if self._closed:
                raise RuntimeError("the loader processes are stopped")
            # Not one killed as hung: until its sentinel is read it looks alive.
            alive = [i for i, p in enumerate(self._places) if p.proc is not None and not p.hung]
            places = alive or list(range(len(self._places)))  # all restarting: wait there
            index = min(places, key=lambda i: len(self._places[i].in_flight))
            self._next_id += 1
            task_id = self._next_id
        self._send(index, task_id, pending)
        return future

    def close(self) -> None:
        """Stop the processes (those loading finish their tasks)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            places = list(self._places)
        for place in places:
            if place.restart is not None:
                place.restart.cancel()
            try:
                with place.send_lock:
                    place.conn.send(None)
            except (OSError, ValueError, AttributeError):
                pass  # already gone
        deadline = time.monotonic() + STOP_WAIT_S
        for proc in [p.proc for p in places if p.proc is not None]:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self._wake_w.send(None)
        self._reader.join(STOP_WAIT_S)
        for index, place in enumerate(places):
            if place.conn is not None:
                self._receive(index, place.conn)  # answers the reader left unread
        with self._lock:
            lost = [pending for p in places for pending in p.in_flight.values()]
            for place in places:
                place.in_flight.clear()
        for pending in lost:
            _lose(pending)
        self.budget.close()

    def _send(self, index: int, task_id: int, pending: _Pending) -> None:
        with self._lock:
            place = self._places[index]
            pending.sends += 1
            pending.deadline = time.monotonic() + self._limit_s  # each send has its own
            place.in_flight[task_id] = pending  # counted before the lock goes
            conn = place.conn
        try:
            with place.send_lock:
                conn.send((task_id, pending.task))
        except (OSError, ValueError):
            pass  # the process is dead: the reader sees its sentinel and resends

    def _read(self) -> None:
        """Results, deaths and deadlines, for all processes (one thread, which must not die)."""
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
            live = [(i, p) for i, p in enumerate(self._places) if p.proc is not None]
            conns = {p.conn: i for i, p in live}
            sentinels = {p.proc.sentinel: i for i, p in live}
        ready = wait([*conns, *sentinels, self._wake_r], timeout=1.0)
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
        self._expire()
        return False

    def _expire(self) -> None:
        # A loader bounds each task (fetch deadline, decode wait); past that, something is
        # wrong there. A process with a task past its deadline is killed: left alive it
        # would look idle (the task no longer counted) and draw more tasks, and one that
        # reads no more of its pipe would block their sends. Its death (``_died``) sends
        # its tasks once more, or fails them, and starts a new process.
        now = time.monotonic()
        with self._lock:
            hung = [
                place
                for place in self._places
                if place.proc is not None
                and place.proc is not place.killed
                and any(p.deadline < now for p in place.in_flight.values())
            ]
            for place in hung:
                place.hung, place.killed = True, place.proc
            # Waiting for a restart (no process): nothing to kill, fail them here.
            late = [
                place.in_flight.pop(task_id)
                for place in self._places
                if place.proc is None
                for task_id, pending in list(place.in_flight.items())
                if pending.deadline < now
            ]
        for place in hung:
            log.error(
                "loader process %s gave no answer within %.0f s; killing it",
                place.proc.pid,
                self._limit_s,
            )
            place.proc.kill()
        for pending in late:
            log.error("a loader process gave no answer within %.0f s", self._limit_s)
            _lose(pending)

    def _receive(self, index: int, conn: Any) -> None:
        try:
            while conn.poll():
                reply = conn.recv()
                if reply == READY:
                    self._started(index)
                    continue
                task_id, result = reply
                with self._lock:
                    pending = self._places[index].in_flight.pop(task_id, None)
                if pending is not None:
                    pending.future.set_result(result)
        except (EOFError, OSError):
            pass  # the process died: its sentinel says so

    def _started(self, index: int) -> None:
        with self._lock:
            place = self._places[index]
            place.ready, place.hung = True, False
            failures, place.start_failures = place.start_failures, 0
            # Its tasks were sent before it could read them: their time starts now.
            deadline = time.monotonic() + self._limit_s
            for pending in place.in_flight.values():
                pending.deadline = max(pending.deadline, deadline)
        if failures:
            log.info("loader process %d started after %d failed start(s)", index, failures)

    def _died(self, index: int) -> None:
        with self._lock:
            place = self._places[index]
            proc = place.proc
            if proc is None or proc.is_alive():
                return
        self._receive(index, place.conn)  # what it answered before it died
        with self._lock:
            place.proc = None
            lost = list(place.in_flight.items())
            place.in_flight.clear()
            closed = self._closed
            if not place.ready:
                place.start_failures += 1
            failures = place.start_failures
        # Before a replacement takes the same owner: what the dead one held would be
        # lost to every process for good (an OOM kill strikes mid-decode).
        reclaimed = self.budget.reclaim(index)
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
                _lose(pending)

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
            self._places[index].restart = timer
        timer.start()

    def _restart(self, index: int) -> None:
        with self._lock:
            self._places[index].restart = None
            if self._closed:
                return
        try:
            self._start(index)
        except Exception:  # a timer thread's error would go unseen: try again later
            log.exception("starting loader process %d failed", index)
            with self._lock:
                self._places[index].start_failures += 1
                failures = self._places[index].start_failures
            self._start_later(index, _NotStarted(), failures)

    def _least_busy_other(self, dead: int) -> int:
        with self._lock:
            others = [
                i
                for i, p in enumerate(self._places)
                if p.proc is not None and not p.hung and i != dead
            ]
            if not others:
                return dead
            return min(others, key=lambda i: len(self._places[i].in_flight))

    def _start(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=_child_main,
            args=(theirs, self._config, self.budget.member(index)),
            name=f"imgclf-loader-{index}",
            daemon=True,
        )
        proc.start()
        theirs.close()
        with self._lock:
            place = self._places[index]
            old, place.conn = place.conn, ours
            place.proc, place.ready = proc, False
            # Sent to the dead one's pipe between its death and now: never read there.
            orphans = list(place.in_flight.items())
        if old is not None:
            old.close()
        for task_id, pending in orphans:
            pending.sends -= 1  # that send never reached a process
            self._send(index, task_id, pending)
        if hasattr(self, "_reader"):
            self._wake_w.send(None)  # the reader waits on the new pipe and sentinel too


def _lose(pending: _Pending) -> None:
    error = ServiceError(LOST_MESSAGE, code="internal_error")
    pending.future.set_result(failed(error, expected=False))


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


def _child_main(conn: Connection, config: Config, budget: PixelBudget) -> None:
    """A loader process: tasks in from ``conn``, results back through it."""
    # Ctrl-C reaches the whole process group: the worker decides when loaders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(config.log_level, config.log_format)
    work = ImageWork(config, UploadStore(make_redis(config), config), budget)
    send_lock = threading.Lock()

    def run(item: tuple[int, ImageTask]) -> None:
        task_id, task = item
        result = work.run(task)
        with send_lock:
            conn.send((task_id, result))

    line = Line(config.fetch_threads, active_loads(1))  # a process: one core's worth
    threads = start_threads(line, run, config.fetch_threads)
    conn.send(READY)  # before any task: a process that dies before this read none
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the worker is gone: nobody wants the rest
                line.close(drop=True)
                break
            if message is None:  # close(): finish what is waiting and running
                break
            line.put(message[1].priority, message)
    finally:
        line.close()
        for thread in threads:
            thread.join()
