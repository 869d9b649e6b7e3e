"""The one image-loading interface: fetch, decode under the pixel budget, resize.

A ``Loader`` takes an ``ImageTask`` (a URL, or an upload's job id, and the sizes its
models want) and returns a ``Future`` of its ``ImageResult`` (uint8 arrays, or the
image's error). Two kinds stand behind it, chosen by ``LOADER_PROCESSES``:

- ``ThreadLoader`` (0): ``FETCH_THREADS`` threads of the worker process (fetching,
  Pillow and Redis release the GIL);
- ``worker.loader_pool.LoaderProcesses`` (N): N spawned processes with
  ``FETCH_THREADS`` threads each, so decoding and resizing use every core.

Both run the same ``ImageWork`` on the same kind of ``Line``: interactive images
(jobs of no bulk batch) before bulk ones, and bulk images never on the last
``reserved_threads`` threads, so a batch of URLs on hosts that drip a byte a second
cannot hold every thread while another user's single job waits (issue #23 item 5).
That line is the only reserve for interactive work. It also keeps fast hosts from
crowding the cores: at most ``active_loads(cores)`` bulk images load at once that
started less than ``SLOW_AFTER_S`` ago, and one still loading after that no longer
counts, so slow hosts still get every bulk thread (issue #22). A GPU decoder (DALI)
in place of Pillow would go behind the same interface. ``worker.pipeline.Loading`` claims a
message's jobs and hands its images to the runtime's loader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shared.config import Config, usable_cores
from shared.errors import ServiceError, UploadExpired
from shared.images import decode_image, to_pixels
from shared.pixel_budget import PixelBudget
from shared.uploads import UploadStore
from worker.fetch import Fetcher

log = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)
INTERACTIVE, BULK = 0, 1
#: One loading thread in this many (at least one) is kept for interactive images.
INTERACTIVE_SHARE = 4
#: A bulk image loading for longer than this waits on its host more than on a core, and
#: stops counting against ``Line``'s active cap. A local or in-region image is fetched,
#: decoded and resized in well under this (the benchmark's photos: 5-15 ms).
SLOW_AFTER_S = 0.05


def reserved_threads(threads: int) -> int:
    """Threads of ``threads`` that bulk images leave to interactive ones (none of one)."""
    return 0 if threads < 2 else max(1, threads // INTERACTIVE_SHARE)


def active_loads(cores: int) -> int:
    """Bulk images a loader of ``cores`` cores runs at once while its hosts are fast: one
    decoding per core and one fetching. Twelve at once on 2 cores (the 16 threads' bulk
    share) ran bulk 8-10 % slower than three: they queue for the GIL ahead of the batch
    slots and the model's threads (docs/benchmarks.md, "Session 16")."""
    return cores + 1


class LoadCanceled(Exception):
    """The error a message's load gets when the stage closed before it started."""


@dataclass(frozen=True)
class ImageTask:
    """One image to load: from ``url``, or the upload of job ``upload_id``, at ``sizes``.

    ``priority``: INTERACTIVE for an image of a job of no bulk batch, else BULK.
    """

    url: str | None
    upload_id: str | None
    sizes: tuple[Size, ...]
    priority: int = BULK


@dataclass
class ImageResult:
    """A task's arrays (uint8 HxWx3, one per size), or its error (code and message).

    ``expected``: the error is the image's own (fetch, format, size), not ours. Plain
    fields, so that a result pickles between processes.
    """

    arrays: dict[Size, np.ndarray] | None = None
    code: str | None = None
    message: str = ""
    expected: bool = True
    fetch_s: float | None = None

    @property
    def error(self) -> ServiceError | None:
        return None if self.code is None else ServiceError(self.message, code=self.code)


def failed(error: ServiceError, expected: bool = True, fetch_s: float | None = None) -> ImageResult:
    return ImageResult(code=error.code, message=error.message, expected=expected, fetch_s=fetch_s)


class Loader(Protocol):
    """Loads images; every method may be called from many threads at once."""

    def submit(self, task: ImageTask) -> Future[ImageResult]: ...

    def health(self) -> str | None:
        """None while it can load; else what is wrong (published with the heartbeat)."""
        ...

    def close(self) -> None:
        """Stop: what is waiting and running still finishes."""
        ...


def load_all(loader: Loader, tasks: Sequence[ImageTask]) -> list[ImageResult]:
    """Load every task; returns when all are done, in order."""
    futures = [loader.submit(task) for task in tasks]
    return [f.result() for f in futures]


