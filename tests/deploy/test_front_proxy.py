"""The production front door (deploy/nginx.conf in front of gunicorn) against slow clients.

Issue #23, item 1: without a buffering proxy, gunicorn gives each connection a thread
while it reads the request, with no bound on the time a header or body may take, so
a few dozen clients sending a byte a second left other users without an answer.
Here the real nginx binary runs the repository's deploy/nginx.conf in front of the
real API under gunicorn.conf.py (one process, as few threads as it has), on
PostgreSQL and Redis, and about 200 slow clients, from loopback addresses of their
own, drip headers and bodies while another user's requests must all be answered.
The latency those requests see is measured by bench/slow_clients.py, not here.
"""

from __future__ import annotations

import socket
import time

import pytest
import requests

from api import create_app
from harness import front_proxy
from tests import support

pytestmark = pytest.mark.skipif(
    front_proxy.nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)"
)

HEADER_DRIPS, BODY_DRIPS, STALLED_BODIES = 80, 60, 20
ONE_ADDRESS = 40  # from a single address: past nginx's limit_conn (32 per address)
PER_ADDRESS_LIMIT = 32


@pytest.fixture(scope="module")
def front_door(postgres_url, tmp_path_factory):
    """nginx (deploy/nginx.conf) -> gunicorn (gunicorn.conf.py, one process) -> the API."""
    config = support.migrated(support.test_config(postgres_url))
    workdir = tmp_path_factory.mktemp("front")
    gunicorn_port, nginx_port = _free_port(), _free_port()
    log = workdir / "gunicorn.log"
    try:
        with (
            front_proxy.gunicorn(config, gunicorn_port, log, WEB_CONCURRENCY="1"),
            front_proxy.nginx(nginx_port, f"127.0.0.1:{gunicorn_port}", workdir / "nginx") as base,
        ):
            yield config, base, nginx_port, log
    finally:
        support.delete_redis_prefix(config.queue_prefix)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drippers() -> list[front_proxy.Drip]:
    drips = front_proxy.spread("header", HEADER_DRIPS, per_address=4, first=1)
    drips += front_proxy.spread("body", BODY_DRIPS, per_address=4, first=100)
    drips += front_proxy.spread("stall", STALLED_BODIES, per_address=4, first=200)
    drips += [front_proxy.Drip("body", "127.250.0.1") for _ in range(ONE_ADDRESS)]
    return drips


def _cut_off(outcome: str) -> bool:
    # nginx closes a connection whose header or body timed out; it may first say 408.
    return outcome in ("closed", "answered 408")


def test_slow_clients_hold_nginx_connections_not_the_apis_threads(front_door):
    config, base, port, gunicorn_log = front_door
    client = create_app(config).test_client()
    dripper, other = support.new_user(client), support.new_user(client)
    drips = _drippers()
    timed = [d for d in drips if d.kind in ("header", "stall")]
    flood = [d for d in drips if d.source == "127.250.0.1"]
    spread_bodies = [d for d in drips if d.kind == "body" and d.source != "127.250.0.1"]
    posts_before = gunicorn_log.read_text().count("POST /v1/jobs")
    drippers = front_proxy.Drippers(port, dripper["headers"]["Authorization"], drips).start()
    failures, answered = [], 0
    http = requests.Session()
    try:
        # Another user's requests, for as long as the slow clients take to be cut off.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not all(d.outcome != "open" for d in timed):
            for path in ("/v1/me", "/healthz"):
                try:
                    resp = http.get(base + path, headers=other["headers"], timeout=30)
                    if resp.status_code != 200:
                        failures.append(f"{path} {resp.status_code} {resp.text[:200]}")
                    answered += 1
                except requests.RequestException as exc:
                    failures.append(f"{path} {type(exc).__name__}")
        outcomes = {d.kind: {} for d in drips}
        for d in drips:
            outcomes[d.kind][d.outcome] = outcomes[d.kind].get(d.outcome, 0) + 1
        still_dripping = sum(d.outcome == "open" for d in spread_bodies)
        flood_refused = sum(d.outcome == "answered 429" for d in flood)
        posts = gunicorn_log.read_text().count("POST /v1/jobs") - posts_before
    finally:
        drippers.stop()
    assert failures == [], failures[:10]
    assert answered > 0
    # Headers and stalled bodies were cut off by nginx's timeouts ...
    assert all(_cut_off(d.outcome) for d in timed), outcomes
    # ... a byte-a-second body is still being taken in by nginx (its reads never pause
    # for client_body_timeout), and not one of them reached gunicorn ...
    assert still_dripping == BODY_DRIPS, outcomes
    assert posts == 0
    assert gunicorn_log.read_text().count("GET /v1/me") >= answered // 2  # the log is written
    # ... and one address got no more than limit_conn connections at once.
    assert flood_refused >= ONE_ADDRESS - PER_ADDRESS_LIMIT, outcomes


def test_the_rendered_config_is_the_repositorys_with_test_paths(tmp_path):
    text = front_proxy.render_nginx_conf("127.0.0.1:8080", "127.0.0.1:5000", tmp_path)
    for directive in (
        "client_header_timeout 10s;",
        "client_body_timeout 15s;",
        "proxy_request_buffering on;",
        "limit_conn perip 32;",
        "server 127.0.0.1:5000;",
        "listen 127.0.0.1:8080;",
    ):
        assert directive in text


def test_through_the_proxy_metrics_are_refused_and_nginx_errors_have_the_apis_shape(front_door):
    _, base, port, _ = front_door
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200
    # nginx runs on this machine, but the request came through it: not a local scrape.
    metrics = requests.get(f"{base}/metrics", timeout=30)
    assert metrics.status_code == 403
    assert metrics.json()["error"]["code"] == "metrics_forbidden"
    # A body over client_max_body_size is refused by nginx before it is sent.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 30000000\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"code": "payload_too_large"' in body
