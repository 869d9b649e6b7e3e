"""SSRF-safe image download for the worker.

The SSRF policy and the error mapping are ``worker.http_client``'s, shared with
webhook deliveries; this module follows redirects (by hand, each hop checked like
the first, at most FETCH_MAX_REDIRECTS), caps the body (MAX_IMAGE_BYTES), keeps the
deadline, and words the errors for the job's owner.

Issue #22 item 5: a requests session per fetch (a new connection each time) cost
1.2-1.4 CPU ms per fetch. A ``Fetcher`` now holds one urllib3 ``PoolManager``
(thread-safe; connections kept alive per host, ``FETCH_THREADS`` at most), and the
policy's address check runs where a connection is opened (``_CheckedConnection``):
the host is resolved, a refused address fails the fetch before any packet is sent,
and the socket connects to the address that was checked, as requests-hardened does
(its ``filter_host``, the same check with ``shared.ssrf``'s extra ranges). A kept-alive
connection was checked when it opened; each redirect hop is a request of its own,
through the same check when it opens a connection.

The deadline (FETCH_TIMEOUT_S) is wall-clock: one watchdog thread per process keeps
the deadlines of the fetches in flight and shuts down the sockets of a fetch that
passes its own, whatever the server does (response headers dripped a byte at a
time included); the fetch then fails with the usual "timed out" error. The
per-read socket timeouts stay, so a silent server is noticed without the watchdog.

Known gap: DNS resolution (``getaddrinfo``, called by the address check)
has no socket to shut down; it is bounded by the resolver's own timeouts
(``/etc/resolv.conf``: 5 s times the attempts, by default), not by the deadline.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import certifi
import urllib3
from requests_hardened.ip_filter import filter_host
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from shared import ssrf
from shared.config import Config
from shared.errors import BlockedAddress, FetchFailed, ImageTooLarge
from worker.http_client import Failure, RequestFailed, check_scheme, mapped_errors

USER_AGENT = "imgclf-fetcher/0.1"
_CHUNK = 64 * 1024
# AVIF, TIFF and friends are not decodable, so do not invite a CDN to send them.
_ACCEPT = "image/jpeg, image/png, image/webp, image/gif, image/bmp;q=0.9, */*;q=0.1"


class _Guard:
    """One fetch's sockets, shut down together when the fetch passes its deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.fired = False
        self.finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.fired:
                self._sockets.append(sock)
                return
        _shut(sock)  # connected after the deadline passed

    def fire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.fired = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            self._sockets = []


