"""The worker's Redis transport acks a pass of the event loop in one round trip, and
takes the messages waiting behind a BRPOP'd one with it (issue #22).

Real Redis, kombu's own channel and QoS; the loop's tick is called by hand.
"""

import pytest
import redis
from kombu import Consumer, Queue

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


# --- taking the messages that wait behind the BRPOP'd one ------------------------------


@pytest.fixture
def consumer(queue):
    """A kombu consumer of the queue with a prefetch window of 3, and what it got."""
    conn, q = queue
    got = []
    channel = conn.channel()
    c = Consumer(channel, [Queue(q.name)], callbacks=[lambda _body, m: got.append(m)])
    c.qos(prefetch_count=3)
    c.consume()
    yield conn, q, channel, got
    c.cancel()


def _read_once(conn) -> None:
    """One BRPOP and its reply (one pass of the loop, as celery's hub runs it)."""
    conn.drain_events(timeout=5)


def test_messages_waiting_behind_arrive_in_the_same_read_held_up_to_the_prefetch(consumer):
    conn, q, channel, got = consumer
    for i in range(5):
        q.put({"n": i})
    _read_once(conn)
    assert [m.payload["n"] for m in got] == [0, 1, 2]  # the window, in queue order
    assert _held(conn, got) == [True] * 3  # each in kombu's unacked set
    assert sorted(channel.qos._delivered) == sorted(m.delivery_tag for m in got)
    assert _waiting(q) == 2


def test_taken_messages_unacked_come_back_at_close_as_kombu_wrote_them(consumer):
    conn, q, channel, got = consumer
    for i in range(4):
        q.put({"n": i})
    _read_once(conn)
    got[0].ack()
    channel.close()  # restores what it holds from the unacked hash entries
    assert _held(conn, got) == [False] * 3
    again = [q.get(timeout=5) for _ in range(3)]
    assert sorted(m.payload["n"] for m in again) == [1, 2, 3]
    assert all(m.delivery_info["redelivered"] for m in again if m.payload["n"] != 3)


def test_a_foreign_message_behind_stays_in_the_queue_and_stops_the_take(consumer):
    conn, q, _channel, got = consumer
    client = redis.Redis.from_url(stack_config.REDIS_URL)
    q.put({"n": 0})
    client.lpush(q.name, b"not kombu's json")
    q.put({"n": 1})
    _read_once(conn)
    assert [m.payload["n"] for m in got] == [0]
    assert _waiting(q) == 2
    assert client.rpop(q.name) == b"not kombu's json"  # next in line, as it was


def test_the_interactive_queue_is_taken_from_first(queue):
    conn, q = queue
    first, second = f"{q.name}.first", f"{q.name}.second"
    got = []
    channel = conn.channel()
    c = Consumer(
        channel,
        [Queue(first), Queue(second)],
        callbacks=[lambda _body, m: got.append(m.payload)],
    )
    c.qos(prefetch_count=10)
    c.consume()
    client = redis.Redis.from_url(stack_config.REDIS_URL)
    try:
        with conn.Producer() as producer:
            for i in range(3):
                producer.publish({"q": "second", "n": i}, routing_key=second)
            for i in range(3):
                producer.publish({"q": "first", "n": i}, routing_key=first)
        _read_once(conn)
        assert len(got) == 6
        rest = [m["q"] for m in got[1:]]
        assert rest == sorted(rest, key=lambda name: name != "first")
    finally:
        c.cancel()
        client.delete(first, second)
