"""Job-finished notifications over Redis pub/sub, for long-polling clients.

Only the API processes that wait on a job hear it finish. A waiter registers its
process's channel under the job (``SADD <prefix>:job-waiters:<id>``), then reads SQL;
the worker, after its SQL commit, publishes each finished job to the channels
registered under it (one script per batch, ``publish_done``). The registration and the
script are each atomic in Redis, so one comes first: either the script sees the
registration and publishes to it, or it ran before it, after the commit, and the
waiter's SQL read sees the job done. A finish between the two is never missed. SQL stays
the source of truth: a lost message only costs a waiter its periodic re-check.

The registration is Lua (``REGISTER_LUA``), so that a caller can run it inside a script
of its own: api/waits.py takes the caller's wait slot and registers in one script, one
round trip (``Waiter.registered`` then records its outcome). Whoever runs it, it runs
after the waiter's wake-up event is in place (``DoneListener.waiter``) and before its
first SQL read (``Waiter.wait``), which is all the argument above needs.

The script also marks each job done for a while (``<prefix>:job-done:<id>``,
``DONE_TTL_S``), and the registration reads the mark in the same step. A job submitted
by the waiting request itself (``created_after``) then needs no first read: if the
process was subscribed when it registered and the job was not marked done, its finish
cannot be published unheard. Such a wait reads SQL once, when its job is done.

A notification may carry the finished job's body (``publish_done``'s ``bodies``: the job
as answers show it, ``shared.jobs.job_to_dict`` of its row as committed). A waiter woken
by one answers with it and reads no SQL (``Waiter.finished_job``); one woken by a bare
job id reads SQL, as does every periodic re-check.

A pattern subscription per process (the design before) made every API process hear
every finished job, bulk ones too: ~0.2 CPU ms per job per process when singles finish
one at a time (bench/listener.py, docs/benchmarks.md), x ``WEB_CONCURRENCY``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import redis
from redis.commands.core import Script

from shared.config import Config

log = logging.getLogger(__name__)

RECHECK_S = 1.0
IDLE_EXIT_S = 60.0  # a listener with no waiter for this long ends (see DoneListener)
# How long a finished job stays marked done. A waiter that skips its first read does
# so only within FRESH_S of its job's creation, well inside the mark's life: a waiter
# needs the mark between its submission and its registration, milliseconds.
DONE_TTL_S = 30
FRESH_S = 10.0
# A registration outlives its wait by this much (the last re-check comes after it).
REGISTRATION_GRACE_S = 5

# KEYS: per job, its done mark then its waiters' set; ARGV: per job, its message (its id,
# or its id and body: ``_message``), then the mark's TTL.
_PUBLISH = """
local ttl = ARGV[#ARGV]
local sent = 0
for i = 1, #ARGV - 1 do
  redis.call('SET', KEYS[2 * i - 1], '1', 'EX', ttl)
  for _, to in ipairs(redis.call('SMEMBERS', KEYS[2 * i])) do
    redis.call('PUBLISH', to, ARGV[i])
    sent = sent + 1
  end
end
return sent
"""


_publish_script: Script | None = None

#: The registration, for the body of a Lua script that has set the locals ``waiters``
#: (the job's waiters key), ``done`` (its done mark's key), ``channel`` and ``ttl``
#: (seconds); it leaves in ``marked`` whether the job was marked done (1) or not (0).
#: The TTL is never shortened: a 1 s wait must not cut off another process's 60 s one
#: (NX gives a new set its TTL, GT only lengthens it; Redis 7).
REGISTER_LUA = """
redis.call('SADD', waiters, channel)
redis.call('EXPIRE', waiters, ttl, 'NX')
redis.call('EXPIRE', waiters, ttl, 'GT')
local marked = redis.call('EXISTS', done)
"""
# KEYS: the job's waiters set, its done mark; ARGV: the channel, the TTL.
_REGISTER = f"""
local waiters, done, channel, ttl = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
{REGISTER_LUA}
return marked
"""


def _done_key(config: Config, job_id: str) -> str:
    return f"{config.queue_prefix}:job-done:{job_id}"


def _waiters_key(config: Config, job_id: str) -> str:
    return f"{config.queue_prefix}:job-waiters:{job_id}"


def publish_done(
    client: redis.Redis,
    config: Config,
    job_ids: Iterable[str],
    bodies: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """After the SQL commit: mark the jobs done and wake the processes waiting on them.

    ``bodies``: by job id, the finished job as answers show it (``job_to_dict`` of its
    row as committed, nothing older), sent with its notification so that its waiters
    answer without reading SQL. A job without one is read from SQL when woken.
    """
    ids = list(job_ids)
    if not ids:
        return
    global _publish_script
    if _publish_script is None:  # hashed once; sent by EVALSHA (EVAL the first time)
        _publish_script = client.register_script(_PUBLISH)
    keys = [k for j in ids for k in (_done_key(config, j), _waiters_key(config, j))]
    messages = [_message(j, bodies.get(j)) for j in ids] if bodies else ids
    _publish_script(keys=keys, args=[*messages, DONE_TTL_S], client=client)


# A job id never holds a newline (shared.models.new_id); a body follows the first one.
_BODY_SEPARATOR = "\n"


def _message(job_id: str, body: Mapping[str, Any] | None) -> str:
    if body is None:
        return job_id
    return job_id + _BODY_SEPARATOR + json.dumps(body, separators=(",", ":"))


def registration_keys(config: Config, job_id: str) -> list[str]:
    """``REGISTER_LUA``'s keys for ``job_id``: its waiters set, its done mark."""
    return [_waiters_key(config, job_id), _done_key(config, job_id)]


def registration_ttl(timeout_s: float) -> int:
    """``REGISTER_LUA``'s TTL for a wait of ``timeout_s``."""
    return int(timeout_s) + REGISTRATION_GRACE_S


class DoneListener:
    """One channel per process, shared by every request of the process that waits.

    A subscription per waiting request costs a Redis connection of its own (pub/sub
    connections are not reused), a SUBSCRIBE and a disconnect: at tens of long polls
    a second that is a good part of the API's CPU. Here one daemon thread, started on
    first use (after gunicorn's fork), subscribes to this process's channel and wakes
    the waiters of each job published to it. If Redis is unreachable the thread
    retries, and waiters still see the job finish through their SQL re-check every
    ``RECHECK_S``: notifications are a shortcut, never the truth.
    """

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._client = client
        self._config = config
        self._channel = ""  # this process's, named on first use (after a fork)
        self._waiters: dict[str, set[_Wake]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        # Whether the current subscription was confirmed by Redis.
        self._subscribed = False
        #: Set while subscribed (tests and health checks can wait on it).
        self.listening = threading.Event()
        #: Set by ``close()``: the server is shutting down, so nobody waits any more.
        self.closed = threading.Event()
        self._register_script: Script | None = None

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

    @contextmanager
    def waiter(self, job_id: str) -> Iterator[Waiter]:
        """A wait on ``job_id``, its wake-up event in place from now until the block ends.

        Register it next (``Waiter.wait`` does, unless a caller's script already ran
        ``REGISTER_LUA`` for it and said so with ``Waiter.registered``), then wait.
        """
        event = _Wake()
        with self._lock:
            self._waiters.setdefault(job_id, set()).add(event)
            self._ensure_listening()
            subscribed, channel = self._subscribed, self._channel
        try:
            yield Waiter(self, job_id, event, subscribed, channel)
        finally:
            with self._lock:
                waiting = self._waiters.get(job_id)
                if waiting is not None:
                    waiting.discard(event)
                    if not waiting:
                        del self._waiters[job_id]

    def wait(
        self,
        job_id: str,
        timeout_s: float,
        is_done: Callable[[], bool],
        created_after: float | None = None,
    ) -> bool:
        """Block until ``is_done()`` or the timeout; returns the last ``is_done()``
        (``Waiter.wait``, registered in a round trip of its own)."""
        with self.waiter(job_id) as waiter:
            return waiter.wait(timeout_s, is_done, created_after)

    def _register(self, job_id: str, channel: str, timeout_s: float) -> bool | None:
        """Add this process's channel to the job's waiters, in Redis; whether the job
        was already marked done then (None: Redis failed, nothing known)."""
        if self._register_script is None:  # hashed once; sent by EVALSHA
            self._register_script = self._client.register_script(_REGISTER)
        try:
            keys = registration_keys(self._config, job_id)
            marked = self._register_script(keys=keys, args=[channel, registration_ttl(timeout_s)])
            return bool(marked)
        except redis.RedisError as exc:
            log.debug("job-done registration failed: %r", exc)
            return None

    def _ensure_listening(self) -> None:
        # Called with the lock held. A forked child inherits the object, not the thread.
        if self._thread is not None and self._pid == os.getpid():
            return
        if self._pid != os.getpid():  # a forked child: the parent's channel is not ours
            self._pid = os.getpid()
            self._channel = f"{self._config.queue_prefix}:job-done-to:{uuid.uuid4().hex}"
        self._subscribed = False
        self._thread = threading.Thread(target=self._listen, daemon=True, name="job-done")
        self._thread.start()

    def _listen(self) -> None:
        idle_since = time.monotonic()
        while True:
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(self._channel)
                self.listening.set()
                while True:
                    message = pubsub.get_message(timeout=RECHECK_S)
                    if message and message["type"] == "message":
                        self._wake(message["data"])
                    elif message and message["type"] == "subscribe":
                        # Confirmed by Redis: every finish published from now on is heard.
                        with self._lock:
                            self._subscribed = True
                    until = self._idle_since(idle_since)
                    if until is None:
                        return
                    idle_since = until
            except redis.RedisError as exc:
                self._unsubscribed()
                log.warning("job-done listener: %r; retrying", exc)
                time.sleep(RECHECK_S)
                until = self._idle_since(idle_since)
                if until is None:
                    return
                idle_since = until
            finally:
                pubsub.close()

    def _unsubscribed(self) -> None:
        self.listening.clear()
        with self._lock:
            self._subscribed = False

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
            self._subscribed = False
            self.listening.clear()
            return None

    def _wake(self, message: bytes | str) -> None:
        raw = message.encode() if isinstance(message, str) else message
        raw_id, _, body = raw.partition(_BODY_SEPARATOR.encode())
        job_id = raw_id.decode()
        with self._lock:
            events = list(self._waiters.get(job_id, ()))
        for event in events:
            if body:  # parsed by the waiter that uses it, not on this shared thread
                event.body = body
            event.set()


class _Wake(threading.Event):
    """A waiter's wake-up, with the finished job's body when its notification carried one."""

    body: bytes | None = None


class Waiter:
    """One wait on one job (``DoneListener.waiter``): the wake-up event is in place, and
    ``subscribed`` says whether this process's subscription was confirmed before it was."""

    def __init__(
        self,
        listener: DoneListener,
        job_id: str,
        event: _Wake,
        subscribed: bool,
        channel: str,
    ) -> None:
        self.job_id = job_id
        self.channel = channel
        self.subscribed = subscribed
        self._listener = listener
        self._event = event
        self._registered = False
        self._marked_done: bool | None = None

    def finished_job(self) -> dict[str, Any] | None:
        """The finished job as answers show it, if a notification that woke this wait
        carried it (``publish_done``'s ``bodies``), else None: then read SQL."""
        body = self._event.body
        return None if body is None else json.loads(body)

    def registered(self, marked_done: bool | None) -> None:
        """A caller's script ran ``REGISTER_LUA`` for this wait (``registration_keys``,
        ``channel``, ``registration_ttl``): whether the job was marked done then (None:
        Redis failed, nothing known)."""
        self._registered, self._marked_done = True, marked_done

    def wait(
        self, timeout_s: float, is_done: Callable[[], bool], created_after: float | None = None
    ) -> bool:
        """Block until ``is_done()`` or the timeout; returns the last ``is_done()``.

        Registers first, unless already registered (``registered``).
        ``created_after`` (``time.monotonic()``): the job did not exist before then (the
        caller just submitted it). If this process was subscribed when the wait
        registered, and the job was not marked done then, a finish will be heard: the
        first SQL read is skipped (``is_done`` then runs only once woken, on each
        ``RECHECK_S`` re-check and at the end).
        """
        deadline = time.monotonic() + timeout_s
        if not self._registered:
            self.registered(self._listener._register(self.job_id, self.channel, timeout_s))
        # Unread: nothing to learn from SQL yet (its finish, if any, is still to come).
        unread = (
            created_after is not None
            and self.subscribed
            and self._marked_done is False
            and time.monotonic() - created_after < FRESH_S
        )
        # Registered before the first check: a finish between the two still wakes us.
        if not unread and is_done():
            return True
        closed, event = self._listener.closed, self._event
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or closed.is_set():
                return is_done() if unread else False
            event.wait(min(remaining, RECHECK_S))
            event.clear()
            # Woken, or the periodic re-check (a notification can be lost).
            if is_done():
                return True
            unread = False
