"""The suite leaves Redis and PostgreSQL as it found them."""

import os
import subprocess
import sys

import psycopg
import redis

from tests import support

# A Redis database of its own, so keys of other test sessions cannot be mistaken for ours.
SCRATCH_REDIS = support.REDIS_URL.rsplit("/", 1)[0] + "/13"


def test_a_test_session_removes_its_queues_bindings_and_databases():
    scratch = redis.Redis.from_url(SCRATCH_REDIS)
    scratch.flushdb()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/api/test_errors.py::test_accepted_jobs_and_batches_carry_location",
        ],
        cwd=support.ROOT,
        env={**os.environ, "TEST_REDIS_URL": SCRATCH_REDIS},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "2 passed" in output  # PostgreSQL and SQLite: both made queues and bindings
    assert scratch.keys("*") == []
    with psycopg.connect(support.admin_dsn(), autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"imgclf_test_{proc.pid}_%",)
        ).fetchall()
    assert left == []
