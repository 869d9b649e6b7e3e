"""A job-done notification may carry the finished job's body (issue #22): its waiters then
answer without reading SQL. Against real Redis."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from shared import events
from shared.config import Config
from tests import support

BODY = {"id": "job-1", "status": "succeeded", "result": {"predictions": [{"label": "é"}]}}


@pytest.fixture
def config() -> Iterator[Config]:
    config = Config.from_env(
        {}, redis_url=support.REDIS_URL, queue_prefix=f"evb-{uuid.uuid4().hex[:8]}"
    )
    yield config
    support.delete_redis_prefix(config.queue_prefix)


def _wait_woken(config: Config, job_id: str, bodies: dict | None) -> dict | None:
    """Wait on ``job_id`` until a notification (with ``bodies``) wakes it; what it carried."""
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    listener.wait("warm-up", 0, lambda: False)  # starts the listener thread
    support.wait_for(lambda: listener._subscribed, 10, "the subscription", 0.01)
    published = threading.Event()

    def publish() -> None:
        # Registered in Redis: only then does the notification reach this process.
        waiters = events.registration_keys(config, job_id)[0]
        support.wait_for(lambda: client.exists(waiters), 10, "the registration", 0.01)
        published.set()  # before: the wake-up may come before publish_done returns
        events.publish_done(client, config, [job_id, "nobody-waits"], bodies)

    publisher = threading.Thread(target=publish)
    publisher.start()
    with listener.waiter(job_id) as waiter:
        start = time.monotonic()
        assert waiter.wait(30, published.is_set, time.monotonic())
        assert time.monotonic() - start < 20  # woken, not timed out
        finished = waiter.finished_job()
    publisher.join()
    return finished


def test_a_notification_with_the_body_hands_it_to_the_waiter(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only the notification can wake it
    assert _wait_woken(config, "job-1", {"job-1": BODY}) == BODY


def test_a_bare_notification_leaves_the_waiter_to_read_sql(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)
    assert _wait_woken(config, "job-2", None) is None
    # A body for another job is not this one's.
    assert _wait_woken(config, "job-3", {"nobody-waits": BODY}) is None
