"""Queues on a real RabbitMQ: every app declares them alike, each worker consumes its own."""

import json
import os
import subprocess
import sys
import threading
import uuid

import pytest

from shared.config import Config
from shared.queue import (
    CLASSIFY_TASK,
    bulk_queue,
    classify_queues,
    enqueue_jobs,
    enqueue_webhooks,
    interactive_queue,
    make_celery,
    webhook_queue,
)
from tests import support


@pytest.fixture
def rabbit_config(tmp_path):
    config = support.test_config(
        f"sqlite:///{tmp_path / 'q.db'}",
        broker_url=support.RABBITMQ_URL,
        queue_prefix=f"imgclf-q-{uuid.uuid4().hex[:8]}",
    )
    yield config
    support.delete_rabbitmq_queues(config)


def _consumed(module: str, config) -> dict[str, dict]:
    """The queues a worker app consumes, and their arguments, as its process sees them."""
    code = (
        f"import json, {module} as m; "
        "queues = m.app.amqp.queues.consume_from.values(); "
        "print(json.dumps({q.name: q.queue_arguments for q in queues}))"
    )
    env = {**os.environ, **support.config_env(config)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=support.ROOT, env=env, capture_output=True,
        text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def test_each_worker_consumes_its_own_quorum_queues(rabbit_config):
    quorum = {"x-queue-type": "quorum", "x-delivery-limit": rabbit_config.broker_delivery_limit}
    classify = _consumed("worker.celery_app", rabbit_config)
    webhooks = _consumed("worker.webhook_app", rabbit_config)
    assert classify == dict.fromkeys(classify_queues(rabbit_config), quorum)
    assert webhooks == {webhook_queue(rabbit_config): quorum}


def test_senders_and_workers_declare_the_same_queues(rabbit_config):
    # RabbitMQ refuses a declaration whose arguments differ from the queue's: the API
    # and the reconciler send to queues that the workers declared first, and back.
    app = make_celery(rabbit_config)
    with app.connection_for_write() as conn:
        for queue in app.conf.task_queues:
            queue.bind(conn.default_channel).declare()
    enqueue_jobs(app, rabbit_config, ["a", "b"])
    enqueue_webhooks(app, rabbit_config, ["e"])
    support.queue_reaches(app, classify_queues(rabbit_config), 2)
    support.queue_reaches(app, [webhook_queue(rabbit_config)], 1)


def test_each_queue_is_bound_under_its_own_name() -> None:
    """What the worker's banner shows: no queue bound under another queue's name."""
    config = Config(queue_prefix="imgclf-q")
    queues = make_celery(config).amqp.queues
    for name in (*classify_queues(config), webhook_queue(config)):
        assert queues[name].exchange.name == name
        assert queues[name].routing_key == name
    # Interactive first: a worker that consumes both takes interactive work first.
    assert (
        list(queues)[:2]
        == list(classify_queues(config))
        == [
            interactive_queue(config),
            bulk_queue(config),
        ]
    )


def test_a_rabbitmq_sender_declares_its_queues_itself(rabbit_config):
    # Before any worker declared them: a message for a missing queue would be dropped.
    app = make_celery(rabbit_config)
    enqueue_jobs(app, rabbit_config, ["a"])
    enqueue_webhooks(app, rabbit_config, ["e"])
    support.queue_reaches(app, [interactive_queue(rabbit_config)], 1)
    support.queue_reaches(app, [webhook_queue(rabbit_config)], 1)


def test_redis_messages_reach_their_lists_undeclared_and_ask_for_no_result(tmp_path):
    # On Redis the sender skips kombu's per-message declaration (issue #22): the
    # message still lands in its queue's list, with nothing declared before it.
    import redis

    config = support.test_config(f"sqlite:///{tmp_path / 'q.db'}")
    client = redis.Redis.from_url(config.redis_url)
    try:
        app = make_celery(config)
        enqueue_jobs(app, config, ["a", "b"])
        enqueue_webhooks(app, config, ["e"])
        assert client.llen(interactive_queue(config)) == 2
        assert client.llen(webhook_queue(config)) == 1
        message = json.loads(client.lindex(interactive_queue(config), 0))
        assert message["headers"]["ignore_result"] is True
        assert message["headers"]["task"] == CLASSIFY_TASK
    finally:
        support.delete_redis_prefix(config.queue_prefix)


def test_threads_share_one_result_backend(tmp_path):
    # Celery builds a backend per thread unless it is thread-safe and exists already:
    # each gunicorn thread's first send paid an entry-point scan.
    app = make_celery(support.test_config(f"sqlite:///{tmp_path / 'q.db'}"))
    start = threading.Barrier(4)
    seen: list[object] = []

    def first_send_of_a_thread() -> None:
        start.wait()
        seen.append(app.backend)

    threads = [threading.Thread(target=first_send_of_a_thread) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({id(backend) for backend in seen}) == 1
