"""Remove this deployment's keys from Redis: ``python -m scripts.clean_redis`` (``make clean``).

Only keys named after ``QUEUE_PREFIX`` go (SCAN + DEL by pattern, never FLUSHDB): the
Redis may be shared with other deployments or other programs. kombu's global keys
(``unacked``, ``unacked_index``, ``_kombu.binding_deadlines``, ``celery.pidbox``) hold
other deployments' entries too and are left alone.
"""

from __future__ import annotations

import re
import sys

import redis

from shared.config import Config
from shared.redis_client import make_redis


def patterns(prefix: str) -> list[str]:
    """Our keys (``imgclf:…``), queues (``imgclf.bulk``…) and kombu's bindings of them.

    The separator is part of each pattern, so prefix ``imgclf`` never matches a
    neighbour's ``imgclf2:…``; glob characters in the prefix are escaped.
    """
    p = re.sub(r"([*?\[\]\\])", r"\\\1", prefix)
    return [
        f"{p}:*",
        f"{p}.*",
        f"_kombu.binding.{p}.*",
        f"_kombu.binding_permanent.{p}.*",
    ]


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key of ``prefix``; returns how many were deleted."""
    deleted = 0
    for pattern in patterns(prefix):
        batch = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) == 500:
                deleted += client.delete(*batch)
                batch = []
        if batch:
            deleted += client.delete(*batch)
    return deleted


def main() -> int:
    config = Config.from_env()
    targets = {config.redis_url: "REDIS_URL"}
    if config.broker_is_redis:
        targets.setdefault(config.effective_broker_url, "BROKER_URL")
    for url, setting in targets.items():
        try:
            count = delete_prefix(make_redis(config, url), config.queue_prefix)
        except (redis.RedisError, ValueError) as exc:  # down, or a sentinel:// broker
            print(f"{setting}: not cleaned ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        print(f"{setting}: deleted {count} keys of QUEUE_PREFIX {config.queue_prefix!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
