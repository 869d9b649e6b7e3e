"""bench.latency's open-loop client follows a skipped wait as client/ does: it comes back
after the Retry-After with ``?wait=60`` until the job ends, instead of counting the
skipped wait's 202 as a failure. Checked against a real HTTP server that answers as
the API does past its wait caps."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import requests

from bench.latency import _answer


class _CappedApi(http.server.BaseHTTPRequestHandler):
    """POST /v1/jobs: the wait is skipped (202, X-Wait-Skipped, Retry-After: 1). The
    first poll finds the job still processing, the second finds it succeeded."""

    seen: list[tuple[str, str, dict, float]] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _answer(self, status: int, job: dict, headers: dict[str, str]) -> None:
        body = json.dumps(job).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.seen.append(("POST", self.path, dict(self.headers), time.monotonic()))
        assert json.loads(self.rfile.read(length)) == {"url": "http://photos.example/a.jpg"}
        skipped = {"X-Wait-Skipped": "user_limit", "Retry-After": "1"}
        self._answer(202, {"id": "j1", "status": "queued"}, skipped)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, dict(self.headers), time.monotonic()))
        polls = sum(1 for method, *_ in self.seen if method == "GET")
        status = "processing" if polls == 1 else "succeeded"
        self._answer(200, {"id": "j1", "status": status}, {})


@contextmanager
def _server() -> Iterator[str]:
    _CappedApi.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CappedApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_skipped_wait_is_polled_after_its_retry_after_until_the_job_ends():
    headers = {"Authorization": "Bearer k"}
    with _server() as base, requests.Session() as session:
        job, polls = _answer(session, base, headers, "http://photos.example/a.jpg")
    assert job == {"id": "j1", "status": "succeeded"} and polls == 2
    (post, first, second) = _CappedApi.seen
    assert post[:2] == ("POST", "/v1/jobs") and post[2]["Prefer"] == "wait=60"
    assert first[:2] == second[:2] == ("GET", "/v1/jobs/j1?wait=60")
    assert all(request[2]["Authorization"] == "Bearer k" for request in _CappedApi.seen)
    # The first poll waited out the Retry-After; the second, after an answer whose wait
    # was not skipped, did not.
    assert first[3] - post[3] >= 1.0
