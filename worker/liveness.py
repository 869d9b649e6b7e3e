"""Which workers are alive, and (on a Redis broker) which messages nobody alive holds.

Every worker instance has a name of its own, new at every start (a container
restarted under the same hostname is a new instance), and writes a heartbeat
under it every ``WORKER_DEAD_AFTER_S / 4``. A job's claim records that name
(``jobs.claimed_by``), so the reconciler can tell a job whose worker is dead
from one that is slow.

On RabbitMQ a dead consumer's connection closes and the broker returns its
unacknowledged messages at once. Redis has no consumers: kombu keeps each
delivered, unacknowledged message in the ``unacked`` hash and its delivery time
in the ``unacked_index`` sorted set, and only restores it after the visibility
timeout (900 s, since it must outlast any live worker's longest hold). So each
worker renews the index entries of the messages it holds with its heartbeat (a
lease), and an entry older than ``WORKER_DEAD_AFTER_S`` belongs to a dead worker:
the reconciler restores it to its queue with kombu's own ``restore_by_tag``.
That covers the batches in flight and the prefetched messages alike.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import redis
from kombu.transport.redis import Channel as RedisChannel

from shared.config import Config
from shared.queue import heartbeat_key, heartbeats, publish_health
from shared.redis_client import make_redis
from worker.periodic import Periodic

# kombu's key names (this service sets no global_keyprefix).
UNACKED = RedisChannel.unacked_key
UNACKED_INDEX = RedisChannel.unacked_index_key

# Heartbeats of instances gone this long are dropped from the hash.
FORGET_AFTER_S = 24 * 3600


def new_worker_id(hostname: str) -> str:
    return f"{hostname}/{secrets.token_hex(4)}"


def beat(client: redis.Redis, config: Config, worker_id: str) -> None:
    client.hset(heartbeat_key(config), worker_id, time.time())


def heartbeat(
    config: Config,
    worker_id: str,
    held: Callable[[], Iterable[str]],
    health: Callable[[], str | None],
    stop: threading.Event,
) -> Periodic:
    """The worker's heartbeat loop (``.start()``): at once, then every
    ``WORKER_DEAD_AFTER_S / 4``, renew the leases of the messages ``held`` (Redis
    broker), beat, and publish ``health``. Every process beats: no election, and no
    back-off, since a late beat would make a live worker look dead."""
    client = make_redis(config)
    broker = make_broker_redis(config) if config.broker_is_redis else None

    def run_pass() -> None:
        # Leases first: a message received after this beat is younger than it anyway.
        if broker is not None:
            renew_leases(broker, held())
        beat(client, config, worker_id)
        publish_health(client, config, worker_id, health())

    interval = config.heartbeat_interval_s
    # Redis down: /readyz shows the heartbeat ageing.
    return Periodic(
        "heartbeat", interval, run_pass, stop, max_backoff_s=interval, run_at_start=True
    )


def live_workers(client: redis.Redis, config: Config) -> set[str]:
    """Names whose heartbeat is younger than WORKER_DEAD_AFTER_S; forgets very old ones."""
    now = time.time()
    beats = heartbeats(client, config)
    forgotten = [name for name, at in beats.items() if now - at > FORGET_AFTER_S]
    if forgotten:
        client.hdel(heartbeat_key(config), *forgotten)
    return {name for name, at in beats.items() if now - at < config.worker_dead_after_s}


def make_broker_redis(config: Config) -> redis.Redis:
    """The Redis broker's own client (kombu's keys live there, not under REDIS_URL)."""
    return make_redis(config, config.effective_broker_url)


def renew_leases(broker: redis.Redis, tags: Iterable[str]) -> None:
    """Mark these held messages as held now; XX: an acked one (gone) is not re-added."""
    now = time.time()
    leases = dict.fromkeys(tags, now)
    if leases:
        broker.zadd(UNACKED_INDEX, leases, xx=True)


@dataclass(frozen=True)
class Orphan:
    tag: str
    job_ids: list[str]


def orphaned_deliveries(
    broker: redis.Redis, config: Config, queues: Iterable[str], limit: int
) -> list[Orphan]:
    """Unacknowledged messages of ``queues`` whose lease nobody renewed in time.

    Other apps' and deployments' messages share kombu's keys: only ours are taken.
    """
    cutoff = time.time() - config.worker_dead_after_s
    # Bytes: the broker's client is built without decode_responses.
    tags = cast(
        list[bytes], broker.zrangebyscore(UNACKED_INDEX, "-inf", cutoff, start=0, num=limit)
    )
    if not tags:
        return []
    wanted, orphans = set(queues), []
    for tag, raw in zip(tags, broker.hmget(UNACKED, tags), strict=True):
        if raw is None:
            continue  # acked or restored meanwhile
        message, _exchange, routing_key = json.loads(raw)
        if routing_key in wanted:
            orphans.append(Orphan(tag.decode(), _job_ids(message)))
    return orphans


def _job_ids(message: dict) -> list[str]:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return [str(i) for i in args[0]] if args else []
    except (KeyError, IndexError, TypeError, ValueError):
        return []  # not ours to read: restored all the same
