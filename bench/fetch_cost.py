"""Issue #22 item 5: CPU per image fetch, the project's Fetcher against pooled clients.

A server process of its own (HTTP/1.1, keep-alive) serves the real photos from memory;
this process fetches them one after another, ``--fetches`` times per client, and the
CPU it spends (``time.process_time``: every thread of this process, the fetch
watchdog's included; the server's is not) is divided by the fetches.

Clients:
- ``fetcher``: ``worker.fetch.Fetcher`` as deployed (a requests-hardened session per
  fetch, so a new connection each time) with its address filter on, loopback let
  through for the local server (production checks the same way, refusing loopback);
- ``fetcher_no_filter``: the same with ``ALLOW_PRIVATE_URLS=1`` (as the tests run it);
- ``urllib3_pool``: a bare ``urllib3.PoolManager`` (keep-alive), no policy at all;
- ``http_client``: one ``http.client.HTTPConnection`` kept alive, no policy at all;
- ``candidate``: ``PooledFetcher`` below, a prototype of the switch: one urllib3
  ``PoolManager`` per process (keep-alive per host), the address check at connect
  time (requests-hardened's ``get_ip_address``: resolve, refuse, connect to the
  address checked), the same wall-clock watchdog and body cap as ``Fetcher``.

``python -m bench.fetch_cost [--fetches 300]``
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import subprocess
import sys
import time
from urllib.parse import urlsplit

import urllib3
from requests_hardened.ip_filter import get_ip_address
from urllib3.connection import HTTPConnection
from urllib3.connectionpool import HTTPConnectionPool

from bench.common import PHOTOS, loadavg, machine
from shared import ssrf
from shared.config import Config
from worker import fetch
from worker.fetch import Fetcher


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    photos: dict[str, bytes] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = self.photos.get(urlsplit(self.path).path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve() -> None:
    _Handler.photos = {p.name: p.read_bytes() for p in PHOTOS.iterdir() if p.is_file()}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


# --- the candidate ------------------------------------------------------------------


class _CheckedConnection(fetch._Guarded, HTTPConnection):
    """Resolves the host, refuses a blocked address, and connects to the one it checked."""

    allow_loopback = True  # the bench's server is local; production: False

    def _new_conn(self):
        ip, _port = get_ip_address(self.host, self.port, allow_loopback=self.allow_loopback)
        self._dns_host = str(ip)
        return super()._new_conn()

    def request(self, *args, **kwargs):
        # A kept-alive socket joins this fetch's guard too (a new one joins in _new_conn).
        guard = getattr(fetch._current, "guard", None)
        if guard is not None and self.sock is not None:
            guard.add(self.sock)
        return super().request(*args, **kwargs)


class _CheckedPool(HTTPConnectionPool):
    ConnectionCls = _CheckedConnection


class PooledFetcher:
    """The prototype: same deadline and cap as Fetcher, on one keep-alive pool manager."""

    def __init__(self, config: Config) -> None:
        ssrf.install()
        self._max_bytes = config.max_image_bytes
        self._timeout_s = config.fetch_timeout_s
        self._pools = urllib3.PoolManager(maxsize=config.fetch_threads, retries=False)
        self._pools.pool_classes_by_scheme = {"http": _CheckedPool}

    def fetch(self, url: str) -> bytes:
        guard = fetch._watchdog.watch(time.monotonic() + self._timeout_s)
        fetch._current.guard = guard
        try:
            response = self._pools.urlopen(
                "GET",
                url,
                redirect=False,
                preload_content=False,
                timeout=urllib3.Timeout(connect=self._timeout_s, read=self._timeout_s),
                headers={"User-Agent": fetch.USER_AGENT, "Accept": fetch._ACCEPT},
            )
            body = bytearray()
            while chunk := response.read1(fetch._CHUNK):
                body += chunk
                if len(body) > self._max_bytes:
                    response.close()
                    raise ValueError("too large")
            response.release_conn()
            return bytes(body)
        finally:
            guard.finish()
            fetch._current.guard = None


# --- the measurement ----------------------------------------------------------------


def _http_client(base: str):
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port)

    def get(url: str) -> bytes:
        conn.request("GET", urlsplit(url).path)
        return conn.getresponse().read()

    return get


def _filtered_fetcher(config: Config) -> Fetcher:
    fetcher = Fetcher(config.replace(allow_private_urls=False))
    manager = fetcher._client._manager
    manager.config.ip_filter_allow_loopback_ips = True  # the local server only
    return fetcher


def _cost(get, urls: list[str]) -> dict:
    for url in urls[:10]:
        get(url)  # warm: imports, first connection
    cpu, wall = time.process_time(), time.perf_counter()
    size = sum(len(get(url)) for url in urls)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    n = len(urls)
    return {"cpu_ms": round(1000 * cpu / n, 3), "wall_ms": round(1000 * wall / n, 3), "bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fetches", type=int, default=300)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.fetch_cost", "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        base = server.stdout.readline().strip()
        names = sorted(p.name for p in PHOTOS.iterdir() if p.is_file())
        urls = [f"{base}/{names[i % len(names)]}" for i in range(args.fetches)]
        config = Config.from_env({}, allow_private_urls=True)
        pool = urllib3.PoolManager()
        clients = {
            "fetcher": _filtered_fetcher(config).fetch,
            "fetcher_no_filter": Fetcher(config).fetch,
            "urllib3_pool": lambda url: pool.request("GET", url).data,
            "http_client": _http_client(base),
            "candidate": PooledFetcher(config).fetch,
        }
        results = {}
        for _round in range(2):  # interleaved twice: the machine's load drifts
            for name, get in clients.items():
                results.setdefault(name, []).append(_cost(get, urls))
    finally:
        server.terminate()
        server.wait(10)
    report = {name: [r["cpu_ms"] for r in runs] for name, runs in results.items()}
    print(json.dumps({"cpu_ms_per_fetch": report, "fetches": args.fetches,
                      "machine": machine(), "loadavg": loadavg()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
