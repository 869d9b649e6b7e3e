"""The runtime's metrics: sent by its flush loop once a second, and the rest at close."""

from __future__ import annotations

import redis

from harness.databases import new_prefix
from shared import metrics
from shared.config import Config
from tests import support
from worker.runtime import Runtime


def _runtime() -> Runtime:
    # Only what the metrics use: the config and Redis (no model, database or loader).
    config = Config.from_env({}, redis_url=support.REDIS_URL, queue_prefix=new_prefix())
    client = redis.Redis.from_url(config.redis_url)
    return Runtime(
        config=config,
        sessions=None,  # type: ignore[arg-type]
        redis=client,
        uploads=None,  # type: ignore[arg-type]
        models=None,  # type: ignore[arg-type]
        io_pool=None,  # type: ignore[arg-type]
        celery=None,  # type: ignore[arg-type]
        loader=None,  # type: ignore[arg-type]
    )


def _finished(rt: Runtime) -> float:
    return metrics.read(rt.redis, rt.config)["jobs_finished"].get("status=succeeded|count", 0)


def test_close_sends_what_the_batches_recorded_since_the_last_flush():
    rt = _runtime()
    batch = metrics.MetricsBuffer()
    batch.inc("jobs_finished", 3, status="succeeded")
    rt.metrics.merge(batch)
    assert _finished(rt) == 0  # merged, not sent: no round trip per batch
    rt.close()
    assert rt.stopping.is_set()
    assert _finished(rt) == 3


def test_the_flush_loop_sends_within_its_interval():
    rt = _runtime()
    loop = rt.start_metrics_loop()
    batch = metrics.MetricsBuffer()
    batch.inc("jobs_finished", 2, status="succeeded")
    rt.metrics.merge(batch)
    support.wait_for(lambda: _finished(rt) == 2, 10, "the flush loop to send the batch's metrics")
    rt.close()
    assert loop.join(5)
