"""DoneListener: long polls woken by their process's job-done channel, against real Redis."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from shared import events
from shared.config import Config
from tests import support


@pytest.fixture
def config() -> Config:
    return Config.from_env(
        {}, redis_url=support.REDIS_URL, queue_prefix=f"ev-{uuid.uuid4().hex[:8]}"
    )


def _publish_when_registered(listener, client, config, job_id, done: threading.Event) -> None:
    support.wait_for(lambda: job_id in listener._waiters, 10, "the waiter to register", 0.01)
    support.wait_for(lambda: listener._subscribed, 10, "the listener to subscribe", 0.01)
    done.set()
    events.publish_done(client, config, [job_id])


def test_a_waiter_is_woken_by_the_notification_not_by_its_recheck(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only a notification can wake it in time
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    done = threading.Event()
    checks = []
    publisher = threading.Thread(
        target=_publish_when_registered, args=(listener, client, config, "job-1", done)
    )
    publisher.start()
    start = time.monotonic()
    assert listener.wait("job-1", 30, lambda: checks.append(1) or done.is_set())
    assert time.monotonic() - start < 20  # woken long before the 30 s timeout
    publisher.join()
    assert "job-1" not in listener._waiters  # nothing left behind


def test_a_notification_for_another_job_does_not_end_the_wait(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 0.05)
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    events.publish_done(client, config, ["someone-else"])
    assert listener.wait("job-2", 0.3, lambda: False) is False


def test_without_redis_waiters_fall_back_to_their_sql_recheck(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 0.05)
    dead = Config.from_env({}, redis_url="redis://127.0.0.1:1/0", queue_prefix=config.queue_prefix)
    listener = events.DoneListener(redis.Redis.from_url(dead.redis_url), dead)
    calls = []

    def done_on_third_check() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert listener.wait("job-3", 30, done_on_third_check)
    assert len(calls) == 3


def test_an_idle_listener_ends_and_the_next_waiter_starts_another(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 0.05)
    monkeypatch.setattr(events, "IDLE_EXIT_S", 0.2)
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    assert listener.wait("job-4", 5, lambda: True)
    first = listener._thread
    support.wait_for(lambda: listener._thread is None, 10, "the idle listener to end", 0.02)
    first.join(5)
    assert not first.is_alive()

    done = threading.Event()
    publisher = threading.Thread(
        target=_publish_when_registered, args=(listener, client, config, "job-5", done)
    )
    publisher.start()
    assert listener.wait("job-5", 30, done.is_set)
    publisher.join()
    assert listener._thread is not None and listener._thread is not first


def test_close_answers_every_waiter_at_once_and_refuses_new_waits(config, monkeypatch):
    """A server that stops must not be held by long polls (see gunicorn.conf.py)."""
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only close() can end the waits in time
    listener = events.DoneListener(redis.Redis.from_url(config.redis_url), config)
    results: list[bool] = []
    waiters = [
        threading.Thread(target=lambda j=j: results.append(listener.wait(j, 60, lambda: False)))
        for j in ("a", "b", "a")
    ]
    for w in waiters:
        w.start()
    support.wait_for(lambda: len(listener._waiters) == 2, 10, "the waiters to register", 0.01)
    listener.close()
    for w in waiters:
        w.join(30)
    assert results == [False, False, False]
    assert listener.wait("c", 60, lambda: False) is False  # returns at once after close
    assert listener._waiters == {}


def _subscribed(listener) -> None:
    listener.wait("warm-up", 0, lambda: False)  # starts the listener thread
    support.wait_for(lambda: listener._subscribed, 10, "the subscription", 0.01)


def test_a_job_created_after_the_subscription_is_read_once_when_done(config, monkeypatch):
    # Issue #22: a request that submits and waits reads its job from SQL once, when
    # woken, not also before waiting (its job cannot have finished unheard).
    monkeypatch.setattr(events, "RECHECK_S", 60.0)
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    _subscribed(listener)
    created = time.monotonic()
    done, reads = threading.Event(), []
    publisher = threading.Thread(
        target=_publish_when_registered, args=(listener, client, config, "job-5", done)
    )
    publisher.start()
    assert listener.wait("job-5", 30, lambda: reads.append(1) or done.is_set(), created)
    publisher.join()
    assert reads == [1]


def test_a_job_heard_finishing_before_its_wait_is_read_at_once(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # no re-check could answer in time
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    _subscribed(listener)
    created = time.monotonic()
    events.publish_done(client, config, ["job-6"])  # before the wait registered
    start = time.monotonic()
    assert listener.wait("job-6", 30, lambda: True, created)
    assert time.monotonic() - start < 20


def test_only_the_process_waiting_on_a_job_hears_it(config, monkeypatch):
    # Issue #22: a finish is published to the channels registered under the job, not to
    # every API process (each hearing cost a process ~0.2 CPU ms).
    monkeypatch.setattr(events, "RECHECK_S", 60.0)
    client = redis.Redis.from_url(config.redis_url)
    waiting, other = events.DoneListener(client, config), events.DoneListener(client, config)
    _subscribed(waiting)
    _subscribed(other)
    heard: list[bytes | str] = []
    monkeypatch.setattr(other, "_wake", heard.append)
    done = threading.Event()
    publisher = threading.Thread(
        target=_publish_when_registered, args=(waiting, client, config, "job-7", done)
    )
    publisher.start()
    assert waiting.wait("job-7", 30, done.is_set, time.monotonic())
    publisher.join()
    # "warm-up" (registered by both) comes after anything else published to `other`.
    events.publish_done(client, config, ["job-9", "warm-up"])
    support.wait_for(lambda: heard, 10, "the registered finish to be heard", 0.01)
    assert heard == [b"warm-up"]


def test_a_finish_between_registration_and_the_sql_read_is_never_missed(config, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only a notification can answer in time
    client = redis.Redis.from_url(config.redis_url)
    listener = events.DoneListener(client, config)
    _subscribed(listener)
    finished = threading.Event()

    def first_read_then_finish() -> bool:
        # The worker commits and announces right after this read saw the job unfinished.
        if not finished.is_set():
            finished.set()
            events.publish_done(client, config, ["job-8"])
            return False
        return True

    start = time.monotonic()
    assert listener.wait("job-8", 30, first_read_then_finish)
    assert time.monotonic() - start < 20


def test_a_short_wait_does_not_shorten_a_long_waits_registration(config):
    client = redis.Redis.from_url(config.redis_url)
    long_wait, short_wait = events.DoneListener(client, config), events.DoneListener(client, config)
    key = events._waiters_key(config, "job-9")
    try:
        long_wait._register("job-9", "channel-a", 60)
        short_wait._register("job-9", "channel-b", 1)
        assert client.ttl(key) > 30  # the 60 s wait's, not cut to the 1 s one's
    finally:
        support.delete_redis_prefix(config.queue_prefix)
