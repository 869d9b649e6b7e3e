"""bench.latency's open-loop client follows a skipped wait as client/ does: it comes back
after the Retry-After with ``?wait=60`` until the job ends, instead of counting the
skipped wait's 202 as a failure. Checked against a real HTTP server that answers as
the API does past its wait caps."""

from __future__ import annotations

import time

import requests
from flask import Flask, jsonify, request

from bench.latency import _answer
from harness.serving import serving


def _capped_api(seen: list[tuple[str, str, dict, float]]) -> Flask:
    """POST /v1/jobs: the wait is skipped (202, X-Wait-Skipped, Retry-After: 1). The
    first poll finds the job still processing, the second finds it succeeded."""
    app = Flask(__name__)

    def note() -> None:
        seen.append((request.method, request.full_path, dict(request.headers), time.monotonic()))

    @app.post("/v1/jobs")
    def create():
        note()
        assert request.get_json() == {"url": "http://photos.example/a.jpg"}
        skipped = {"X-Wait-Skipped": "user_limit", "Retry-After": "1"}
        return jsonify(id="j1", status="queued"), 202, skipped

    @app.get("/v1/jobs/<job_id>")
    def get(job_id: str):
        note()
        polls = sum(1 for method, *_ in seen if method == "GET")
        return jsonify(id=job_id, status="processing" if polls == 1 else "succeeded")

    return app


def test_a_skipped_wait_is_polled_after_its_retry_after_until_the_job_ends():
    seen: list[tuple[str, str, dict, float]] = []
    headers = {"Authorization": "Bearer k"}
    with serving(_capped_api(seen)) as base, requests.Session() as session:
        job, polls = _answer(session, base, headers, "http://photos.example/a.jpg")
    assert job == {"id": "j1", "status": "succeeded"} and polls == 2
    (post, first, second) = seen
    assert post[:2] == ("POST", "/v1/jobs?") and post[2]["Prefer"] == "wait=60"
    assert first[:2] == second[:2] == ("GET", "/v1/jobs/j1?wait=60")
    assert all(r[2]["Authorization"] == "Bearer k" for r in seen)
    # The first poll waited out the Retry-After; the second, after an answer whose wait
    # was not skipped, did not need to.
    assert first[3] - post[3] >= 1.0
