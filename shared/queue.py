"""The Celery app both sides build from the same config.

The API only *sends* tasks by name (it never imports the worker, TensorFlow or the
models); ``worker.celery_app`` adds the task implementations to an app made here.
Messages carry job ids only; SQL holds everything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.exceptions import ChannelError
from kombu.transport import redis as kombu_redis

from shared.config import Config

CLASSIFY_TASK = "imgclf.classify"
DELIVER_WEBHOOK_TASK = "imgclf.deliver_webhook"


def interactive_queue(config: Config) -> str:
    return f"{config.queue_prefix}.interactive"


def bulk_queue(config: Config) -> str:
    return f"{config.queue_prefix}.bulk"


def webhook_queue(config: Config) -> str:
    return f"{config.queue_prefix}.webhooks"


def classify_queues(config: Config) -> tuple[str, str]:
    return interactive_queue(config), bulk_queue(config)


def service_queue(config: Config, name: str) -> Queue:
    """A queue as every app of the service declares it (RabbitMQ refuses a mismatch)."""
    # Bound to its own direct exchange under its own name; without one, Celery binds
    # every queue to the default queue's exchange and routing key, which reads (in the
    # worker's banner) as if bulk work were routed to the interactive queue.
    exchange = Exchange(name, type="direct")
    if config.broker_is_redis:
        return Queue(name, exchange, routing_key=name)
    # RabbitMQ: replicated, durable quorum queues. A consumer's death (its connection
    # closes) returns its unacknowledged messages at once; a message redelivered
    # BROKER_DELIVERY_LIMIT times (one that kills every worker) is dropped, and the
    # reconciler ends its jobs from SQL. Celery detects quorum queues
    # (worker_detect_quorum_queues) and then uses a per-consumer prefetch, as quorum
    # queues have no global QoS. ETA/countdown tasks would need native delayed
    # delivery: the service sends none (webhook retries are scheduled in SQL).
    return Queue(
        name,
        exchange,
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": config.broker_delivery_limit,
        },
    )


class _PublishingChannel(kombu_redis.Channel):
    """kombu's Redis channel, publishing through one client per channel.

    kombu builds a new ``redis.Redis`` for every message it sends (``conn_or_acquire``),
    and redis-py fills a table of ~170 response callbacks for each: a third of the CPU
    of sending one job (issue #17). The client only borrows connections from the
    channel's pool per command, so one per channel serves every send; consuming
    (the asynchronous client) is unchanged.
    """

    _publish_client: redis.Redis | None = None

    def _create_client(self, asynchronous: bool = False) -> redis.Redis:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        client = self._publish_client
        # A new client when kombu replaced the pool (it does after a lost connection).
        if client is None or client.connection_pool is not self.pool:
            client = self._publish_client = super()._create_client()
        return client


class RedisTransport(kombu_redis.Transport):
    """The Redis transport with ``_PublishingChannel`` (``broker_transport`` below)."""

    Channel = _PublishingChannel


def _transport_options(config: Config) -> dict:
    if not config.broker_is_redis:
        return {}  # py-amqp: broker_connection_timeout covers connecting
    return {
        "visibility_timeout": config.visibility_timeout_s,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }


# --- the workers' presence in Redis: written by the workers, read by others -------


def heartbeat_key(config: Config) -> str:
    """Hash of classification workers' heartbeats (name -> unix time), read by /readyz."""
    return f"{config.queue_prefix}:workers:heartbeat"


def worker_health_key(config: Config) -> str:
    """Hash of classification workers that beat but cannot serve (name -> why), for /readyz.

    A worker writes its entry with its heartbeat while something it needs is broken
    (its loader processes cannot start) and deletes it once well again.
    """
    return f"{config.queue_prefix}:workers:health"


def publish_health(client: redis.Redis, config: Config, name: str, problem: str | None) -> None:
    """Record worker ``name``'s problem, or that it has none."""
    if problem:
        client.hset(worker_health_key(config), name, problem)
    else:
        client.hdel(worker_health_key(config), name)


def worker_problems(client: redis.Redis, config: Config) -> dict[str, str]:
    """Every classification worker's problem (name -> why); a worker absent has none."""
    found = cast(dict[bytes, bytes], client.hgetall(worker_health_key(config)))
    return {k.decode(): v.decode() for k, v in found.items()}


def worker_ready_key(config: Config) -> str:
    """Hash of classification worker processes serving with their models loaded.

    (process name -> unix time); tests and operators read it to know a worker is up.
    """
    return f"{config.queue_prefix}:workers:ready"


def webhook_worker_ready_key(config: Config) -> str:
    """Hash of webhook workers consuming and sweeping (process name -> unix time)."""
    return f"{config.queue_prefix}:webhook-workers:ready"


def heartbeats(client: redis.Redis, config: Config) -> dict[str, float]:
    """Every classification worker's last heartbeat (name -> unix time)."""
    found = cast(dict[bytes, bytes], client.hgetall(heartbeat_key(config)))
    return {k.decode(): float(v) for k, v in found.items()}


def make_celery(config: Config, main: str = "imgclf") -> Celery:
    app = Celery(main, broker=config.effective_broker_url, set_as_current=False)
    queue = interactive_queue(config)
    if config.effective_broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        app.conf.broker_transport = RedisTransport  # not sentinel://: kombu's own transport
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # No result backend is configured, and the disabled one holds no state: share it.
        # Else Celery builds one per thread, on each thread's first send (an entry-point
        # scan: about 2 % of the API's CPU over a thousand singles, one per gunicorn
        # thread and process).
        result_backend_thread_safe=True,
        # Every queue the service sends to, declared alike by senders and consumers.
        # Each worker app consumes only its own: the classification worker the first
        # two (interactive listed first, so it takes interactive work first), the
        # webhook worker the last (worker/celery_app.py, worker/webhook_app.py).
        task_queues=[
            service_queue(config, name)
            for name in (*classify_queues(config), webhook_queue(config))
        ],
        # Anything else would be declared on first use: as a quorum queue on RabbitMQ.
        task_create_missing_queue_type="classic" if config.broker_is_redis else "quorum",
        task_default_queue=queue,
        task_routes={
            CLASSIFY_TASK: {"queue": queue},
            DELIVER_WEBHOOK_TASK: {"queue": webhook_queue(config)},
        },
        # At-least-once: a message is acked after its batch is written, and comes
        # back if the worker dies; every write in the task is a conditional
        # status transition, so a redelivery changes nothing already done.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=3,
        broker_transport_options=_transport_options(config),
        # A submission must fail fast (503) when Redis is down, not hang the request.
        task_publish_retry=True,
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        worker_prefetch_multiplier=max(1, config.effective_prefetch // config.worker_concurrency),
        worker_concurrency=config.worker_concurrency,
        worker_pool=config.worker_pool,
        worker_hijack_root_logger=False,
        # Celery waits this long on a cold shutdown (a second SIGTERM, or SIGQUIT) only
        # while its active_requests is not empty, and worker.batching's strategy runs
        # batches without a celery Request, so it never waits: batches in flight are
        # cut off and redelivered (acks_late). worker_enable_soft_shutdown_on_idle
        # would make it wait whatever runs.
        worker_soft_shutdown_timeout=config.worker_shutdown_timeout_s,
        worker_send_task_events=False,
        # A prefork pool process loads the models before it reports for work; under
        # load that takes far longer than Celery's 4 s default, which killed and
        # restarted pool processes in a loop.
        worker_proc_alive_timeout=config.worker_proc_alive_timeout_s,
    )
    # Built now, once: threads that send their first message together would each build
    # one (result_backend_thread_safe shares only what exists when they look).
    _ = app.backend
    return app


def queue_depth(app: Celery, names: Sequence[str]) -> int:
    """Messages waiting in these queues (not those held by workers), on either broker."""
    waiting = 0
    with app.connection_for_read() as conn:
        for name in names:
            # A channel each: on RabbitMQ a missing queue closes the channel that asked.
            channel = conn.channel()
            try:
                waiting += channel.queue_declare(queue=name, passive=True).message_count
            except (ChannelError, *conn.channel_errors):
                pass  # no such queue (on Redis an empty list is no key): nothing waits
            finally:
                with contextlib.suppress(Exception):  # already closed by the broker
                    channel.close()
    return waiting


def _send_options(config: Config) -> dict:
    """``send_task`` options that spare each message work it does not need (issue #22).

    - ``ignore_result``: no task of the service returns a result anyone reads (SQL holds
      them), but ``send_task`` cannot see ``task_ignore_result`` (it has no task object)
      and asks the result backend to prepare for each message unless told.
    - ``declare=[]`` on Redis only: the message goes to the queue's list by name (the
      default exchange), so kombu's per-message declaration (a copy and bind of the
      queue entity, then a cache look-up) changes nothing. RabbitMQ keeps it: there the
      declaration is what makes a queue exist before any worker has started, and a
      message for a missing queue would be dropped.
    - ``kwargsrepr``: the tasks take no keyword arguments; Celery would run its
      ``saferepr`` (a recursive, size-bounded repr) over the empty dict for each message.
      A single job's ``argsrepr`` is its plain ``repr`` (``enqueue_jobs``), the same text
      for a fraction of the cost: ``saferepr`` of both was ~13 % of a send (issue #22).
    """
    options: dict = {"ignore_result": True, "kwargsrepr": "{}"}
    if config.broker_is_redis:
        options["declare"] = []
    return options


def enqueue_jobs(app: Celery, config: Config, job_ids: Sequence[str]) -> None:
    """Send single jobs, one message each. Raises kombu/redis errors if the broker is down."""
    queue = interactive_queue(config)
    options = _send_options(config)
    with app.producer_or_acquire() as producer:
        for job_id in job_ids:
            args = ([job_id],)
            app.send_task(
                CLASSIFY_TASK,
                args=args,
                queue=queue,
                producer=producer,
                argsrepr=repr(args),
                **options,
            )


class BulkSendError(Exception):
    """``enqueue_bulk`` failed (the broker's error is the cause): its first ``sent``
    chunks went out; the others did not, or may not have."""

    def __init__(self, sent: int) -> None:
        super().__init__(f"bulk send failed after {sent} chunk(s)")
        self.sent = sent


def enqueue_bulk(app: Celery, config: Config, chunks: Sequence[Sequence[str]]) -> None:
    """Send bulk jobs on the bulk queue, one message per chunk of job ids, in one go
    where the broker allows it. Raises ``BulkSendError`` if the broker fails.

    kombu's ``Producer.batch``: on Redis the messages are built, then pushed in one
    pipeline (one round trip, not one per chunk: a refill sends up to ~24 at once);
    kombu counts a failed pipeline's delivery as uncertain, and so does ``sent`` (0).
    On RabbitMQ each message is published as it is built (publishing does not wait
    for the broker), and ``sent`` counts those that went out before the failure.
    """
    queue = bulk_queue(config)
    options = _send_options(config)
    sent = 0
    batched = False
    try:
        with app.producer_or_acquire() as producer, producer.batch():
            for ids in chunks:
                app.send_task(
                    CLASSIFY_TASK, args=(list(ids),), queue=queue, producer=producer, **options
                )
                sent += 1
                # Asked once the channel is open: kombu decides on the channel's settings.
                batched = producer.supports_batch_publish
    except Exception as exc:
        raise BulkSendError(0 if batched else sent) from exc


def enqueue_webhooks(app: Celery, config: Config, event_ids: Sequence[str]) -> None:
    """Ask the webhook worker to deliver these events now."""
    queue = webhook_queue(config)
    options = _send_options(config)
    with app.producer_or_acquire() as producer:
        for event_id in event_ids:
            app.send_task(
                DELIVER_WEBHOOK_TASK, args=(event_id,), queue=queue, producer=producer, **options
            )