def _shut(sock: socket.socket) -> None:
    # shutdown, not close: the fetching thread still owns the descriptor, and a blocked
    # recv returns at once (end of stream) instead of reading a reused descriptor.
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """Fires the guards of fetches past their deadline: one thread and a heap of deadlines.

    Started on first use in each process (the worker builds its Fetcher after fork).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._pid: int | None = None

    def watch(self, deadline: float) -> _Guard:
        guard = _Guard(deadline)
        with self._changed:
            if self._pid != os.getpid():  # first use here, or a fork copied a dead thread
                self._pid, self._heap = os.getpid(), []
                threading.Thread(target=self._run, daemon=True, name="fetch-watchdog").start()
            # Woken only for a deadline earlier than every other: it sleeps until the
            # earliest anyway, and a wake-up per fetch cost more CPU than the fetch's
            # own socket calls (bench/fetch_cost.py). A finished guard stays in the heap
            # until its deadline comes up.
            sooner = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._order), guard))
            if sooner:
                self._changed.notify()
        return guard

    def _run(self) -> None:
        while True:
            self._next_due().fire()

    def _next_due(self) -> _Guard:
        with self._changed:
            while True:
                while self._heap and self._heap[0][2].finished:
                    heapq.heappop(self._heap)
                wait = self._heap[0][0] - time.monotonic() if self._heap else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(self._heap)[2]
                self._changed.wait(wait)


_watchdog = Watchdog()
# The guard of the fetch running in this thread: urllib3 opens its sockets in the
# calling thread, so the guarded connections below find their fetch here.
_current = threading.local()


class _Refused(Exception):
    """The address check's error, carried through urllib3 (which would wrap an OSError)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _AddressCheck:
    """One Fetcher's address policy: off with ALLOW_PRIVATE_URLS (local development)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.allow_loopback = False  # tests only: reach their own server, nothing else


if TYPE_CHECKING:  # what _Checked is mixed into (_pool_classes), for the type checker
    _Connection = HTTPConnection
else:
    _Connection = object


class _Checked(_Connection):
    """A connection that checks the host's address as it opens, and joins the fetch's guard."""

    check: _AddressCheck  # set per Fetcher (_pool_classes)

    def _new_conn(self) -> socket.socket:
        check = self.check
        if check.enabled:
            try:
                address = filter_host(self.host, self.port, allow_loopback=check.allow_loopback)
            except Exception as exc:  # refused, unresolvable, or the resolver timed out
                raise _Refused(exc) from exc
            self._dns_host = address.strip("[]")  # connect to the address checked
        sock = super()._new_conn()
        guard = getattr(_current, "guard", None)
        if guard is not None:
            guard.add(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        # A kept-alive socket joins this fetch's guard (a new one joins in _new_conn).
        guard = getattr(_current, "guard", None)
        if guard is not None and self.sock is not None:
            guard.add(self.sock)
        super().request(*args, **kwargs)


def _pool_classes(check: _AddressCheck) -> dict[str, type]:
    """urllib3 pool classes per scheme whose connections apply ``check``."""
    attrs = {"check": check}
    http = type("CheckedHTTPConnection", (_Checked, HTTPConnection), attrs)
    https = type("CheckedHTTPSConnection", (_Checked, HTTPSConnection), attrs)
    return {
        "http": type("CheckedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
        "https": type("CheckedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https}),
    }


# Hosts whose connections are kept; image URLs come from many, and the least recently
# used host's connections are closed beyond this.
_HOSTS_KEPT = 64
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Fetcher:
    """Downloads image URLs; ``fetch`` may be called from several threads at once."""

    def __init__(self, config: Config) -> None:
        ssrf.install()  # also refuse IPv4-compatible IPv6 (::/96)
        self._max_bytes = config.max_image_bytes
        self._timeout_s = config.fetch_timeout_s
        self._max_redirects = config.fetch_max_redirects
        self._headers = {
            **urllib3.make_headers(accept_encoding=True),
            "User-Agent": USER_AGENT,
            "Accept": _ACCEPT,
        }
        # Environment proxies are not read (urllib3 reads none): the check would vet the
        # proxy, not the target. No cookies are kept from one URL to another.
        self._pools = urllib3.PoolManager(
            num_pools=_HOSTS_KEPT,
            maxsize=config.fetch_threads,
            retries=False,
            ca_certs=certifi.where(),
        )
        self._check = _AddressCheck(enabled=not config.allow_private_urls)
        self._pools.pool_classes_by_scheme = _pool_classes(self._check)

    def fetch(self, url: str) -> bytes:
        guard = _watchdog.watch(time.monotonic() + self._timeout_s)
        _current.guard = guard
        try:
            body = self._fetch(url, guard.deadline)
        except Exception as exc:
            if guard.fired:  # whatever the cut socket looked like (a reset, an early end)
                raise self._timed_out() from exc
            raise
        finally:
            guard.finish()
            _current.guard = None
        if guard.fired:  # the watchdog may have cut the body short: never return a part
            raise self._timed_out()
        return body

    def _fetch(self, url: str, deadline: float) -> bytes:
        try:
            response = self._get(url, deadline)
            try:
                with mapped_errors(url):
                    body = self._read_body(response, deadline)
            except BaseException:
                _discard(response)
                raise
            if _current.guard.fired:
                _discard(response)  # its socket is shut down: not for the next fetch
            else:
                response.release_conn()  # kept alive for the next fetch from this host
            return body
        except RequestFailed as exc:
            raise self._failed(exc) from exc

    def _get(self, url: str, deadline: float) -> urllib3.BaseHTTPResponse:
        """Follow redirects by hand so each hop's scheme is checked and the hops are counted."""
        for _hop in range(self._max_redirects + 1):
            check_scheme(url)
            remaining = self._remaining(deadline)
            with mapped_errors(url):  # a blocked hop names its own host
                try:
                    response = self._pools.urlopen(
                        "GET",
                        url,
                        headers=self._headers,
                        redirect=False,
                        preload_content=False,
                        timeout=urllib3.Timeout(connect=remaining, read=remaining),
                    )
                except _Refused as exc:
                    raise exc.error from exc
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                if not 200 <= response.status < 300:
                    _discard(response)
                    raise FetchFailed(f"The image URL returned HTTP {response.status}.")
                return response
            _discard(response)
            url = urljoin(url, _as_text(location))
        raise FetchFailed(f"The image URL redirected more than {self._max_redirects} times.")

    def _failed(self, exc: RequestFailed) -> FetchFailed | BlockedAddress:
        """The job's error for a request that got no response."""
        match exc.kind:
            case Failure.BLOCKED:
                return _blocked(exc)
            case Failure.TIMEOUT:
                return self._timed_out()
            case Failure.SCHEME:
                return FetchFailed("Only http and https URLs are supported")
            case Failure.INVALID_URL:
                return FetchFailed("The image URL is not valid.")
            case Failure.CONNECT:
                return FetchFailed("Could not connect to the image host.")
        return FetchFailed(f"Downloading the image failed: {exc.cause_name}.")

    def _read_body(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large(f"{int(declared):,} bytes")
        sock = _socket_of(response)
        chunks: list[bytes] = []
        size = 0
        while True:
            # read1 returns what one socket read gave, so the deadline is checked often
            # even when a server drips data; urllib3 bounds decompressed output to _CHUNK.
            remaining = self._remaining(deadline)
            if sock is not None and sock.fileno() != -1:  # -1: closed, the body is all in
                # The read timeout was fixed when the hop began; shrink it so one stalled
                # read cannot outlive the deadline.
                sock.settimeout(remaining)
            chunk = response.read1(_CHUNK, decode_content=True)
            if not chunk:
                return b"".join(chunks)  # one copy (a bytearray grown, then copied: three)
            chunks.append(chunk)
            size += len(chunk)
            if size > self._max_bytes:
                raise self._too_large(f"more than {self._max_bytes:,} bytes")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        return remaining

    def _timed_out(self) -> FetchFailed:
        return FetchFailed(f"Fetching the image timed out after {self._timeout_s:g} s.")

    def _too_large(self, size: str) -> ImageTooLarge:
        return ImageTooLarge(
            f"The image is {size}; the limit is {self._max_bytes:,} bytes (MAX_IMAGE_BYTES)."
        )


def _blocked(exc: RequestFailed) -> BlockedAddress:
    # Say which host and address, and the setting a developer trying it locally needs.
    return BlockedAddress(
        f"{exc.host} resolves to {exc.address or 'a non-public address'}, a loopback, "
        "private or reserved address, which the service does not fetch. For local "
        "development and tests, start the worker with ALLOW_PRIVATE_URLS=1."
    )


def _discard(response: urllib3.BaseHTTPResponse) -> None:
    """Close the response's connection (what is left of the body is not read) and give
    its place back to the pool."""
    response.close()
    response.release_conn()


def _as_text(location: str) -> str:
    # http.client decodes headers as Latin-1; a UTF-8 Location reads right re-encoded
    # (requests' get_redirect_target does the same).
    try:
        return location.encode("latin1").decode("utf8")
    except UnicodeError:
        return location


def _socket_of(raw: urllib3.BaseHTTPResponse) -> socket.socket | None:
    sock = getattr(raw.connection, "sock", None)  # None once the connection is released
    if sock is not None:
        return sock
    try:
        # With "Connection: close", http.client hands the socket to the response's file.
        return raw._fp.fp.raw._sock  # type: ignore[attr-defined]
    except AttributeError:
        return None  # then the watchdog alone ends a stalled read at the deadline
