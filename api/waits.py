"""Caps on long-polls held at once, so waiting clients cannot take every API thread.

A long-poll (``GET /v1/jobs/{id}?wait=N``, ``Prefer: wait=N``, the seed endpoints)
holds a gunicorn thread for up to ``MAX_WAIT_S``. Two caps bound that:

- per user (``MAX_WAITS_PER_USER``), across every API process: a Redis sorted set per
  user, one member per wait scored by its deadline. Entries past their deadline are
  dropped on every entry, so a process killed mid-wait leaks a slot only for as long
  as that wait would have lasted (a plain counter would leak it until its key expires,
  which a busy user's next waits keep postponing).
- per process (``MAX_WAITS_PER_PROCESS``): many users together still leave threads
  for everyone else's requests.

Past either cap the wait is not honoured: the caller answers at once with the job as
it is, says so in ``X-Wait-Skipped`` and asks the client to come back after
``Retry-After`` seconds (``SKIPPED_RETRY_AFTER_S``): a client that polled again at once
would be refused again at once, and such a loop cost the API more CPU per image than
the waits it was refused (issue #22). If Redis cannot be reached the per-user cap
is not enforced (the per-process cap still is); the wait then meets the same outage.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from flask import current_app

from shared.config import Config
from shared.events import REGISTER_LUA, Waiter, registration_keys, registration_ttl

log = logging.getLogger(__name__)

#: Response header naming the cap that kept a requested wait from being honoured.
SKIPPED_HEADER = "X-Wait-Skipped"
#: Seconds a client is asked to wait before polling again after a skipped wait. Waits
#: end as their jobs finish, usually well within a second of a slot being taken; one
#: second keeps a refused client's polls cheap without making it wait long for a slot.
SKIPPED_RETRY_AFTER_S = 1
USER_LIMIT = "user_limit"
PROCESS_LIMIT = "process_limit"
# A wait's slot outlives its deadline by this much: the last SQL check comes after it.
GRACE_S = 5


# KEYS: the user's waits, then (registering a wait on a job) the job's waiters set and
# done mark; ARGV: now, the slot's member and deadline, the cap, the waits' TTL, then
# (registering) the channel and the registration's TTL (shared/events.py). Returns -1
# when the cap refuses (nothing changed), else whether the job was marked done.
_TAKE = f"""
local key, now = KEYS[1], ARGV[1]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if redis.call('ZCARD', key) >= tonumber(ARGV[4]) then
  return -1
end
redis.call('ZADD', key, ARGV[3], ARGV[2])
redis.call('EXPIRE', key, ARGV[5])
if #KEYS == 1 then
  return 0
end
local waiters, done, channel, ttl = KEYS[2], KEYS[3], ARGV[6], ARGV[7]
{REGISTER_LUA}
return marked
"""


class WaitSlots:
    """One per app: counts the waits this process holds, and each user's in Redis."""

    def __init__(self, client: redis.Redis, config: Config) -> None:
        self._redis = client
        self._config = config
        self._lock = threading.Lock()
        self._held = 0
        self._take = client.register_script(_TAKE)  # hashed once; sent by EVALSHA

    @contextmanager
    def hold(
        self, user_id: int, timeout_s: float, waiter: Waiter | None = None
    ) -> Iterator[str | None]:
        """Yields None when the caller may wait, else the cap that refused it.

        ``waiter``: registered for its job in the same round trip as the user's slot is
        taken (``Waiter.registered``), when the user's cap lets it wait.
        """
        # The user's cap first: a burst of one user's waits, refused by it, must not
        # take this process's slots even for a moment, or others' waits are refused.
        member = self._take_user(user_id, timeout_s, waiter)
        if member is None:
            yield USER_LIMIT
            return
        # (A waiter registered above and refused here only costs its process one
        # notification that wakes nobody.)
        if not self._take_local():
            self._give_user(user_id, member)
            yield PROCESS_LIMIT
            return
        try:
            yield None
        finally:
            with self._lock:
                self._held -= 1
            self._give_user(user_id, member)

    def _take_local(self) -> bool:
        with self._lock:
            if self._held >= self._config.max_waits_per_process:
                return False
            self._held += 1
            return True

    def _key(self, user_id: int) -> str:
        return f"{self._config.queue_prefix}:waits:{user_id}"

    def _take_user(self, user_id: int, timeout_s: float, waiter: Waiter | None) -> str | None:
        """The slot's member name, '' if Redis failed (not enforced), None if refused."""
        # Unique among the user's waits, not secret: no system call for it.
        member, now = f"{random.getrandbits(128):032x}", time.time()
        config = self._config
        keys = [self._key(user_id)]
        args: list[str | int | float] = [
            now,
            member,
            now + timeout_s + GRACE_S,
            config.max_waits_per_user,
            config.max_wait_s + GRACE_S + 1,
        ]
        if waiter is not None:
            keys += registration_keys(config, waiter.job_id)
            args += [waiter.channel, registration_ttl(timeout_s)]
        try:
            # One script: prune, count, add and (a waiter) register, as one step.
            taken = self._take(keys=keys, args=args)
        except redis.RedisError as exc:
            log.warning("wait slots: Redis unavailable (%r); per-user cap not enforced", exc)
            return ""
        if taken == -1:
            return None
        if waiter is not None:
            waiter.registered(bool(taken))
        return member

    def _give_user(self, user_id: int, member: str) -> None:
        if not member:
            return
        with contextlib.suppress(redis.RedisError):  # its deadline frees the slot anyway
            self._redis.zrem(self._key(user_id), member)


# A comma or semicolon outside a quoted string (RFC 7240's lists and parameters).
_COMMA = re.compile(r',(?=(?:[^"]*"[^"]*")*[^"]*$)')
_SEMICOLON = re.compile(r';(?=(?:[^"]*"[^"]*")*[^"]*$)')
_DELTA_SECONDS = re.compile(r"[0-9]+")


def prefer_wait(values: list[str], max_wait_s: int) -> int | None:
    """The ``wait`` preference of ``Prefer`` headers (RFC 7240), capped at ``max_wait_s``.

    RFC 7240 (section 2): a server ignores a preference it does not understand or cannot
    comply with, and only the first instance of a preference counts. So ``wait`` must
    be a preference of its own (a parameter after ``;`` is not one) whose value is
    delta-seconds (``wait=10`` or ``wait="10"``); anything else (``wait=abc``,
    ``wait=-1``, ``wait=1.5``) is ignored, not refused, and so is any later ``wait``.
    Returns None when there is no valid wait.
    """
    for value in values:
        for preference in _COMMA.split(value):
            token, _, raw = _SEMICOLON.split(preference, 1)[0].partition("=")
            if token.strip().lower() != "wait":
                continue
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            if not _DELTA_SECONDS.fullmatch(raw):
                return None  # the first instance is invalid: the preference is ignored
            return min(int(raw), max_wait_s)
    return None


def skipped_headers(skipped: str) -> dict[str, str]:
    """The headers of an answer whose wait was refused by the cap ``skipped``."""
    return {SKIPPED_HEADER: skipped, "Retry-After": str(SKIPPED_RETRY_AFTER_S)}


def wait_slots() -> WaitSlots:
    return current_app.extensions["imgclf_waits"]
