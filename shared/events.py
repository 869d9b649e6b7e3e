"""Job-finished notifications over Redis pub/sub, for long-polling clients.

The worker publishes after its SQL commit; a waiter subscribes first, then reads
SQL, so a finish between the two is never missed. SQL stays the source of truth:
a lost message only costs a waiter its periodic re-check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis

from shared.config import Config

RECHECK_S = 1.0


def channel(config: Config, job_id: str) -> str:
    return f"{config.queue_prefix}:job-done:{job_id}"


def publish_done(client: redis.Redis, config: Config, job_ids: Iterable[str]) -> None:
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.publish(channel(config, job_id), b"1")
    pipe.execute()


def wait_until(
    client: redis.Redis, config: Config, job_id: str, timeout_s: float, is_done: Callable[[], bool]
) -> bool:
    """Block until ``is_done()`` or the timeout; returns the last ``is_done()``."""
    deadline = time.monotonic() + timeout_s
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(channel(config, job_id))
        while True:
            if is_done():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pubsub.get_message(timeout=min(remaining, RECHECK_S))
    finally:
        pubsub.close()