class ImageWork:
    """What a loading thread does with a task; one per process (thread-safe)."""

    def __init__(self, config: Config, uploads: UploadStore, budget: PixelBudget) -> None:
        self._config = config
        self._uploads = uploads
        self.budget = budget
        self.fetcher = Fetcher(config)

    def run(self, task: ImageTask) -> ImageResult:
        fetch_s = None
        try:
            start = time.perf_counter()
            data = self._read(task)
            fetch_s = time.perf_counter() - start
            largest = max(task.sizes, key=lambda wh: wh[0] * wh[1])
            image = decode_image(
                data,
                max_pixels=self._config.max_image_pixels,
                at_least=largest,
                budget=self.budget,
            )
            arrays = {size: to_pixels(image, size) for size in task.sizes}
            return ImageResult(arrays=arrays, fetch_s=fetch_s)
        except ServiceError as exc:
            return failed(exc, fetch_s=fetch_s)
        except Exception as exc:  # one broken image must not fail the others
            log.exception("loading %s failed", task.url or f"upload {task.upload_id}")
            error = ServiceError(f"Could not load the image: {type(exc).__name__}")
            return failed(error, expected=False, fetch_s=fetch_s)

    def _read(self, task: ImageTask) -> bytes:
        if task.url:
            return self.fetcher.fetch(task.url)
        data = self._uploads.get(task.upload_id or "")
        if data is None:
            raise UploadExpired()
        return data


class Line:
    """Items waiting for one of ``threads`` loading threads, which ``serve`` it.

    Interactive items first, each kind in arrival order; at most ``threads -
    reserved_threads(threads)`` threads run bulk items at once, so an interactive
    item finds a thread at once whatever bulk items do. Of those, at most ``active``
    bulk items are young (started less than ``SLOW_AFTER_S`` ago): on fast hosts that
    many load at once, and each item slow hosts hold lets one more start.
    """

    def __init__(self, threads: int, active: int | None = None) -> None:
        self._bulk_cap = threads - reserved_threads(threads)
        self._active = active or self._bulk_cap
        self._waiting: dict[int, deque[Any]] = {INTERACTIVE: deque(), BULK: deque()}
        self._bulk_started: dict[object, float] = {}  # running bulk items: start times
        self._closed = False
        self._changed = threading.Condition()

    def put(self, priority: int, item: Any) -> None:
        with self._changed:
            self._waiting[priority].append(item)
            # One item, one idle thread: waking all of them (16 by default) to find it
            # taken cost ~0.2 CPU ms an image. Any waiter can run it (interactive), or
            # none can until a bulk thread frees up (bulk at its cap), which notifies.
            self._changed.notify()

    def close(self, drop: bool = False) -> None:
        """Serve no more once empty; ``drop``: forget what is waiting too."""
        with self._changed:
            self._closed = True
            if drop:
                for waiting in self._waiting.values():
                    waiting.clear()
            self._changed.notify_all()

    def serve(self, run: Callable[[Any], None]) -> None:
        """A loading thread's loop: run the next item, until closed and empty."""
        while (taken := self._take()) is not None:
            token, item = taken
            try:
                run(item)
            finally:
                if token is not None:
                    with self._changed:
                        del self._bulk_started[token]
                        self._changed.notify()  # room for one more bulk item

    def _take(self) -> tuple[object | None, Any] | None:
        """(None, an interactive item) or (a token, a bulk item); None once closed."""
        with self._changed:
            while True:
                if self._waiting[INTERACTIVE]:
                    return None, self._waiting[INTERACTIVE].popleft()
                wait_s = self._bulk_wait_s() if self._waiting[BULK] else None
                if wait_s == 0:
                    token = object()
                    self._bulk_started[token] = time.monotonic()
                    return token, self._waiting[BULK].popleft()
                if self._closed and not any(self._waiting.values()):
                    return None
                # At the active cap, the oldest young item turns slow in wait_s.
                self._changed.wait(wait_s)

    def _bulk_wait_s(self) -> float | None:
        """0 if a bulk item may start now; else how long until one may (None: until a
        running one ends)."""
        if len(self._bulk_started) >= self._bulk_cap:
            return None
        now = time.monotonic()
        young = [t for t in self._bulk_started.values() if now - t < SLOW_AFTER_S]
        if len(young) < self._active:
            return 0
        return SLOW_AFTER_S - (now - min(young))


def start_threads(line: Line, run: Callable[[Any], None], threads: int) -> list[threading.Thread]:
    started = [
        threading.Thread(target=line.serve, args=(run,), name=f"fetch-{i}", daemon=True)
        for i in range(threads)
    ]
    for thread in started:
        thread.start()
    return started


class ThreadLoader:
    """Images loaded by ``FETCH_THREADS`` threads of this process (LOADER_PROCESSES=0)."""

    def __init__(self, config: Config, uploads: UploadStore, budget: PixelBudget) -> None:
        self.work = ImageWork(config, uploads, budget)
        self._line = Line(config.fetch_threads, active_loads(usable_cores()))
        start_threads(self._line, self._run, config.fetch_threads)

    def submit(self, task: ImageTask) -> Future[ImageResult]:
        future: Future[ImageResult] = Future()
        self._line.put(task.priority, (task, future))
        return future

    def health(self) -> str | None:
        return None

    def close(self) -> None:
        self._line.close()

    def _run(self, item: tuple[ImageTask, Future]) -> None:
        task, future = item
        future.set_result(self.work.run(task))
