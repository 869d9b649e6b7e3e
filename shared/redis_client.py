"""Redis connections with short timeouts, so a dead Redis fails fast (503) instead of hanging."""

from __future__ import annotations

import redis

from shared.config import Config


def make_redis(config: Config, url: str | None = None) -> redis.Redis:
    """A client of ``REDIS_URL``, or of ``url`` (the Redis broker's, for instance)."""
    return redis.Redis.from_url(
        url or config.redis_url,
        socket_connect_timeout=2,
        socket_timeout=5,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def once_per(client: redis.Redis, key: str, period_s: float) -> bool:
    """True for the first caller per ``period_s`` cluster-wide (the key expires by itself):
    something runs at most once per period however many processes ask, and a caller that
    died blocks nobody. Not a lock: nothing is held while the work runs
    (``worker.periodic.Lease`` is the lock)."""
    return bool(client.set(key, "1", nx=True, ex=max(1, int(period_s))))
