"""Issue #22 item 5: CPU per image fetch, the project's Fetcher against pooled clients.

A server process of its own (HTTP/1.1, keep-alive) serves the real photos from memory;
this process fetches them one after another, ``--fetches`` times per client, and the
CPU it spends (``time.process_time``: every thread of this process, the fetch
watchdog's included; the server's is not) is divided by the fetches.

Clients:
- ``fetcher``: ``worker.fetch.Fetcher`` as deployed (one urllib3 pool manager, the
  address checked as each connection opens, the watchdog, the cap) with its address
  check on, loopback let through for the local server (production refuses loopback);
- ``fetcher_no_filter``: the same with ``ALLOW_PRIVATE_URLS=1`` (as the tests run it);
- ``session_per_fetch``: the Fetcher before issue #22 item 5, in its costly part: a
  requests-hardened session per fetch (filter on, loopback allowed), a new
  connection each time, the body streamed;
- ``urllib3_pool``: a bare ``urllib3.PoolManager`` (keep-alive), no policy at all;
- ``http_client``: one ``http.client.HTTPConnection`` kept alive, no policy at all.

``python -m bench.fetch_cost [--fetches 300] [--rounds 5]``: per client, the CPU ms per
fetch of each round (the clients take turns), their minimum and median.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import statistics
import subprocess
import sys
import time
from urllib.parse import urlsplit

import urllib3

from bench.common import PHOTOS, loadavg, machine
from harness.serving import LoopbackHTTPServer
from shared.config import Config
from worker.fetch import Fetcher
from worker.http_client import HttpClient


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
    server = LoopbackHTTPServer(("127.0.0.1", 0), _Handler)
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()


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
    fetcher._check.allow_loopback = True  # the local server only
    return fetcher


def _session_per_fetch(config: Config):
    client = HttpClient(config.replace(allow_private_urls=False), timeout_s=10, user_agent="b")
    client._manager.config.ip_filter_allow_loopback_ips = True  # the local server only

    def get(url: str) -> bytes:
        with client.session() as session, session.get(url, stream=True) as response:
            return b"".join(response.raw.stream(64 * 1024, decode_content=True))

    return get


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
    parser.add_argument("--rounds", type=int, default=5)
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
            "session_per_fetch": _session_per_fetch(config),
            "urllib3_pool": lambda url: pool.request("GET", url).data,
            "http_client": _http_client(base),
        }
        results = {}
        for _round in range(args.rounds):  # interleaved: the machine's load drifts
            for name, get in clients.items():
                results.setdefault(name, []).append(_cost(get, urls))
    finally:
        server.terminate()
        server.wait(10)
    report = {
        name: {"min": min(cpu), "median": statistics.median(cpu), "all": cpu}
        for name, runs in results.items()
        for cpu in [[r["cpu_ms"] for r in runs]]
    }
    print(json.dumps({"cpu_ms_per_fetch": report, "fetches": args.fetches,
                      "machine": machine(), "loadavg": loadavg()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
