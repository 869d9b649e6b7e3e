"""``worker.periodic``: the loop every periodic job of the workers runs on, on real Redis.

Passes sync on events (a pass sets one; a test sets ``stop``), never on sleeps; the
election's tests call ``run_once`` directly, so no timing decides who won.
"""

from __future__ import annotations

import threading

import pytest
import redis

from shared.queue import heartbeats, worker_problems
from shared.redis_client import make_redis
from tests import support
from worker import liveness
from worker.periodic import BACKOFF_INTERVALS, Lease, Periodic


@pytest.fixture
def client():
    yield redis.Redis.from_url(support.REDIS_URL)


@pytest.fixture
def key():
    prefix = support.new_prefix("periodic")
    yield f"{prefix}:lock"
    support.delete_redis_prefix(prefix)


def _elected(client, key: str, interval_s: float, run_pass) -> Periodic:
    return Periodic("test", interval_s, run_pass, lease=Lease(client, key, 30))


def test_a_loop_runs_every_interval_and_ends_at_once_when_stopped():
    passes, three = [], threading.Event()

    def run_pass() -> None:
        passes.append(1)
        if len(passes) == 3:
            three.set()

    loop = Periodic("test", 0.05, run_pass).start()
    assert three.wait(30)
    idle = Periodic("idle", 3600, run_pass).start()  # waiting an hour for its first pass
    loop.stop.set()
    idle.stop.set()
    assert loop.join(10) and idle.join(10)


def test_a_failing_pass_backs_off_doubling_up_to_the_cap_and_the_loop_lives_on():
    loop = Periodic("test", 2, lambda: None)
    assert [loop.delay(n) for n in range(5)] == [2, 4, 8, 8, 8]
    assert loop.delay(9) == BACKOFF_INTERVALS * 2
    assert Periodic("beat", 5, lambda: None, max_backoff_s=5).delay(3) == 5  # no back-off
    failures, recovered = [], threading.Event()

    def flaky() -> None:
        if len(failures) < 2:
            raise RuntimeError("database away")
        recovered.set()

    quick = Periodic("test", 0.01, flaky, on_failure=failures.append).start()
    assert recovered.wait(30)
    quick.stop.set()
    assert quick.join(10)
    assert [str(e) for e in failures] == ["database away"] * 2


def test_the_first_pass_can_run_before_the_first_wait():
    ran = threading.Event()
    loop = Periodic("beat", 3600, ran.set, run_at_start=True).start()
    assert ran.wait(30)
    loop.stop.set()
    assert loop.join(10)


def test_one_worker_runs_the_interval_and_the_others_skip_it(client, key):
    runs: list[str] = []
    a = _elected(client, key, 60, lambda: runs.append("a"))
    b = _elected(client, key, 60, lambda: runs.append("b"))
    assert a.run_once() and not b.run_once()
    assert runs == ["a"]
    # Held to the end of the interval, not for the whole TTL, nor released.
    assert 0 < client.pttl(key) <= 60_000


def test_no_second_pass_starts_beside_a_running_one(client, key):
    inside, leave = threading.Event(), threading.Event()

    def slow() -> None:
        inside.set()
        assert leave.wait(30)

    a = _elected(client, key, 60, slow)
    thread = threading.Thread(target=a.run_once)
    thread.start()
    try:
        assert inside.wait(30)
        assert not _elected(client, key, 60, lambda: None).run_once()
    finally:
        leave.set()
        thread.join(30)


def test_a_pass_longer_than_its_interval_releases_the_lease_for_the_next(client, key):
    a = _elected(client, key, 0, lambda: None)  # any pass outlasts a zero interval
    assert a.run_once()
    assert client.exists(key) == 0
    assert _elected(client, key, 60, lambda: None).run_once()


def test_a_pass_that_outlived_its_lease_leaves_the_new_holders_lock_alone(client, key):
    def outlived() -> None:  # the lease expired mid-pass and another worker took it
        client.set(key, "someone else", px=30_000)

    assert _elected(client, key, 60, outlived).run_once()  # logged, not raised
    assert client.get(key) == b"someone else"


def test_redis_down_at_the_election_is_a_failed_try_and_no_pass():
    down = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    ran, failed = [], threading.Event()
    loop = Periodic(
        "test",
        0.01,
        lambda: ran.append(1),
        lease=Lease(down, "k", 30),
        on_failure=lambda exc: failed.set(),
    ).start()
    assert failed.wait(30)
    loop.stop.set()
    assert loop.join(10)
    assert ran == []


def test_the_heartbeat_beats_at_once_and_stops_with_its_worker(tmp_path):
    config = support.test_config(f"sqlite:///{tmp_path / 'unused.db'}")
    stop = threading.Event()
    try:
        loop = liveness.heartbeat(config, "host/1", lambda: [], lambda: "loader down", stop).start()
        client = make_redis(config)
        support.wait_for(lambda: "host/1" in heartbeats(client, config), 30, "the first beat")
        # The health follows the beat in the same pass, a write later.
        support.wait_for(
            lambda: worker_problems(client, config) == {"host/1": "loader down"},
            30,
            "the first pass to publish its health",
        )
        stop.set()
        assert loop.join(10)
    finally:
        stop.set()
        support.delete_redis_prefix(config.queue_prefix)
