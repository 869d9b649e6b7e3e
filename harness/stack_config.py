"""The ``Config`` of a scratch stack, and the environment that reproduces it in a process."""

from __future__ import annotations

import dataclasses

from harness.databases import new_prefix, record_prefix
from harness.services import REDIS_URL
from shared.config import Config


def test_config(database_url: str, **overrides) -> Config:
    """A config on ``database_url``, the local Redis and a fresh queue prefix, fast to test."""
    values = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "queue_prefix": new_prefix(),
        "allow_private_urls": True,
        # Scratch databases on this machine: the null-model benchmarks may run RUNTIME=null.
        "allow_null_runtime": True,
        "bcrypt_rounds": 4,
        "max_wait_s": 60,
        # Tests submit in bursts; test_ratelimit.py checks the limits themselves.
        "rate_limit_submit": "10000/second",
        "signup_limit_per_ip": "100000/second",
        # Webhook retries in tests: the production schedule's shape, in seconds, not hours.
        "webhook_backoff_s": ("0", "0.5", "1", "2"),
        "webhook_timeout_s": 2.0,
    }
    values.update(overrides)
    record_prefix(values["queue_prefix"])
    return Config.from_env({}, **values)


def config_env(config: Config) -> dict[str, str]:
    """The environment variables that reproduce ``config`` in another process."""
    env = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, tuple):
            value = ",".join(value)
        env[f.name.upper()] = str(value)
    return env
