"""Clients that hold the API's resources: a request body that arrives at a trickle.

Checked on a real threaded server on loopback, the real database (SQLite and
PostgreSQL) and Redis: while one user's upload drips, no transaction is open, and
other users' requests, writes included, are answered.
"""

from __future__ import annotations

import io
import socket
import threading

import flask
import pytest
import requests
from werkzeug.serving import make_server

from api import create_app
from tests import support


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
