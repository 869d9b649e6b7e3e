"""Rate limits, counted in Redis with the ``limits`` library (flask-limiter's core).

Five guards:
- submissions per user (``RATE_LIMIT_SUBMIT``): 429 with Retry-After;
- batch lines per user (``RATE_LIMIT_BULK_LINES``): a cancel refunds, so without it a
  submit-and-cancel loop is free;
- deletions per user (``RATE_LIMIT_DELETE``): free, and a batch is many rows;
- sign-ups per client address (``SIGNUP_LIMIT_PER_IP``), since each account comes
  with free tokens: 429 with Retry-After;
- failed password checks per username and per client address
  (``LOGIN_FAILURE_LIMIT``, ``LOGIN_FAILURE_LIMIT_PER_IP``): once exceeded, even the
  right password is refused until the window passes, so guessing is slow.
If Redis cannot be reached the limits are not enforced (fail open): the
request then meets the same outage where it really needs Redis.
"""

from __future__ import annotations

import logging
import math
import time

from flask import current_app, request
from limits import parse, storage, strategies
from redis.exceptions import RedisError

from shared.config import Config
from shared.errors import RateLimited

log = logging.getLogger(__name__)


class Limits:
    def __init__(self, config: Config) -> None:
        store = storage.storage_from_string(
            config.redis_url, key_prefix=f"{config.queue_prefix}:limits"
        )
        self._limiter = strategies.FixedWindowRateLimiter(store)
        # Lines come 10,000 at a time: a fixed window would let twice the limit through
        # across a window's edge; the sliding counter (two counters, any cost) does not.
        self._sliding = strategies.SlidingWindowCounterRateLimiter(store)
        self.submit = parse(config.rate_limit_submit)
        self.bulk_lines = parse(config.rate_limit_bulk_lines)
        self.delete = parse(config.rate_limit_delete)
        self.login_user = parse(config.login_failure_limit)
        self.login_ip = parse(config.login_failure_limit_per_ip)
        self.signup_ip = parse(config.signup_limit_per_ip)

    def check_submission(self, user_id: int) -> None:
        self._hit(self.submit, ("submit", str(user_id)), 1, "Too many submissions")

    def check_bulk_lines(self, user_id: int, lines: int) -> None:
        """Count a batch's lines: a cancel refunds them, so tokens alone do not bound
        how many rows a user can have written and withdrawn."""
        what = f"Too many batch lines (at most {self.bulk_lines} per user)"
        self._hit(self.bulk_lines, ("bulk-lines", str(user_id)), lines, what, self._sliding)

    def check_bulk_room(self, user_id: int) -> None:
        """Refuse before reading a batch's body when the user has no line left in the
        window: a client that resubmits at once after a 429 costs a Redis read, not the
        parsing and checking of 10,000 lines."""
        key = ("bulk-lines", str(user_id))
        if not self._safe(lambda: self._sliding.test(self.bulk_lines, *key), True):
            what = f"Too many batch lines (at most {self.bulk_lines} per user)"
            raise self._refusal(self.bulk_lines, key, what, self._sliding)

    def check_deletion(self, user_id: int) -> None:
        self._hit(self.delete, ("delete", str(user_id)), 1, "Too many deletions")

    def check_signup(self) -> None:
        address = request.remote_addr or "unknown"
        self._hit(self.signup_ip, ("signup-ip", address), 1, "Too many sign-ups from this address")

    def check_login(self, username: str) -> None:
        """Refuse before checking a password if this name or address failed too often."""
        for item, key in self._login_keys(username):
            if not self._safe(lambda i=item, k=key: self._limiter.test(i, *k), True):
                raise self._refusal(item, key, "Too many failed logins")

    def record_login_failure(self, username: str) -> None:
        for item, key in self._login_keys(username):
            self._safe(lambda i=item, k=key: self._limiter.hit(i, *k), True)

    def _login_keys(self, username: str):
        return [
            (self.login_user, ("login-user", username.lower())),
            (self.login_ip, ("login-ip", request.remote_addr or "unknown")),
        ]

    def _hit(self, item, key: tuple[str, ...], cost: int, what: str, limiter=None) -> None:
        limiter = limiter or self._limiter
        allowed = self._safe(lambda: limiter.hit(item, *key, cost=cost), True)
        if not allowed:
            raise self._refusal(item, key, what, limiter)

    def _refusal(self, item, key, what: str, limiter=None) -> RateLimited:
        limiter = limiter or self._limiter
        reset = self._safe(lambda: limiter.get_window_stats(item, *key).reset_time, None)
        retry_after = max(1, math.ceil((reset or time.time() + 1) - time.time()))
        return RateLimited(
            f"{what}; try again in {retry_after} s.",
            headers={"Retry-After": str(retry_after)},
        )

    @staticmethod
    def _safe(call, default):
        try:
            return call()
        except RedisError as exc:
            log.warning("rate limits not enforced, Redis unavailable: %r", exc)
            return default


def limits() -> Limits:
    return current_app.extensions["imgclf_limits"]
