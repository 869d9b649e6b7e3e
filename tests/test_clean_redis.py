"""``make clean`` removes this deployment's Redis keys and nothing else (issue #25)."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from harness.databases import record_prefix
from tests import support


def test_clean_deletes_only_the_keys_of_its_own_prefix():
    prefix = support.new_prefix()
    neighbour = f"{prefix}2"  # another deployment whose prefix starts with ours
    record_prefix(neighbour)
    client = redis.Redis.from_url(support.REDIS_URL)
    ours = [
        f"{prefix}:upload:abc",
        f"{prefix}:limits:LIMITER/submit/1",
        f"{prefix}.bulk",
        f"_kombu.binding.{prefix}.bulk",
        f"_kombu.binding_permanent.{prefix}.interactive",
    ]
    theirs = [
        f"{neighbour}:upload:abc",
        f"{neighbour}.bulk",
        f"_kombu.binding.{neighbour}.bulk",
        f"{prefix}-not-a-key-of-ours",
    ]
    for key in ours + theirs:
        client.set(key, "x")
    try:
        env = {**os.environ, "REDIS_URL": support.REDIS_URL, "QUEUE_PREFIX": prefix}
        env.pop("BROKER_URL", None)
        run = subprocess.run(
            [sys.executable, "-m", "scripts.clean_redis"],
            cwd=support.ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert f"deleted {len(ours)} keys" in run.stdout
        assert [k for k in ours if client.exists(k)] == []
        assert [k for k in theirs if client.exists(k)] == theirs
    finally:
        client.delete(*ours, *theirs)


def test_make_clean_runs_it():
    makefile = (support.ROOT / "Makefile").read_text()
    clean = makefile.split("\nclean:", 1)[1].split("\n\n", 1)[0]
    assert ".venv/bin/python -m scripts.clean_redis" in clean
    assert "flush" not in clean.lower()
