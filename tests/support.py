"""Real processes and servers for integration tests: databases, a photo server, a worker."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.server
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import psycopg
import redis
from sqlalchemy.engine import make_url
from werkzeug.serving import make_server

from shared import migrate
from shared.config import Config
from shared.queue import bulk_queue, interactive_queue, webhook_queue

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = Path(os.environ.get("TEST_OUTPUT_DIR", ROOT / "test-output"))
POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
WORKER_START_TIMEOUT_S = 120
SLOW_S = 1.5
GATE_MAX_S = 600


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- databases ----------------------------------------------------------------


def _admin_dsn() -> str:
    return make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql").render_as_string(False)


# Everything this test process created outside its temporary folders, so that the
# session's end (tests/conftest.py) removes what a test's own clean-up missed.
_CREATED_DATABASES: set[str] = set()
_CREATED_PREFIXES: set[str] = set()


def create_postgres_database() -> str:
    name = f"imgclf_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    _CREATED_DATABASES.add(name)
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(False)


def drop_postgres_database(url: str) -> None:
    _drop_database(make_url(url).database)


def _drop_database(name: str) -> None:
    with psycopg.connect(_admin_dsn(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrated(config: Config) -> Config:
    migrate.upgrade(config)
    return config


def new_prefix(kind: str = "test") -> str:
    """A fresh QUEUE_PREFIX, removed from Redis when the test session ends."""
    prefix = f"imgclf-{kind}-{uuid.uuid4().hex[:8]}"
    _CREATED_PREFIXES.add(prefix)
    return prefix


def delete_redis_prefix(prefix: str) -> None:
    """The prefix's queues and keys, and kombu's bindings of its queues (named after them)."""
    client = redis.Redis.from_url(REDIS_URL)
    for pattern in (prefix, f"_kombu.binding.{prefix}", f"_kombu.binding_permanent.{prefix}"):
        for key in client.scan_iter(f"{pattern}*", count=1000):
            client.delete(key)


def clean_up_session() -> None:
    """Remove every prefix and scratch database this process created (end of the session)."""
    try:
        for prefix in _CREATED_PREFIXES:
            delete_redis_prefix(prefix)
        for name in _CREATED_DATABASES:
            _drop_database(name)
    except (redis.RedisError, psycopg.Error) as exc:  # a service a fault test left down
        print(f"test clean-up incomplete: {exc!r}")


def delete_rabbitmq_queues(config: Config) -> None:
    """Drop a test's queues (and their exchanges) from the shared RabbitMQ."""
    from kombu import Connection

    names = [interactive_queue(config), bulk_queue(config), webhook_queue(config)]
    with Connection(config.effective_broker_url, connect_timeout=5) as conn:
        for name in names:
            channel = conn.channel()
            try:
                channel.queue_delete(name)
                channel.exchange_delete(name)
            except conn.channel_errors:
                pass  # never declared
            finally:
                with contextlib.suppress(Exception):
                    channel.close()


# --- configuration -------------------------------------------------------------


def test_config(database_url: str, **overrides) -> Config:
    values = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "queue_prefix": new_prefix(),
        "allow_private_urls": True,
        "bcrypt_rounds": 4,
        "max_wait_s": 60,
        # Tests submit in bursts; test_ratelimit.py checks the limits themselves.
        "rate_limit_submit": "10000/second",
        "signup_limit_per_ip": "100000/second",
        # Webhook retries in tests: the production schedule's shape, in seconds, not hours.
        "webhook_backoff_s": ("0", "0.5", "1", "2"),
        "webhook_timeout_s": 2.0,
    }
    values.update(overrides)
    _CREATED_PREFIXES.add(values["queue_prefix"])
    return Config.from_env({}, **values)


def config_env(config: Config) -> dict[str, str]:
    """The environment variables that reproduce ``config`` in another process."""
    env = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool):
            value = "1" if value else "0"
        elif isinstance(value, tuple):
            value = ",".join(value)
        env[f.name.upper()] = str(value)
    return env


# --- a local HTTP server for the real photos ------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares huge dimensions: a decompression bomb's signature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def jpeg_segment_flood(segments: int) -> bytes:
    """A JPEG start followed by ``segments`` empty APP0 segments (issue #14: 4.8 million)."""
    return b"\xff\xd8" + b"\xff\xe0\x00\x02" * segments + b"\xff\xd9"


