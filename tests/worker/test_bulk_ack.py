"""The worker's Redis transport acks a pass of the event loop in one round trip (issue #22).

Real Redis, kombu's own channel and QoS; the loop's tick is called by hand.
"""

import pytest
import redis

from harness import stack_config
from tests import support
from worker import celery_app


@pytest.fixture
def queue():
    config = stack_config.test_config("sqlite://", queue_prefix=support.new_prefix("ack"))
    app = celery_app.create_app(config)
    assert app.conf.broker_transport is celery_app.BulkAckTransport
    with app.connection_for_write() as conn:
        name = f"{config.queue_prefix}.acks"
        q = conn.SimpleQueue(name)
        q.name = name
        yield conn, q
        redis.Redis.from_url(stack_config.REDIS_URL).delete(name)


def _waiting(q) -> int:
    return redis.Redis.from_url(stack_config.REDIS_URL).llen(q.name)


def _held(conn, messages) -> list[bool]:
    qos = conn.default_channel.qos
    client = redis.Redis.from_url(stack_config.REDIS_URL)
    return [
        bool(client.hexists(qos.unacked_key, m.delivery_tag))
        and client.zscore(qos.unacked_index_key, m.delivery_tag) is not None
        for m in messages
    ]


def test_the_acks_of_one_pass_leave_the_unacked_set_in_one_round_trip(queue, monkeypatch):
    conn, q = queue
    for i in range(3):
        q.put({"n": i})
    messages = [q.get(timeout=5) for _ in range(3)]
    assert _held(conn, messages) == [True] * 3
    conn.transport.acks_on_tick = True  # as when it runs in celery's event loop
    for m in messages:
        m.ack()
    assert _held(conn, messages) == [True] * 3  # until the loop's tick
    sent = []
    real = redis.client.Pipeline.execute

    def execute(self, *args, **kwargs):
        sent.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    conn.transport._flush_acks()
    assert sent == [1]
    assert _held(conn, messages) == [False] * 3
    assert _waiting(q) == 0


def test_acks_not_yet_sent_are_sent_at_close_and_nothing_acked_comes_back(queue):
    conn, q = queue
    q.put({"n": "acked"})
    q.put({"n": "held"})
    acked, held = q.get(timeout=5), q.get(timeout=5)
    conn.transport.acks_on_tick = True
    acked.ack()
    conn.default_channel.close()  # kombu restores what it holds, unacked, to the queue
    assert _held(conn, [acked, held]) == [False, False]
    assert _waiting(q) == 1


def test_without_an_event_loop_each_ack_is_sent_at_once(queue):
    conn, q = queue
    q.put({"n": 1})
    m = q.get(timeout=5)
    m.ack()
    assert _held(conn, [m]) == [False]
