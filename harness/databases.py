"""Scratch state on the shared services: PostgreSQL databases, Redis prefixes, RabbitMQ queues.

Everything made here is recorded, so that ``clean_up_session`` (the end of a test
session) removes what a test's or benchmark's own clean-up missed.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import psycopg
import redis
from sqlalchemy.engine import make_url

from harness.services import POSTGRES_ADMIN_URL, REDIS_URL
from shared import migrate
from shared.config import Config
from shared.queue import bulk_queue, interactive_queue, webhook_queue

# Everything this process created outside its temporary folders.
_CREATED_DATABASES: set[str] = set()
_CREATED_PREFIXES: set[str] = set()


def admin_dsn() -> str:
    """The libpq DSN of the PostgreSQL administration database (creates and drops)."""
    return make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql").render_as_string(False)


def create_postgres_database() -> str:
    """A fresh, empty PostgreSQL database; returns its SQLAlchemy URL."""
    name = f"imgclf_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _CREATED_DATABASES.add(name)
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)


def drop_postgres_database(url: str) -> None:
    _drop_database(make_url(url).database)


def _drop_database(name: str) -> None:
    with psycopg.connect(admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrated(config: Config) -> Config:
    """``config`` after its database has been migrated to the latest schema."""
    migrate.upgrade(config)
    return config


def new_prefix(kind: str = "test") -> str:
    """A fresh QUEUE_PREFIX, removed from Redis when the session ends."""
    prefix = f"imgclf-{kind}-{uuid.uuid4().hex[:8]}"
    record_prefix(prefix)
    return prefix


def record_prefix(prefix: str) -> None:
    """Remove ``prefix`` from Redis when the session ends (a prefix made elsewhere)."""
    _CREATED_PREFIXES.add(prefix)


def delete_redis_prefix(prefix: str) -> None:
    """The prefix's queues and keys, and kombu's bindings of its queues (named after them)."""
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (prefix, f"_kombu.binding.{prefix}", f"_kombu.binding_permanent.{prefix}"):
        for key in client.scan_iter(f"{pattern}*", count=1000):
            client.delete(key)


def plant_redis_sentinels(url: str) -> dict[str, str]:
    """A key of no test's prefix in every database of ``url``'s Redis: {db url: key}.

    ``missing_redis_sentinels`` then says which are gone; a run that leaves Redis as it
    found it (deletes only its own prefixes) loses none. They expire in a day should the
    process die before removing them.
    """
    base = url.rsplit("/", 1)[0]
    key = f"imgclf-sentinel-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    planted = {}
    for db in range(_redis_databases(url)):
        redis.Redis.from_url(f"{base}/{db}").set(key, "not the suite's to delete", ex=86400)
        planted[f"{base}/{db}"] = key
    return planted


def missing_redis_sentinels(planted: dict[str, str]) -> list[str]:
    """The databases of ``planted`` whose sentinel is gone; removes those still there."""
    missing = []
    for db_url, key in planted.items():
        if not redis.Redis.from_url(db_url).delete(key):
            missing.append(db_url)
    return missing


def _redis_databases(url: str) -> int:
    try:
        return int(redis.Redis.from_url(url).config_get("databases")["databases"])
    except redis.ResponseError:  # CONFIG disabled (a managed Redis): the default count
        return 16


def clean_up_session() -> None:
    """Remove every prefix and scratch database this process created (end of the session)."""
    try:
        for prefix in _CREATED_PREFIXES:
            delete_redis_prefix(prefix)
        for name in _CREATED_DATABASES:
            _drop_database(name)
    except (redis.RedisError, psycopg.Error) as exc:  # a service a fault test left down
        print(f"test clean-up incomplete: {exc!r}")


def delete_rabbitmq_queues(config: Config) -> None:
    """Drop a stack's queues (and their exchanges) from the shared RabbitMQ."""
    from kombu import Connection

    names = [interactive_queue(config), bulk_queue(config), webhook_queue(config)]
    with Connection(config.effective_broker_url, connect_timeout=5) as conn:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(name)
                channel.exchange_delete(name)
            except conn.channel_errors:
                pass  # never declared
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
