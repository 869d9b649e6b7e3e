"""Job-finished notifications over Redis pub/sub, for long-polling clients.

The worker publishes after its SQL commit; a waiter registers first, then reads
SQL, so a finish between the two is never missed. SQL stays the source of truth:
a lost message only costs a waiter its periodic re-check.

A job submitted by the waiting request itself needs no first read: if the process's
listener has been subscribed since before the job existed, its finish cannot have
been published unheard, and the listener remembers the jobs it heard finish for a
while (``RECENT_S``). Such a wait reads SQL once, when its job is done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

import redis

from shared.config import Config

log = logging.getLogger(__name__)

RECHECK_S = 1.0
IDLE_EXIT_S = 60.0  # a listener with no waiter for this long ends (see DoneListener)
# How long, and for how many jobs at most, the listener remembers a job it heard finish
# (every API process hears every job, bulk ones too). A waiter only needs it between
# its submission and its registration, milliseconds; one whose job was forgotten
# meanwhile is answered by its re-check, RECHECK_S later.
RECENT_S = 10.0
RECENT_MAX = 20_000


def channel(config: Config, job_id: str) -> str:
    return f"{config.queue_prefix}:job-done:{job_id}"


def publish_done(client: redis.Redis, config: Config, job_ids: Iterable[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.publish(channel(config, job_id), b"1")
    pipe.execute()


class DoneListener:
    """One pattern subscription per process, shared by every request that waits.

    A subscription per waiting request costs a Redis connection of its own (pub/sub
    connections are not reused), a SUBSCRIBE and a disconnect: at tens of long polls
    a second that is a good part of the API's CPU. Here one daemon thread, started on
    first use (after gunicorn's fork), listens on ``<prefix>:job-done:*`` and wakes
    the waiters of each finished job. If Redis is unreachable the thread retries,
    and waiters still see the job finish through their SQL re-check every
    ``RECHECK_S``: notifications are a shortcut, never the truth.
    """

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._client = client
        self._pattern = channel(config, "*")
        self._prefix_len = len(self._pattern) - 1
        self._waiters: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        # When the current subscription was confirmed (monotonic), None while not
        # subscribed; and the jobs heard finishing since, oldest first.
        self._subscribed_at: float | None = None
        self._recent: OrderedDict[str, float] = OrderedDict()
        #: Set while subscribed (tests and health checks can wait on it).
        self.listening = threading.Event()
        #: Set by ``close()``: the server is shutting down, so nobody waits any more.
        self.closed = threading.Event()

    def close(self) -> None:
        """Answer every waiter now (with the job as it is) and refuse new waits.

        Called when the server shuts down: a long poll would otherwise hold the
        process for up to MAX_WAIT_S, past the server's graceful timeout, and get
        it killed. Clients poll again, as they do after any timeout.
        """
        self.closed.set()
        with self._lock:
            events = [e for waiting in self._waiters.values() for e in waiting]
        for event in events:
            event.set()

    def wait(
        self,
        job_id: str,
        timeout_s: float,
        is_done: Callable[[], bool],
        created_after: float | None = None,
    ) -> bool:
        """Block until ``is_done()`` or the timeout; returns the last ``is_done()``.

        ``created_after`` (``time.monotonic()``): the job did not exist before then (the
        caller just submitted it). If this process's listener was subscribed since
        before it, a finish would have been heard: the first SQL read is skipped
        (``is_done`` then runs only once woken, on each ``RECHECK_S`` re-check and at
        the end).
        """
        deadline = time.monotonic() + timeout_s
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
            self._ensure_listening()
            # Unread: nothing to learn from SQL yet (created after the subscription,
            # and not heard finishing).
            unread = (
                created_after is not None
                and self._subscribed_at is not None
                and self._subscribed_at <= created_after
                and job_id not in self._recent
            )
        try:
            # Registered before the first check: a finish between the two still wakes us.
            if not unread and is_done():
                return True
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed.is_set():
                    return is_done() if unread else False
                event.wait(min(remaining, RECHECK_S))
                event.clear()
                # Woken, or the periodic re-check (a notification can be lost).
                if is_done():
                    return True
                unread = False
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[job_id]

    def _ensure_listening(self) -> None:
        # Called with the lock held. A forked child inherits the object, not the thread.
        if self._thread is not None and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._subscribed_at = None  # a forked child: the parent's subscription is not ours
        self._thread = threading.Thread(target=self._listen, daemon=True, name="job-done")
        self._thread.start()

    def _listen(self) -> None:
        idle_since = time.monotonic()
        while True:
            pubsub = self._client.pubsub()
            try:
                pubsub.psubscribe(self._pattern)
                self.listening.set()
                while True:
                    message = pubsub.get_message(timeout=RECHECK_S)
                    if message and message["type"] == "pmessage":
                        self._wake(message["channel"])
                    elif message and message["type"] == "psubscribe":
                        # Confirmed by Redis: every finish published from now on is heard.
                        with self._lock:
                            self._subscribed_at = time.monotonic()
                    idle_since = self._idle_since(idle_since)
                    if idle_since is None:
                        return
            except redis.RedisError as exc:
                self._unsubscribed()
                log.warning("job-done listener: %r; retrying", exc)
                time.sleep(RECHECK_S)
                idle_since = self._idle_since(idle_since)
                if idle_since is None:
                    return
            finally:
                pubsub.close()

    def _unsubscribed(self) -> None:
        self.listening.clear()
        with self._lock:
            self._subscribed_at = None

    def _idle_since(self, since: float) -> float | None:
        """When waiters were last seen; None once the thread should end (long idle).

        An idle thread ends, and the next waiter starts a new one, so that an app
        whose Redis is gone for good does not keep a thread retrying forever.
        """
        with self._lock:
            if self._waiters:
                return time.monotonic()
            if time.monotonic() - since < IDLE_EXIT_S:
                return since
            self._thread = None  # decided under the lock: a new waiter starts a new one
            self._subscribed_at = None
            self.listening.clear()
            return None

    def _wake(self, raw_channel: bytes | str) -> None:
        name = raw_channel.decode() if isinstance(raw_channel, bytes) else raw_channel
        job_id, now = name[self._prefix_len :], time.monotonic()
        with self._lock:
            self._recent[job_id] = now
            self._recent.move_to_end(job_id)
            while self._recent and (
                len(self._recent) > RECENT_MAX or next(iter(self._recent.values())) < now - RECENT_S
            ):
                self._recent.popitem(last=False)
            events = list(self._waiters.get(job_id, ()))
        for event in events:
            event.set()
