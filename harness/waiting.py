"""Polling until a condition holds, with a deadline that names what it waited for."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from shared.queue import queue_depth

if TYPE_CHECKING:
    from celery import Celery


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def queue_reaches(app: Celery, names: Sequence[str], n: int, timeout: float = 10) -> None:
    """Until the queues ``names`` hold ``n`` messages together (``shared.queue.queue_depth``).

    RabbitMQ queues a publish after the publisher has moved on (the service sends
    without confirms), so a look from another connection right after a send may miss
    the last messages; on Redis a send returns once the list holds the message.
    """
    wait_for(lambda: queue_depth(app, names) == n, timeout, f"{n} messages in {list(names)}")
