"""worker.fetch against a real HTTP server on 127.0.0.1.

Private addresses must be allowed to reach the test server at all, so the
download behaviour is tested with ``allow_private_urls=True`` and the address
filter with it off. A redirect from a public host to a private one needs a
public server; the fetcher checks the address as every connection opens, which
is what ``test_every_redirect_hop_is_filtered`` shows by letting loopback through
and redirecting to the metadata address (kept alive too: the last tests).
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from harness.serving import LoopbackHTTPServer
from shared.config import Config
from shared.errors import BlockedAddress, FetchFailed, ImageTooLarge
from worker.fetch import USER_AGENT, Fetcher

SMALL_LIMIT = 100_000
FLOOD_CAP = 256 * 1024 * 1024  # what a flooding handler would send if nobody stopped it


class Handler(BaseHTTPRequestHandler):
    photo = b""
    user_agents: list[str] = []
    flooded: dict[str, int] = {}
    flood_done = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        type(self).user_agents.append(self.headers.get("User-Agent", ""))
        path = self.path
        if path == "/photo":
            self._reply(200, self.photo)
        elif path.startswith("/redirect/"):
            hops = int(path.rsplit("/", 1)[1])  # redirects still to come
            self._redirect(f"/redirect/{hops - 1}" if hops > 1 else "/photo")
        elif path.startswith("/absolute-redirect"):
            self._redirect(f"http://127.0.0.1:{self.server.server_port}/photo")
        elif path == "/to-file":
            self._redirect("file:///etc/passwd")
        elif path == "/to-ftp":
            self._redirect(f"ftp://127.0.0.1:{self.server.server_port}/photo")
        elif path == "/to-metadata":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif path == "/big-declared":
            self._flood(path, declared=FLOOD_CAP)
        elif path == "/endless":
            self._flood(path, declared=None)
        elif path == "/gzip-bomb":
            body = gzip.compress(b"\0" * (20 * SMALL_LIMIT))
            self._reply(200, body, {"Content-Encoding": "gzip"})
        elif path in ("/drip", "/stall", "/late-stall"):
            self._slow(path)
        elif path == "/drip-headers":
            self._drip_headers()
        else:
            self._reply(404, b"not here")

    def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/jpeg")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _flood(self, path: str, declared: int | None) -> None:
        self.send_response(200)
        if declared is not None:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        sent, chunk = 0, b"\0" * 65536
        try:
            while sent < FLOOD_CAP:
                self.wfile.write(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the client hung up, which is the point
        finally:
            type(self).flooded[path] = sent
            type(self).flood_done.set()

    def _slow(self, path: str) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            if path == "/late-stall":  # one byte shortly before the deadline, then silence
                time.sleep(0.7)
                self.wfile.write(b"x")
            if path != "/drip":
                time.sleep(3)
            for _ in range(100):
                self.wfile.write(b"x")
                time.sleep(0.2)
        except OSError:
            pass

    def _drip_headers(self) -> None:
        # Issue #14 item 2: every byte comes before any read timeout, so only a
        # wall-clock deadline ends it (a minute of headers if nobody hangs up).
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Pad: " + b"x" * 120
        try:
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.5)
        except OSError:
            pass  # the client hung up, which is the point


@pytest.fixture(scope="module")
def server(photos_dir: Path) -> Iterator[LoopbackHTTPServer]:
    Handler.photo = (photos_dir / "dog.jpg").read_bytes()
    httpd = LoopbackHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def base(server: LoopbackHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_port}"


def _fetcher(**changes: object) -> Fetcher:
    settings = {"allow_private_urls": True, "fetch_timeout_s": 1.0, **changes}
    return Fetcher(Config().replace(**settings))


def test_photo_is_fetched_byte_identical_with_our_user_agent(base: str) -> None:
    Handler.user_agents.clear()
    assert _fetcher().fetch(f"{base}/photo") == Handler.photo
    assert Handler.user_agents == [USER_AGENT]


def test_fetch_is_safe_from_many_threads(base: str) -> None:
    fetcher = _fetcher()
    with ThreadPoolExecutor(max_workers=8) as pool:
        bodies = list(pool.map(fetcher.fetch, [f"{base}/photo"] * 16))
    assert all(body == Handler.photo for body in bodies)


def test_http_errors_fail_with_the_status(base: str) -> None:
    with pytest.raises(FetchFailed, match="HTTP 404"):
        _fetcher().fetch(f"{base}/missing")


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_up_to_the_redirect_limit_is_followed(base: str, hops: int) -> None:
    assert _fetcher(fetch_max_redirects=3).fetch(f"{base}/redirect/{hops}") == Handler.photo


def test_absolute_redirects_are_followed(base: str) -> None:
    assert _fetcher().fetch(f"{base}/absolute-redirect") == Handler.photo


@pytest.mark.parametrize("hops", [4, 5])
def test_too_many_redirects_fail(base: str, hops: int) -> None:
    with pytest.raises(FetchFailed, match="redirected more than 3"):
        _fetcher(fetch_max_redirects=3).fetch(f"{base}/redirect/{hops}")


def test_zero_redirects_allowed_means_none_followed(base: str) -> None:
    with pytest.raises(FetchFailed, match="redirected"):
        _fetcher(fetch_max_redirects=0).fetch(f"{base}/redirect/1")


@pytest.mark.parametrize("path", ["/to-file", "/to-ftp"])
def test_redirect_to_another_scheme_fails(base: str, path: str) -> None:
    with pytest.raises(FetchFailed, match="Only http and https"):
        _fetcher().fetch(base + path)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.jpg", "gopher://x/"])
def test_other_schemes_fail(url: str) -> None:
    with pytest.raises(FetchFailed, match="Only http and https URLs are supported"):
        _fetcher().fetch(url)


@pytest.mark.parametrize("path", ["/big-declared", "/endless"])
def test_oversized_bodies_stop_early(base: str, path: str) -> None:
    Handler.flood_done.clear()
    with pytest.raises(ImageTooLarge) as refused:
        _fetcher(max_image_bytes=SMALL_LIMIT).fetch(base + path)
    # The message gives the size (declared, or at least what came) and the limit.
    assert f"the limit is {SMALL_LIMIT:,} bytes (MAX_IMAGE_BYTES)" in refused.value.message
    assert refused.value.message.startswith("The image is ")
    assert Handler.flood_done.wait(5), "the server kept sending after the client gave up"
    # What the server managed to send is bounded by the socket buffers, not the cap.
    assert Handler.flooded[path] < FLOOD_CAP // 4


def test_compressed_bodies_are_limited_after_decompression(base: str) -> None:
    with pytest.raises(ImageTooLarge):
        _fetcher(max_image_bytes=SMALL_LIMIT).fetch(f"{base}/gzip-bomb")


@pytest.mark.parametrize("path", ["/drip", "/stall", "/late-stall"])
def test_slow_servers_hit_the_deadline(base: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        _fetcher(fetch_timeout_s=1.0).fetch(base + path)
    # /late-stall would take about 1.7 s if a read could wait out a whole timeout of its own.
    assert 0.9 <= time.monotonic() - started < 1.4


def test_response_headers_dripped_a_byte_at_a_time_hit_the_deadline(base: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out after 2 s"):
        _fetcher(fetch_timeout_s=2.0).fetch(f"{base}/drip-headers")
    assert time.monotonic() - started < 2.0 + 3  # loose: the error is the check


def test_connection_refused_fails() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchFailed, match="connect"):
        _fetcher().fetch(f"http://127.0.0.1:{port}/")


def test_unresolvable_host_fails() -> None:
    with pytest.raises(FetchFailed):
        _fetcher().fetch("http://no-such-host.invalid/a.jpg")


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return True


BLOCKED = [
    "http://127.0.0.1:{port}/photo",
    "http://localhost:{port}/photo",
    "http://[::1]:{port}/photo",
    "http://10.0.0.1/photo",
    "http://172.16.0.1/photo",
    "http://172.31.255.254/photo",
    "http://192.168.1.1/photo",
    "http://[fd00::1]/photo",
    "http://[fe80::1]/photo",
    "http://100.64.0.1/photo",
    "http://169.254.169.254/latest/meta-data/",
    "http://2130706433:{port}/photo",
    "http://127.1:{port}/photo",
    "http://0.0.0.0:{port}/photo",
    "http://[::ffff:127.0.0.1]:{port}/photo",
    "https://127.0.0.1:{port}/photo",
]


@pytest.mark.parametrize("template", BLOCKED)
def test_private_addresses_are_blocked_before_connecting(
    server: LoopbackHTTPServer, template: str
) -> None:
    fetcher = _fetcher(allow_private_urls=False, fetch_timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(BlockedAddress):
        fetcher.fetch(template.format(port=server.server_port))
    assert time.monotonic() - started < 0.5  # refused, not timed out


def test_octal_loopback_is_blocked_or_unresolvable(server: LoopbackHTTPServer) -> None:
    url = f"http://0177.0.0.1:{server.server_port}/photo"
    expected = BlockedAddress if _resolves("0177.0.0.1") else FetchFailed
    with pytest.raises(expected):
        _fetcher(allow_private_urls=False).fetch(url)


def test_every_redirect_hop_is_filtered(base: str) -> None:
    fetcher = _fetcher(allow_private_urls=False)
    # Test-only: let the first hop reach our loopback server; everything else stays filtered.
    fetcher._check.allow_loopback = True
    assert fetcher.fetch(f"{base}/photo") == Handler.photo
    started = time.monotonic()
    with pytest.raises(BlockedAddress):
        fetcher.fetch(f"{base}/to-metadata")
    assert time.monotonic() - started < 0.5


def test_a_blocked_address_names_the_host_the_address_and_the_setting(
    server: LoopbackHTTPServer, base: str
) -> None:
    fetcher = _fetcher(allow_private_urls=False)
    with pytest.raises(BlockedAddress) as direct:
        fetcher.fetch(f"http://localhost:{server.server_port}/photo")
    message = direct.value.message
    assert "localhost resolves to" in message and "ALLOW_PRIVATE_URLS=1" in message
    assert "127.0.0.1" in message or "::1" in message
    # A redirect hop names the hop's host, not the first URL's.
    fetcher._check.allow_loopback = True
    with pytest.raises(BlockedAddress) as hop:
        fetcher.fetch(f"{base}/to-metadata")
    assert "169.254.169.254 resolves to 169.254.169.254" in hop.value.message


# --- keep-alive (issue #22 item 5: one pool of connections per Fetcher) --------------


class KeepAliveHandler(Handler):
    protocol_version = "HTTP/1.1"  # connections stay open between requests
    peers: list[int] = []

    def do_GET(self) -> None:
        type(self).peers.append(self.client_address[1])
        super().do_GET()


@pytest.fixture(scope="module")
def keep_alive_base(server: LoopbackHTTPServer) -> Iterator[str]:
    httpd = LoopbackHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


def test_a_kept_alive_connection_is_reused_and_still_cut_at_the_deadline(
    keep_alive_base: str,
) -> None:
    fetcher = _fetcher(fetch_timeout_s=1.0)
    KeepAliveHandler.peers.clear()
    assert fetcher.fetch(f"{keep_alive_base}/photo") == Handler.photo
    assert fetcher.fetch(f"{keep_alive_base}/photo") == Handler.photo
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="timed out"):
        fetcher.fetch(f"{keep_alive_base}/drip-headers")  # no read ever times out
    assert time.monotonic() - started < 3
    # All three on one connection: the watchdog cut a socket that an earlier fetch opened.
    assert len(set(KeepAliveHandler.peers)) == 1, KeepAliveHandler.peers
    assert fetcher.fetch(f"{keep_alive_base}/photo") == Handler.photo  # a new one


def test_a_kept_alive_connection_does_not_skip_the_check_of_a_redirect_hop(
    keep_alive_base: str,
) -> None:
    fetcher = _fetcher(allow_private_urls=False)
    fetcher._check.allow_loopback = True  # test-only: our own server; the rest filtered
    assert fetcher.fetch(f"{keep_alive_base}/photo") == Handler.photo
    with pytest.raises(BlockedAddress):
        fetcher.fetch(f"{keep_alive_base}/to-metadata")
