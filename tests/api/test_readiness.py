"""/readyz judges the classification workers by their heartbeat, besides the database and Redis."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from api import create_app
from shared.queue import heartbeat_key, publish_health
from tests import support


@pytest.fixture
def fresh_config(api_stack):
    """The API's config with a Redis prefix of its own: no other test's heartbeats."""
    config = api_stack.config.replace(queue_prefix=f"imgclf-ready-{uuid.uuid4().hex[:8]}")
    yield config
    support.delete_redis_prefix(config.queue_prefix)


def _beat(config, age_s: float, name: str = "w1@host", problem: str | None = None) -> None:
    """A heartbeat written the way worker/celery_app.py writes it, ``age_s`` seconds ago."""
    client = redis.Redis.from_url(config.redis_url)
    client.hset(heartbeat_key(config), name, time.time() - age_s)
    publish_health(client, config, name, problem)


def test_not_ready_without_a_worker_heartbeat(fresh_config):
    ready = create_app(fresh_config).test_client().get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == body["checks"]["redis"] == "ok"
    assert body["checks"]["worker"].startswith("error")
    assert body["checks"]["worker_heartbeat_age_s"] is None


def test_not_ready_when_the_last_heartbeat_is_too_old(fresh_config):
    config = fresh_config.replace(ready_heartbeat_max_age_s=30)
    _beat(config, age_s=83)  # the worker died 83 s ago
    ready = create_app(config).test_client().get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["worker_heartbeat_age_s"] >= 83


def test_ready_with_a_fresh_heartbeat(fresh_config):
    _beat(fresh_config, age_s=1)
    ready = create_app(fresh_config).test_client().get("/readyz")
    assert ready.status_code == 200, ready.get_json()
    assert ready.get_json()["checks"]["worker"] == "ok"


def test_workers_can_be_reported_without_being_judged(fresh_config):
    config = fresh_config.replace(ready_heartbeat_max_age_s=0)
    ready = create_app(config).test_client().get("/readyz")
    assert ready.status_code == 200
    assert "worker" not in ready.get_json()["checks"]


def test_not_ready_when_the_only_fresh_worker_cannot_serve(fresh_config):
    _beat(fresh_config, age_s=1, problem="2 of 2 loader process(es) cannot start")
    _beat(fresh_config, age_s=500, name="old@host")  # a healthy one, but long gone
    ready = create_app(fresh_config).test_client().get("/readyz")
    assert ready.status_code == 503
    assert "loader process(es) cannot start" in ready.get_json()["checks"]["worker"]


def test_ready_while_another_fresh_worker_serves(fresh_config):
    _beat(fresh_config, age_s=1, problem="2 of 2 loader process(es) cannot start")
    _beat(fresh_config, age_s=1, name="w2@host")
    ready = create_app(fresh_config).test_client().get("/readyz")
    assert ready.status_code == 200, ready.get_json()


def test_a_worker_that_recovers_is_ready_again(fresh_config):
    _beat(fresh_config, age_s=1, problem="1 of 2 loader process(es) cannot start")
    _beat(fresh_config, age_s=1, problem=None)  # its next beat: all well
    ready = create_app(fresh_config).test_client().get("/readyz")
    assert ready.status_code == 200, ready.get_json()
