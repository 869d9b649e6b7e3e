"""bench/glue.py, the glue floor bench.bookkeeping measures: its real gunicorn API and
Celery worker, on PostgreSQL and Redis, must answer every waiting client with the job's
result and charge each job once, or its CPU per image is not a floor for the same work."""

from __future__ import annotations

import psycopg
import pytest

from bench.bookkeeping import CLIENTS, glue_floor
from bench.common import ServiceStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOBS = 32


def test_every_waiting_client_gets_its_result_and_each_job_is_charged_once():
    with ServiceStack(worker=False) as stack:
        out = glue_floor(stack, JOBS)
        with psycopg.connect(stack.dsn) as conn:
            statuses = conn.execute("SELECT status, count(*) FROM glue_jobs GROUP BY 1").fetchall()
            left = conn.execute("SELECT sum(tokens) FROM glue_users").fetchone()[0]
    assert (out["images"], out["failed"]) == (JOBS, 0)
    submitted = JOBS + 2 * CLIENTS  # the measured run and its warm-up
    assert statuses == [("succeeded", submitted)]
    assert left == CLIENTS * JOBS - submitted  # each user was funded with JOBS tokens
    assert out["cpu_ms_per_image"]["api"] > 0 and out["cpu_ms_per_image"]["worker"] > 0