def png_chunk_flood(chunks: int, kind: bytes = b"abCd") -> bytes:
    """An 8x8 grey PNG with ``chunks`` empty chunks before its image (issue #14: 1.6 million)."""
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 9 * 8)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(kind, b"") * chunks
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_16bit_grey(side: int, level: int = 0x8000) -> bytes:
    """A side x side 16-bit grey PNG of one level: 6300 x 6300 compresses to about 77 KB.

    Built a row at a time with zlib, so making it costs no full-size buffer.
    """
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\x00" + struct.pack(">H", level) * side
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", body)
        + png_chunk(b"IEND", b"")
    )


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    hits: list[str]
    gates: dict[str, threading.Event]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_S)
            self.path = self.path[len("/slow") :]
        elif self.path.startswith("/gate/"):
            _, _, key, rest = self.path.split("/", 3)
            self.gates.setdefault(key, threading.Event()).wait(GATE_MAX_S)
            self.path = f"/{rest}"
        elif self.path.startswith("/down/"):
            _, _, key, rest = self.path.split("/", 3)
            if not self.gates.setdefault(key, threading.Event()).is_set():
                self.send_error(503, "down for a while")
                return
            self.path = f"/{rest}"
        super().do_GET()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client killed mid-download (a test's SIGKILL) is expected, not noise.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class PhotoServer:
    """Serves ``directory`` on 127.0.0.1 and records every requested path in ``hits``.

    ``/slow/<name>`` serves ``<name>`` after SLOW_S seconds: a batch that is still in
    flight when a test injects a fault. ``/gate/<key>/<name>`` serves it once the test
    opens ``gate(key)``: a batch held in flight for as long as the test needs.
    ``/down/<key>/<name>`` answers 503 until the test opens ``gate(key)``, then serves
    ``<name>``: a host that fails for a while, for retries.
    """

    def __init__(self, directory: Path) -> None:
        self.hits: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        handler_class = type("Handler", (QuietHandler,), {"hits": self.hits, "gates": self.gates})
        handler = functools.partial(handler_class, directory=str(directory))
        self.httpd = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def gate(self, key: str) -> threading.Event:
        """The gate of ``/gate/<key>/...`` URLs: closed until the test sets it."""
        return self.gates.setdefault(key, threading.Event())

    def __enter__(self) -> PhotoServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for gate in list(self.gates.values()):
            gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# --- a real Celery worker process ------------------------------------------------


class WorkerProcess:
    """``celery -A worker.celery_app worker`` in a subprocess, configured by ``config``."""

    app_module = "worker.celery_app"
    ready_hash = "workers:ready"

    def __init__(self, config: Config, name: str = "w1") -> None:
        self.config = config
        self.name = name
        self.proc: subprocess.Popen | None = None
        OUTPUT.mkdir(parents=True, exist_ok=True)
        self.log_path = OUTPUT / f"{name}-{config.queue_prefix}.log"

    def pool_args(self) -> list[str]:
        return []  # WORKER_POOL and WORKER_CONCURRENCY from the config, as in production

    def start(self) -> WorkerProcess:
        env = {**os.environ, **config_env(self.config), "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable, "-m", "celery", "-A", self.app_module, "worker", *self.pool_args(),
            "--hostname", f"{self.name}-{self.config.queue_prefix}@%h", "--loglevel", "INFO",
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        # Its own process group, so a test can kill the worker with its pool processes.
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes at once: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def ready_count(self) -> int:
        client = redis.Redis.from_url(self.config.redis_url)
        return client.hlen(f"{self.config.queue_prefix}:{self.ready_hash}")

    def wait_ready(self, before: int = 0) -> WorkerProcess:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}): {self.log_tail()}")
            return self.ready_count() > before

        wait_for(ready, WORKER_START_TIMEOUT_S, f"{self.name} to be ready", interval=0.1)
        return self

    def stop(self, timeout: float = 40) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, n: int = 4000) -> str:
        return self.log()[-n:]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class WebhookWorkerProcess(WorkerProcess):
    """``celery -A worker.webhook_app worker --pool threads``: the webhook deliverer."""

    app_module = "worker.webhook_app"
    ready_hash = "webhook-workers:ready"

    def __init__(self, config: Config, name: str = "webhooks", concurrency: int = 4) -> None:
        super().__init__(config, name)
        self.concurrency = concurrency

    def pool_args(self) -> list[str]:
        return [
            "--pool",
            "threads",
            "--concurrency",
            str(self.concurrency),
            "-Q",
            webhook_queue(self.config),
        ]


def basic_auth(username: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def new_user(client) -> dict:
    """Sign up a fresh user through the API; returns credentials and ready auth headers."""
    username = f"u{uuid.uuid4().hex[:12]}"
    password = "correct-horse"
    resp = client.post("/v1/users", json={"username": username, "password": password})
    assert resp.status_code == 201, resp.get_json()
    key = resp.get_json()["api_key"]
    return {
        "username": username,
        "password": password,
        "key": key,
        "headers": bearer(key),
        "basic": basic_auth(username, password),
    }


def make_admin(app) -> dict:
    """An administrator made the documented way: ``flask --app api create-admin``."""
    username = f"admin{uuid.uuid4().hex[:8]}"
    result = app.test_cli_runner().invoke(
        args=["create-admin", username, "--password", "admin-secret"]
    )
    assert result.exit_code == 0, result.output
    key = result.output.strip().rsplit(" ", 1)[-1]
    return {"username": username, "password": "admin-secret", "headers": bearer(key)}


@contextlib.contextmanager
def serving(app):
    """The API app served on 127.0.0.1 by a real HTTP server, as a client would see it."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
