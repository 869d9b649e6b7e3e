"""bench/glue.py, the glue floors bench.bookkeeping measures: its real gunicorn API and
Celery worker, on PostgreSQL and Redis, must answer every waiting client with the job's
result and charge each job once, or its CPU per image is not a floor for the same work;
and the guarded glue's guards must really refuse, or it is the bare glue by another name."""

from __future__ import annotations

import psycopg
import pytest
import requests

from bench import glue
from bench.bookkeeping import CLIENTS, glue_floor
from bench.common import ApiProcess, ServiceStack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

JOBS = 32
LONE = 4


#: The ``schema`` variant's jobs and balances are the service's own, of its glue users.
SERVICE_STATUSES = (
    "SELECT j.status, count(*) FROM jobs j JOIN glue_users g ON g.user_id = j.user_id GROUP BY 1"
)
SERVICE_BALANCES = (
    "SELECT sum(u.tokens), (SELECT sum(l.delta) FROM token_ledger l JOIN glue_users g "
    "ON g.user_id = l.user_id) FROM users u JOIN glue_users g ON g.user_id = u.id"
)


@pytest.mark.parametrize("variant", glue.VARIANTS)
def test_every_waiting_client_gets_its_result_and_each_job_is_charged_once(variant):
    with ServiceStack(worker=False) as stack:
        out = glue_floor(stack, JOBS, variant, lone_count=LONE)
        with psycopg.connect(stack.dsn) as conn:
            if variant == "schema":
                statuses = conn.execute(SERVICE_STATUSES).fetchall()
                left, in_ledger = conn.execute(SERVICE_BALANCES).fetchone()
                assert left == in_ledger  # every charge is in the ledger
                assert conn.execute("SELECT count(*) FROM glue_jobs").fetchone()[0] == 0
            else:
                statuses = conn.execute("SELECT status, count(*) FROM glue_jobs GROUP BY 1")
                statuses = statuses.fetchall()
                left = conn.execute("SELECT sum(tokens) FROM glue_users").fetchone()[0]
    assert (out["images"], out["failed"]) == (JOBS, 0)
    submitted = JOBS + 2 * CLIENTS + LONE  # the measured run, its warm-up, lone requests
    assert statuses == [("succeeded", submitted)]
    assert left == CLIENTS * JOBS - submitted  # each user was funded with JOBS tokens
    assert out["cpu_ms_per_image"]["api"] > 0 and out["cpu_ms_per_image"]["worker"] > 0
    assert out["lone"]["requests"] == LONE and out["lone"]["p50_ms"] > 0
    if variant in ("batching", "schema"):  # every measured job went through a counted batch
        assert out["batches"]["jobs"] == JOBS and 1 <= out["batches"]["batches"] <= JOBS
    else:
        assert out["batches"] == {}


def test_the_guarded_glue_skips_waits_past_the_cap_and_refuses_past_the_rate_limit():
    limits = {"rate_limit_submit": "1/minute", "max_waits_per_user": 0}
    with ServiceStack(worker=False, **limits) as stack:
        [headers] = glue.create_users(stack.db_url, 1, 5)
        api = ApiProcess(stack.config, app="bench.glue:guarded").start()
        try:
            post = [
                requests.post(f"{api.url}/v1/jobs", json={"url": url}, headers=headers, timeout=30)
                for url in stack.urls(2)
            ]
        finally:
            api.stop()
        with psycopg.connect(stack.dsn) as conn:
            jobs = conn.execute("SELECT count(*) FROM glue_jobs").fetchone()[0]
            left = conn.execute("SELECT tokens FROM glue_users").fetchone()[0]
    # No slot to wait in: answered at once, queued, with the cap named.
    assert post[0].status_code == 202
    assert post[0].headers["X-Wait-Skipped"] == "user_limit"
    # The second within the minute: refused before anything is charged or written.
    assert post[1].status_code == 429 and post[1].headers["Retry-After"]
    assert (jobs, left) == (1, 4)
