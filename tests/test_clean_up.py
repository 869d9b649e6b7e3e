"""The suite leaves Redis and PostgreSQL as it found them: it deletes only what it made."""

import os
import shutil
import subprocess
import sys

import psycopg
import pytest
import redis

from tests import support
from tests.faults import RedisServer


@pytest.fixture
def private_redis():
    """A redis-server of this test's own on a free port: every key in it is accounted for."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    yield server.url
    server.cleanup()


def test_a_test_session_removes_its_keys_and_databases_and_nothing_else(private_redis):
    # Keys someone else put there, in every database, before the run.
    theirs = support.plant_redis_sentinels(private_redis)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
            "tests/api/test_errors.py::test_accepted_jobs_and_batches_carry_location",
        ],
        cwd=support.ROOT,
        env={**os.environ, "TEST_REDIS_URL": private_redis},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "2 passed" in output  # PostgreSQL and SQLite: both made queues and bindings
    # Nothing of the run's own is left, and every key that was there before still is.
    left = {db: redis.Redis.from_url(db).keys("*") for db in theirs}
    assert left == {db: [key.encode()] for db, key in theirs.items()}
    with psycopg.connect(support.admin_dsn(), autocommit=True) as conn:
        databases = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"imgclf_test_{proc.pid}_%",)
        ).fetchall()
    assert databases == []


def test_the_suite_fails_when_a_test_deletes_keys_it_did_not_make(private_redis, tmp_path):
    """The session guard (conftest's ``redis_left_as_found``) catches a FLUSHDB."""
    test = tmp_path / "test_flushes.py"
    test.write_text(
        "import os, redis\n"
        "def test_flushes():\n"
        "    url = os.environ['TEST_REDIS_URL'].rsplit('/', 1)[0] + '/13'\n"
        "    redis.Redis.from_url(url).flushdb()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-p", "tests.conftest", str(test)],
        cwd=support.ROOT,
        env={**os.environ, "TEST_REDIS_URL": private_redis},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "the suite deleted keys it did not create" in proc.stdout, proc.stdout[-3000:]
    assert f"{private_redis.rsplit('/', 1)[0]}/13" in proc.stdout
