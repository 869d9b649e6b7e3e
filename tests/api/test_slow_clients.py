"""Clients that hold the API's resources: a body that arrives at a trickle, many long-polls.

Checked on a real threaded server on loopback, the real database (SQLite and
PostgreSQL) and Redis, with no worker (jobs stay queued, so a wait lasts until it
is cancelled): while one user's upload drips, no transaction is open and other
users' requests, writes included, are answered; a user's waits past the cap are
answered at once.
"""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import flask
import pytest
import redis
import requests
from sqlalchemy import select
from werkzeug.serving import make_server

from api import create_app
from api.services import services
from api.waits import (
    PROCESS_LIMIT,
    SKIPPED_HEADER,
    SKIPPED_RETRY_AFTER_S,
    USER_LIMIT,
    WaitSlots,
)
from client.api import Client
from shared.models import User
from tests import support

URL = "http://images.example.com/dog.jpg"


def _in_transaction() -> bool:
    session = flask.g.get("db")
    return session is not None and session.in_transaction()


class _Watch:
    """Records, at a body's first read, whether the request's transaction is open."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self.reading = threading.Event()

    def first_read(self) -> None:
        if not self.seen:
            self.seen.append(_in_transaction())
            self.reading.set()


class _WatchedBytes(io.BytesIO):
    """An in-memory body (the test client needs one it can seek) that a _Watch sees read."""

    def __init__(self, data: bytes, watch: _Watch) -> None:
        super().__init__(data)
        self.watch = watch

    def read(self, size: int | None = -1) -> bytes:
        self.watch.first_read()
        return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        self.watch.first_read()
        return super().read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        self.watch.first_read()
        return super().readline(size)

    def readinto(self, buffer) -> int:
        self.watch.first_read()
        return super().readinto(buffer)


class _WatchedStream:
    """A server's ``wsgi.input`` that a _Watch sees read."""

    def __init__(self, inner, watch: _Watch) -> None:
        self._inner, self.watch = inner, watch

    def read(self, *args) -> bytes:
        self.watch.first_read()
        return self._inner.read(*args)

    def readline(self, *args) -> bytes:
        self.watch.first_read()
        return self._inner.readline(*args)


