"""Schemathesis generates requests from our own OpenAPI document: no 5xx, errors in our format.

About 80 generated requests per operation (a few thousand in all), against the real
app on PostgreSQL and Redis, authenticated as a real user.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from api import create_app
from tests import support

EXAMPLES = 80
SYNC_ENDPOINTS = {"/classify", "/predict"}


@pytest.fixture(scope="module")
def fuzz_target(postgres_url):
    # No worker runs here, so the seed's synchronous endpoints wait MAX_WAIT_S, then
    # answer their documented 504 "timeout"; one second keeps that quick.
    config = support.migrated(support.test_config(postgres_url, max_wait_s=1))
    app = create_app(config)
    user = support.new_user(app.test_client())
    yield app, user
    support.delete_redis_prefix(config.queue_prefix)


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_target):
    app, _ = fuzz_target
    return schemathesis.openapi.from_wsgi("/openapi.json", app)


def test_generated_requests_never_break_the_api(fuzz_target, fuzz_schema):
    # Driven through Hypothesis directly: schemathesis' pytest plugin does not run on pytest 9.
    _, user = fuzz_target
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) > 20
    for operation in operations:
        _fuzz(operation, user["headers"]["Authorization"])


def _fuzz(operation, authorization: str) -> None:
    @given(case=operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same requests on every run: a failure reproduces
        database=None,
    )
    def check(case) -> None:
        headers = {**(case.headers or {})}
        headers.setdefault("Authorization", authorization)
        response = case.call(headers=headers)
        where = (case.method, case.formatted_path, response.status_code, response.text[:300])
        documented_timeout = (
            response.status_code == 504
            and case.formatted_path in SYNC_ENDPOINTS
            and response.json()["error"]["code"] == "timeout"
        )
        # No worker runs here, so readiness is rightly 503 (docs/api.md).
        not_ready = case.formatted_path == "/readyz" and response.status_code == 503
        assert response.status_code < 500 or documented_timeout or not_ready, where
        if response.status_code >= 400 and not not_ready:  # readiness answers its checks
            assert set(response.json()["error"]) >= {"code", "message"}, where

    check()
