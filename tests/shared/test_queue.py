"""Queue declarations: what the worker's banner shows is what the broker gets."""

from shared.config import Config
from shared.queue import bulk_queue, interactive_queue, make_celery


def test_each_queue_is_bound_under_its_own_name() -> None:
    config = Config(queue_prefix="imgclf-q")
    queues = make_celery(config).amqp.queues
    for name in (interactive_queue(config), bulk_queue(config)):
        assert queues[name].exchange.name == name
        assert queues[name].routing_key == name
    # Interactive first: a worker that consumes both takes interactive work first.
    assert list(queues) == [interactive_queue(config), bulk_queue(config)]
