"""A long poll registers for its job's notification in the round trip that takes its
wait slot (issue #22), against real Redis, without missing a finish."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from api.waits import USER_LIMIT, WaitSlots
from shared import events
from shared.config import Config
from tests import support


class _CountingRedis(redis.Redis):
    """Counts the commands (round trips) sent through this client, scripts included."""

    sent: list[str]

    def execute_command(self, *args, **options):
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)


@pytest.fixture
def config() -> Iterator[Config]:
    config = support.test_config("sqlite://", max_waits_per_user=1)
    yield config
    support.delete_redis_prefix(config.queue_prefix)


@pytest.fixture
def client(config) -> _CountingRedis:
    client = _CountingRedis.from_url(config.redis_url)
    client.sent = []
    return client


def _subscribed(listener: events.DoneListener) -> None:
    listener.wait("warm-up", 0, lambda: False)  # starts the listener thread
    support.wait_for(lambda: listener._subscribed, 10, "the subscription", 0.01)


def _waiters(client: redis.Redis, config: Config, job_id: str) -> set[bytes]:
    return client.smembers(events.registration_keys(config, job_id)[0])


def test_a_wait_takes_its_slot_and_registers_in_one_round_trip(config, client):
    listener, slots = events.DoneListener(client, config), WaitSlots(client, config)
    _subscribed(listener)
    client.sent.clear()
    with listener.waiter("job-1") as waiter, slots.hold(7, 30, waiter) as skipped:
        assert skipped is None
        assert len(client.sent) == 1, client.sent  # one script: slot and registration
        assert _waiters(client, config, "job-1") == {waiter.channel.encode()}
        sent = len(client.sent)
        # Already registered: the wait sends nothing more before its first read.
        assert waiter.wait(30, lambda: True)
        assert len(client.sent) == sent


def test_a_wait_the_users_cap_refuses_is_not_registered(config, client):
    listener, slots = events.DoneListener(client, config), WaitSlots(client, config)
    with slots.hold(7, 30) as first:
        assert first is None
        with listener.waiter("job-2") as waiter, slots.hold(7, 30, waiter) as skipped:
            assert skipped == USER_LIMIT
            # Its process would hear the job finish for nobody.
            assert _waiters(client, config, "job-2") == set()


def test_a_finish_right_after_the_slots_registration_wakes_the_wait(config, client, monkeypatch):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # only a notification can answer in time
    listener, slots = events.DoneListener(client, config), WaitSlots(client, config)
    _subscribed(listener)
    created, reads = time.monotonic(), []
    with listener.waiter("job-3") as waiter, slots.hold(7, 30, waiter) as skipped:
        assert skipped is None
        events.publish_done(client, config, ["job-3"])  # the worker, before the wait began
        start = time.monotonic()
        assert waiter.wait(30, lambda: reads.append(1) or True, created)
    assert time.monotonic() - start < 20
    assert reads == [1]  # a job submitted by this request: read once, when done


def test_a_job_marked_done_before_the_slots_registration_is_read_at_once(
    config, client, monkeypatch
):
    monkeypatch.setattr(events, "RECHECK_S", 60.0)  # no re-check could answer in time
    listener, slots = events.DoneListener(client, config), WaitSlots(client, config)
    _subscribed(listener)
    created = time.monotonic()
    events.publish_done(client, config, ["job-4"])  # heard by nobody: not registered yet
    with listener.waiter("job-4") as waiter, slots.hold(7, 30, waiter) as skipped:
        assert skipped is None
        start = time.monotonic()
        assert waiter.wait(30, lambda: True, created)
    assert time.monotonic() - start < 20
