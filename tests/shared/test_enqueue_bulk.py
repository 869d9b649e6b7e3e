"""enqueue_bulk on both brokers: every chunk a message, in order; what a failure reports."""

from __future__ import annotations

import uuid

import pytest
from kombu.exceptions import OperationalError

from shared.queue import BulkSendError, bulk_queue, enqueue_bulk, make_celery
from tests import support

CHUNKS = [["a", "b"], ["c"], ["d", "e", "f"]]


@pytest.fixture(params=["redis", "rabbitmq"])
def config(request, tmp_path):
    broker = {"redis": "", "rabbitmq": support.RABBITMQ_URL}[request.param]
    config = support.test_config(
        f"sqlite:///{tmp_path / 'q.db'}",
        broker_url=broker,
        queue_prefix=f"imgclf-eb-{uuid.uuid4().hex[:8]}",
    )
    yield config
    if config.broker_is_redis:
        support.delete_redis_prefix(config.queue_prefix)
    else:
        support.delete_rabbitmq_queues(config)


def _received(app, config) -> list[list[str]]:
    """The bulk queue's messages in the order a worker takes them."""
    got = []
    with app.connection_for_read() as conn:
        queue = app.amqp.queues[bulk_queue(config)](conn.default_channel)
        while (message := queue.get(no_ack=True)) is not None:
            got.append(message.decode()[0][0])  # the task's args: (ids,)
    return got


def test_every_chunk_is_a_message_in_order(config):
    app = make_celery(config)
    with app.connection_for_write() as conn:  # as the workers declare it
        app.amqp.queues[bulk_queue(config)](conn.default_channel).declare()
    enqueue_bulk(app, config, CHUNKS)
    support.queue_reaches(app, [bulk_queue(config)], 3)
    assert _received(app, config) == CHUNKS


def test_a_failure_says_how_many_chunks_went_out(config, monkeypatch):
    """On RabbitMQ each message goes out as it is built: those before the failure are
    sent. On Redis they go in one pipeline at the end: none was."""
    app = make_celery(config)
    with app.connection_for_write() as conn:
        app.amqp.queues[bulk_queue(config)](conn.default_channel).declare()
    real, calls = app.send_task, []

    def third_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OperationalError("connection lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(app, "send_task", third_fails)
    with pytest.raises(BulkSendError) as failed:
        enqueue_bulk(app, config, CHUNKS)
    assert isinstance(failed.value.__cause__, OperationalError)
    sent = 0 if config.broker_is_redis else 2
    assert failed.value.sent == sent
    support.queue_reaches(app, [bulk_queue(config)], sent)
    assert _received(app, config) == CHUNKS[:sent]