def _multipart(photo: bytes, filename: str = "cat.bmp") -> tuple[bytes, str]:
    prepared = requests.Request("POST", "http://x/", files={"file": (filename, photo)}).prepare()
    return prepared.body, prepared.headers["Content-Type"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/predict"])
def test_authentication_ends_its_transaction_before_the_body_is_read(api_stack, photos_dir, path):
    # No worker runs: /predict answers at once (504) instead of waiting for one.
    client = create_app(api_stack.config, max_wait_s=0).test_client()
    user = support.new_user(client)
    body, content_type = _multipart((photos_dir / "cat.bmp").read_bytes())
    # A key used a moment ago: authenticating it writes nothing (last_used_at is recent).
    assert client.get("/v1/me", headers=user["headers"]).status_code == 200
    watch = _Watch()
    client.post(
        path,
        input_stream=_WatchedBytes(body, watch),
        content_type=content_type,
        headers=user["headers"],
    )
    assert watch.seen == [False]


class _SignalBodyRead:
    """WSGI middleware: watches the body of requests marked ``X-Drip``."""

    def __init__(self, app) -> None:
        self.app = app
        self.watch = _Watch()

    def __call__(self, environ, start_response):
        if environ.get("HTTP_X_DRIP"):
            environ["wsgi.input"] = _WatchedStream(environ["wsgi.input"], self.watch)
        return self.app(environ, start_response)


def test_a_dripping_upload_blocks_no_other_user(api_stack, photos_dir):
    app = create_app(api_stack.config)
    app.wsgi_app = middleware = _SignalBodyRead(app.wsgi_app)
    watch = middleware.watch
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    dripper, other = support.new_user(app.test_client()), support.new_user(app.test_client())
    assert requests.get(f"{base}/v1/me", headers=dripper["headers"], timeout=30).ok
    body, content_type = _multipart((photos_dir / "cat.bmp").read_bytes())
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: 1\r\n"
        f"Authorization: {dripper['headers']['Authorization']}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection(("127.0.0.1", server.server_port), timeout=60)
    try:
        sock.sendall(head + body[:100])  # ... and the rest much later
        assert watch.reading.wait(30), "the server never started reading the upload"
        # Another user's write and read, while the upload is still incomplete. With the
        # write lock held, SQLite made them wait its 30 s busy timeout and then 503;
        # 20 s is far beyond a normal answer and below that.
        key = requests.post(f"{base}/v1/keys", json={}, headers=other["headers"], timeout=20)
        assert key.status_code == 201, key.text
        me = requests.get(f"{base}/v1/me", headers=other["headers"], timeout=20)
        assert me.status_code == 200, me.text
        assert watch.seen == [False]
        sock.sendall(body[100:])
        answer = sock.recv(65536).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 202"), answer[:500]
    finally:
        sock.close()
        server.shutdown()


@contextmanager
def _serving(app) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def _user_id(app, username: str) -> int:
    with app.app_context(), services().sessions() as session:
        return session.scalars(select(User.id).where(User.username == username)).one()


def _wait_count(config, user_id: int) -> int:
    return redis.Redis.from_url(config.redis_url).zcard(f"{config.queue_prefix}:waits:{user_id}")


def test_waits_past_the_per_user_cap_are_answered_at_once(api_stack):
    config = api_stack.config.replace(max_waits_per_user=3)
    app = create_app(config)
    client = app.test_client()
    holder, other = support.new_user(client), support.new_user(client)
    holder_id = _user_id(app, holder["username"])
    job = client.post("/v1/jobs", json={"url": URL}, headers=holder["headers"]).get_json()
    poll = f"/v1/jobs/{job['id']}?wait=60"
    with _serving(app) as base, ThreadPoolExecutor(3) as pool:
        held = [
            pool.submit(requests.get, base + poll, headers=holder["headers"], timeout=90)
            for _ in range(3)
        ]
        support.wait_for(lambda: _wait_count(config, holder_id) == 3, 30, "3 waits held")
        # A fourth wait of the same user: answered without waiting (a wait would last
        # 60 s here, so 20 s of patience tells the two apart on any machine).
        extra = requests.get(base + poll, headers=holder["headers"], timeout=20)
        assert extra.status_code == 200 and extra.json()["status"] == "queued"
        assert extra.headers[SKIPPED_HEADER] == USER_LIMIT
        # With a hint when to poll again: at once would only be refused again at once.
        assert extra.headers["Retry-After"] == str(SKIPPED_RETRY_AFTER_S)
        prefer = {**holder["headers"], "Prefer": "wait=60"}
        submitted = requests.post(f"{base}/v1/jobs", json={"url": URL}, headers=prefer, timeout=20)
        assert submitted.status_code == 202 and submitted.headers[SKIPPED_HEADER] == USER_LIMIT
        assert submitted.headers["Retry-After"] == str(SKIPPED_RETRY_AFTER_S)
        # The CLI's client honours it: its next poll waits first, a plain read does not.
        pauses: list[float] = []
        api = Client(base, holder["key"], sleep=pauses.append)
        assert api.get_job(job["id"], wait_s=60)["status"] == "queued" and pauses == []
        api.get_job(job["id"])
        assert pauses == []
        assert api.get_job(job["id"], wait_s=60)["status"] == "queued"
        assert len(pauses) == 1 and 0 < pauses[0] <= SKIPPED_RETRY_AFTER_S
        assert "Preference-Applied" not in submitted.headers
        # The seed endpoint could not wait for its answer: refused, nothing charged.
        tokens = client.get("/v1/me", headers=holder["headers"]).get_json()["tokens"]
        seed = requests.post(
            f"{base}/classify",
            json={"username": holder["username"], "password": holder["password"], "url": URL},
            timeout=20,
        )
        assert seed.status_code == 429 and seed.json()["error"]["code"] == "too_many_waits"
        assert client.get("/v1/me", headers=holder["headers"]).get_json()["tokens"] == tokens
        # Other users are not counted against this one.
        assert requests.get(f"{base}/v1/me", headers=other["headers"], timeout=20).ok
        mine = client.post("/v1/jobs", json={"url": URL}, headers=other["headers"]).get_json()
        waited = requests.get(
            f"{base}/v1/jobs/{mine['id']}?wait=1", headers=other["headers"], timeout=20
        )
        assert waited.status_code == 200 and SKIPPED_HEADER not in waited.headers
        # Cancelling the job ends the held waits, and frees their slots.
        client.post(f"/v1/jobs/{job['id']}/cancel", headers=holder["headers"])
        assert [f.result().json()["status"] for f in held] == ["canceled"] * 3
    assert _wait_count(config, holder_id) == 0


def _slots_config(**caps):
    # WaitSlots needs Redis only: one run, not one per database.
    return support.test_config("sqlite://", **caps)


def test_the_per_process_cap_leaves_threads_for_other_requests():
    config = _slots_config(max_waits_per_process=2)
    slots = WaitSlots(redis.Redis.from_url(config.redis_url), config)
    with slots.hold(1, 60) as first, slots.hold(2, 60) as second:
        assert first is None and second is None
        with slots.hold(3, 60) as third:
            assert third == PROCESS_LIMIT
            assert _wait_count(config, 3) == 0  # a refused wait holds no user slot
    with slots.hold(3, 60) as again:
        assert again is None


def test_the_per_user_cap_counts_across_processes_and_frees_abandoned_slots():
    config = _slots_config(max_waits_per_user=1)
    client = redis.Redis.from_url(config.redis_url)
    one, two = WaitSlots(client, config), WaitSlots(client, config)  # two API processes
    with one.hold(7, 60) as first, two.hold(7, 60) as second:
        assert (first, second) == (None, USER_LIMIT)
    # A process killed mid-wait never gives its slot back: its deadline frees it.
    abandoned = one.hold(8, 0)
    assert abandoned.__enter__() is None
    with two.hold(8, 60) as refused:
        assert refused == USER_LIMIT

    def free() -> bool:
        with two.hold(8, 60) as skipped:
            return skipped is None

    support.wait_for(free, 30, "the abandoned slot to expire", interval=0.5)
