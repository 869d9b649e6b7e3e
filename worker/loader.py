"""The loader stage: a message's images are loaded before it may join a model batch.

Issue #14 item 2 and issue #17: fetching and decoding used to run inside a batch
slot, so a host that drips bytes held a slot (and the model's turn) for up to
FETCH_TIMEOUT_S. Now ``worker.batching.ContinuousBatches`` hands each arriving
message to a ``Loader``, and a message becomes eligible for a batch only once
its load is done; the batch slot then only predicts and writes.

The interface is two calls, so the way loading runs can change behind it: a pool
of threads (``LOADER_THREADS``; fetching, Pillow and SQL release the GIL) that
claims the jobs in SQL and then loads the images in this process, or hands them to
the loader processes (``worker.loader_pool``, ``LOADER_PROCESSES``), which fetch,
decode under the one shared pixel budget and resize across cores. A GPU decoder
(DALI) in place of Pillow would go behind the same interface. What a load does is
``worker.pipeline.load``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

#: One loader or fetch thread in this many (at least one) is kept for interactive work.
INTERACTIVE_SHARE = 4

T = TypeVar("T")
Done = Callable[[T | None, BaseException | None], None]


def reserved_threads(threads: int) -> int:
    """Threads of ``threads`` that bulk work leaves to interactive work (none of one).

    Issue #23 item 5: one user's batch on hosts that drip a byte a second held every
    thread, and another user's single job waited for one of them to time out.
    """
    return 0 if threads < 2 else max(1, threads // INTERACTIVE_SHARE)


class LoadCanceled(Exception):
    """The error a load gets when ``close`` came before it started."""


class Loader(Generic[T]):
    """Runs ``load(job_ids)`` for messages, one per loader thread; thread-safe."""

    def __init__(self, load: Callable[[list[str]], T], threads: int) -> None:
        self._load = load
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="loader")
        self._closed = False

    def submit(self, job_ids: list[str], done: Done) -> None:
        """Start loading; ``done(result, error)`` is called later, from a loader thread.

        Never from the caller's own thread, so the caller may hold its locks. A load
        that ``close`` came before gets ``LoadCanceled`` without running.
        """
        self._pool.submit(self._run, job_ids, done)

    def close(self) -> None:
        """Start no more loads (worker shutdown); those running finish."""
        self._closed = True
        self._pool.shutdown(wait=False)

    def _run(self, job_ids: list[str], done: Done) -> None:
        try:
            if self._closed:
                raise LoadCanceled()
            result = self._load(job_ids)
        except Exception as exc:
            outcome: tuple = (None, exc)
        else:
            outcome = (result, None)
        try:
            done(*outcome)
        except Exception:  # the pool would swallow it: say so
            log.exception("handing over a load of %d job(s) failed", len(job_ids))
