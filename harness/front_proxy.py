"""The production front door on loopback: nginx (deploy/nginx.conf) in front of gunicorn.

Shared by tests/deploy/test_front_proxy.py and bench/slow_clients.py. nginx is the real
binary with the repository's own configuration; only what must differ on a test machine
is rewritten (``render_nginx_conf``): the listening port, the upstream address, the
worker user and the paths nginx writes to. Every rewrite must find its line, so a
change to deploy/nginx.conf that a rewrite no longer matches fails loudly here.

Slow clients (``drip``) come from loopback addresses other than 127.0.0.1 (the whole of
127.0.0.0/8 is loopback on Linux), so that nginx's per-address connection limit counts
them apart from the well-behaved client.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from harness.services import ROOT
from harness.stack_config import config_env
from harness.waiting import wait_for
from shared.config import Config

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _replace(text: str, old: str, new: str) -> str:
    if old not in text:
        raise AssertionError(f"deploy/nginx.conf no longer contains {old!r}")
    return text.replace(old, new, 1)


def render_nginx_conf(listen: str, upstream: str, workdir: Path) -> str:
    """deploy/nginx.conf on ``listen``, proxying to ``upstream``, writing in ``workdir``."""
    text = NGINX_CONF.read_text()
    text = _replace(text, "user nginx;", f"user {getpass.getuser()};")
    text = _replace(text, "server api:5000;", f"server {upstream};")
    text = _replace(text, "listen 80;", f"listen {listen};")
    text = _replace(
        text, "access_log /var/log/nginx/access.log main;", f"access_log {workdir}/access.log main;"
    )
    temp = "".join(f"    {kind}_temp_path {workdir}/{kind};\n" for kind in TEMP_PATHS)
    return _replace(text, "http {\n", "http {\n" + temp)


@contextlib.contextmanager
def nginx(listen_port: int, upstream: str, workdir: Path) -> Iterator[str]:
    """nginx with deploy/nginx.conf on 127.0.0.1:``listen_port``; yields its base URL."""
    binary = nginx_binary()
    if binary is None:
        raise RuntimeError("nginx is not installed (apt-get install nginx)")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(render_nginx_conf(f"127.0.0.1:{listen_port}", upstream, workdir))
    args = [binary, "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")]
    args += ["-g", f"daemon off; pid {workdir}/nginx.pid;"]
    check = subprocess.run([*args, "-t"], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"nginx -t failed: {check.stderr}")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{listen_port}"
    try:
        wait_for(lambda: _answers(base) or proc.poll() is not None, 30, "nginx to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(workdir / 'error.log').read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()  # SIGTERM: nginx's fast shutdown
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def gunicorn(config: Config, port: int, log_path: Path, **env: str) -> Iterator[str]:
    """The API under ``gunicorn -c gunicorn.conf.py`` on 127.0.0.1:``port``; yields its URL.

    Its access log (one line per request) goes to ``log_path``. ``env``: gunicorn's own
    knobs (WEB_CONCURRENCY, API_THREADS).
    """
    environ = {**os.environ, **config_env(config), "HOST": "127.0.0.1", "PORT": str(port), **env}
    environ.pop("GUNICORN_CMD_ARGS", None)
    environ.setdefault("LOG_LEVEL", "WARNING")
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(base) or proc.poll() is not None, 90, "gunicorn to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {log_path.read_text()[-2000:]}")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _answers(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


# --- slow clients ----------------------------------------------------------------


@dataclass
class Drip:
    """One slow client: what it sends and how it ended."""

    kind: str  # "header": the request header at a byte a second; "body": the body so
    #           (after a whole header); "stall": a header and a little body, then nothing
    source: str  # the loopback address it connects from
    outcome: str = "open"  # "closed" by the server, "answered <status>", or "open" at the end
    sent: int = 0
    connections: int = 0  # made so far (a reconnecting dripper comes back after each cut)


def drip_request(kind: str, authorization: str) -> tuple[bytes, bytes]:
    """(sent at once, sent a byte a second) for a dripper of ``kind``."""
    body = b'{"url": "http://images.example.com/dog.jpg"}' + b" " * 4000
    header = (
        "POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: {authorization}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    if kind == "header":
        return b"", header
    if kind == "body":
        return header, body
    return header + body[:10], b""  # stall


async def _drip(drip: Drip, port: int, authorization: str, stop: asyncio.Event) -> None:
    head, tail = drip_request(drip.kind, authorization)
    drip.outcome, drip.sent = "open", 0
    drip.connections += 1
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(drip.source, 0)
        )
    except OSError as exc:
        drip.outcome = f"refused {type(exc).__name__}"
        return
    try:
        writer.write(head)
        while not stop.is_set():
            try:
                # A second between bytes, or the server's answer or close, whichever first.
                data = await asyncio.wait_for(reader.read(200), timeout=1.0)
            except TimeoutError:
                if drip.sent < len(tail):
                    writer.write(tail[drip.sent : drip.sent + 1])
                    drip.sent += 1
                    await writer.drain()
                continue
            if data:
                drip.outcome = "answered " + data.split(b" ", 2)[1].decode(errors="replace")
            else:
                drip.outcome = "closed"
            return
    except (ConnectionError, OSError):
        drip.outcome = "closed"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Drippers:
    """Slow clients run by an asyncio loop in a thread of their own until ``stop()``."""

    def __init__(
        self, port: int, authorization: str, drips: list[Drip], reconnect: bool = False
    ) -> None:
        """``reconnect``: a dripper that was cut off connects again (an attacker would)."""
        self.port, self.authorization, self.drips = port, authorization, drips
        self.reconnect = reconnect
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = None

    def start(self) -> Drippers:
        ready = threading.Event()

        async def main() -> None:
            self._stop = asyncio.Event()
            ready.set()
            await asyncio.gather(*(self._run(d) for d in self.drips))

        self._thread = threading.Thread(
            target=self._loop.run_until_complete, args=(main(),), daemon=True
        )
        self._thread.start()
        ready.wait(30)
        return self

    async def _run(self, drip: Drip) -> None:
        while True:
            await _drip(drip, self.port, self.authorization, self._stop)
            if not self.reconnect or self._stop.is_set():
                return
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(60)
        self._loop.close()

    def outcomes(self, kind: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.drips:
            if d.kind == kind:
                counts[d.outcome] = counts.get(d.outcome, 0) + 1
        return counts


def spread(kind: str, count: int, per_address: int, first: int = 1) -> list[Drip]:
    """``count`` drippers of ``kind``, ``per_address`` from each of 127.0.<n>.<m>, n >= 1."""
    drips = []
    for i in range(count):
        n = first + i // per_address
        drips.append(Drip(kind, f"127.{1 + n // 250}.{n % 250 + 1}.1"))
    return drips
