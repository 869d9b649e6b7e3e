"""A loader process that cannot start: started again with back-off, and /readyz says so.

What keeps it from starting here is a ``sitecustomize`` (on PYTHONPATH, which spawned
children inherit) that ends every 'spawn' child at once, as the missing project on
sys.path did under the ``celery`` program (issue #22 item 0); the worker itself starts.
"""

from __future__ import annotations

import itertools
import logging
import re

import pytest

from api import create_app
from tests import support
from worker import loader_pool
from worker.loader import ImageTask, load_all
from worker.loader_pool import LoaderProcesses

MOBILENET = (224, 224)
FAIL_IN_SPAWNED_CHILDREN = """\
import os, sys
if "--multiprocessing-fork" in sys.orig_argv:
    os._exit(3)
"""


@pytest.fixture
def no_spawned_child_starts(tmp_path, monkeypatch):
    (tmp_path / "sitecustomize.py").write_text(FAIL_IN_SPAWNED_CHILDREN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return monkeypatch


def _retries(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "before it was ready" in r.getMessage()]


def test_a_loader_that_cannot_start_is_started_again_with_back_off(
    sqlite_url, no_spawned_child_starts, caplog, photo_server
):
    config = support.test_config(sqlite_url, fetch_threads=2)
    no_spawned_child_starts.setattr(loader_pool, "START_BACKOFF_S", 0.05)
    no_spawned_child_starts.setattr(loader_pool, "START_BACKOFF_MAX_S", 0.4)
    caplog.set_level(logging.INFO, logger="worker.loader_pool")
    loaders = LoaderProcesses(config, processes=1)
    try:
        support.wait_for(lambda: len(_retries(caplog)) >= 6, 60, "six failed starts")
        assert "cannot start" in loaders.health()
        retries = _retries(caplog)[:6]
        delays = [float(re.search(r"again in ([\d.]+) s", r.getMessage())[1]) for r in retries]
        assert delays == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]  # doubled, then capped
        # One line per try, and the tries at least that far apart: no tight loop.
        for (before, after), delay in zip(itertools.pairwise(retries), delays, strict=False):
            assert after.created - before.created >= delay

        no_spawned_child_starts.delenv("PYTHONPATH")  # whatever broke it is fixed
        # The line is logged just after health turns ok: wait for the line.
        support.wait_for(
            lambda: any("started after" in r.getMessage() for r in caplog.records),
            60,
            "the loader to start",
        )
        assert loaders.health() is None
        url = photo_server.url("dog.jpg?startup")
        [result] = load_all(loaders, [ImageTask(url=url, upload_id=None, sizes=(MOBILENET,))])
        assert result.error is None
    finally:
        loaders.close()


def test_readyz_reports_a_worker_whose_loaders_cannot_start(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAIL_IN_SPAWNED_CHILDREN)
    database_url = support.create_postgres_database()
    config = support.migrated(
        support.test_config(
            database_url, runtime="null", loader_processes="2", worker_dead_after_s=4
        )
    )
    worker = support.WorkerProcess(
        config, name="noloaders", as_documented=True, env={"PYTHONPATH": str(tmp_path)}
    )
    try:
        worker.start().wait_ready()
        client = create_app(config).test_client()

        def not_ready() -> bool:
            ready = client.get("/readyz")
            return (
                ready.status_code == 503 and "cannot start" in ready.get_json()["checks"]["worker"]
            )

        support.wait_for(not_ready, 60, "/readyz to report the loaders")
        body = client.get("/readyz").get_json()
        assert body["checks"]["worker_heartbeat_age_s"] is not None  # it beats, yet cannot serve
        assert "before it was ready" in worker.log()
    finally:
        worker.stop()
        support.delete_redis_prefix(config.queue_prefix)
        support.drop_postgres_database(database_url)
