"""The one way the workers run periodic work: ``Periodic``, a thread with an interval.

Five loops use it: the reconciler and retention (one pass per interval cluster-wide,
elected by a ``Lease``), the webhook sweep, the heartbeat and the metrics flush (every
process, no election). Each pass waits its interval, give or take ``jitter`` (so workers started
together do not hit Redis and the database in step); after a pass that raised, the
wait doubles per failure in a row up to ``max_backoff_s`` (a database or Redis outage
costs one warning per try, not a tight loop), and the first pass that succeeds goes
back to the interval. Setting ``stop`` ends the wait at once: the thread ends after
the pass under way, if any. The thread is a daemon, so a process that exits never
waits for it.

Why not Celery beat: beat is one more process to deploy and keep single (several beat
instances each send every task; a locking scheduler such as RedBeat stops its process
when it loses its lock), its work would arrive as messages competing with the
classification queues, and three of the five loops are per process anyway (the
heartbeat renews this process's leases; the sweep fills this process's delivery
threads; the metrics are this process's). See docs/architecture.md, "Periodic work".
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from redis.exceptions import LockError
from redis.lock import Lock

log = logging.getLogger(__name__)

#: How far (a fraction of the wait) each wait may stray either way.
JITTER = 0.1
#: Back-off cap, in intervals, unless a loop says otherwise.
BACKOFF_INTERVALS = 4


@dataclass(frozen=True)
class Lease:
    """One pass per interval cluster-wide: the worker that takes redis-py's ``Lock`` on
    ``key`` runs it, and the others skip that interval.

    ``ttl_s`` must be longer than one pass: it is what keeps a second pass from starting
    beside a slow one, and how long a holder that died mid-pass blocks the others. After
    the pass the lock is cut to the end of the interval (``extend(..., replace_ttl=True)``)
    or released if the interval is already over, so the next pass comes on time.
    """

    client: redis.Redis
    key: str
    ttl_s: float


@dataclass
class Periodic:
    """Run ``run_pass`` every ``interval_s`` on a daemon thread until ``stop`` is set."""

    name: str
    interval_s: float
    run_pass: Callable[[], object]
    stop: threading.Event = field(default_factory=threading.Event)
    lease: Lease | None = None
    max_backoff_s: float | None = None  # None: BACKOFF_INTERVALS intervals
    run_at_start: bool = False  # one pass before the first wait
    # Told of every failed try, the election's included (Redis down: no pass ran).
    on_failure: Callable[[Exception], object] | None = None
    jitter: float = JITTER
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> Periodic:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread (after ``stop``); True if it ended."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def run(self) -> None:
        """The loop itself, in the caller's thread; returns once ``stop`` is set."""
        failures = 0
        wait = 0.0 if self.run_at_start else self.interval_s
        while not self.stop.wait(self._jittered(wait)):
            try:
                self.run_once()
                failures = 0
            except Exception as exc:  # never let the thread die: back off and try again
                failures += 1
                if self.on_failure is not None:
                    self.on_failure(exc)
                log.warning(
                    "%s failed (%d in a row), next try in %.3g s: %r",
                    self.name,
                    failures,
                    self.delay(failures),
                    exc,
                )
            wait = self.delay(failures)

    def run_once(self) -> bool:
        """One pass now, if this worker is elected (always, with no lease); True if it ran."""
        if self.lease is None:
            self.run_pass()
            return True
        lock = self.lease.client.lock(
            self.lease.key, timeout=self.lease.ttl_s, blocking=False, thread_local=False
        )
        if not lock.acquire():
            return False  # another worker runs this interval's pass
        started = time.monotonic()
        try:
            self.run_pass()
        finally:
            self._hand_over(lock, self.interval_s - (time.monotonic() - started))
        return True

    def delay(self, failures: int) -> float:
        """The wait before the next pass, after ``failures`` failed passes in a row."""
        if not failures:
            return self.interval_s
        cap = self.max_backoff_s
        cap = BACKOFF_INTERVALS * self.interval_s if cap is None else cap
        return max(self.interval_s, min(self.interval_s * 2**failures, cap))

    def _jittered(self, wait: float) -> float:
        return wait * random.uniform(1 - self.jitter, 1 + self.jitter) if wait else 0.0

    def _hand_over(self, lock: Lock, rest_s: float) -> None:
        # Held to the end of the interval, not released at once: released, the next
        # worker to wake would run a second pass within the same interval.
        try:
            if rest_s >= 0.001:
                lock.extend(rest_s, replace_ttl=True)
            else:
                lock.release()
        except LockError:  # LockNotOwnedError: expired mid-pass, maybe taken by another
            log.warning("%s: a pass outlived its %g s lease", self.name, lock.timeout)
        except redis.RedisError as exc:  # the lock expires by itself
            log.warning("%s: could not hand the lease over: %r", self.name, exc)
