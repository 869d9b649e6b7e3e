"""SSRF-safe image download for the worker.

The SSRF policy and the error mapping are ``worker.http_client``'s, shared with
webhook deliveries; this module follows redirects (by hand, each hop checked like
the first, at most FETCH_MAX_REDIRECTS), caps the body (MAX_IMAGE_BYTES), keeps the
deadline, and words the errors for the job's owner.

The deadline (FETCH_TIMEOUT_S) is wall-clock: one watchdog thread per process keeps
the deadlines of the fetches in flight and shuts down the sockets of a fetch that
passes its own, whatever the server does (response headers dripped a byte at a
time included); the fetch then fails with the usual "timed out" error. The
per-read socket timeouts stay, so a silent server is noticed without the watchdog.

Known gap: DNS resolution (``getaddrinfo``, called by requests-hardened's filter)
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
from urllib.parse import urljoin

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from shared.config import Config
from shared.errors import BlockedAddress, FetchFailed, ImageTooLarge
from worker.http_client import Failure, HttpClient, RequestFailed, check_scheme, mapped_errors

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


class _Guarded:
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        guard = getattr(_current, "guard", None)
        if guard is not None:
            guard.add(sock)
        return sock


class _GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_GUARDED_POOLS = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class Fetcher:
    """Downloads image URLs; ``fetch`` may be called from several threads at once.

    Each call uses its own session (``HttpClient``); image URLs rarely share hosts,
    so keep-alive pooling would buy little.
    """

    def __init__(self, config: Config) -> None:
        self._max_bytes = config.max_image_bytes
        self._timeout_s = config.fetch_timeout_s
        self._max_redirects = config.fetch_max_redirects
        self._client = HttpClient(config, timeout_s=self._timeout_s, user_agent=USER_AGENT)

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
            with mapped_errors(url), self._client.session() as session:
                for adapter in session.adapters.values():
                    # Every socket this session opens joins the fetch's guard.
                    adapter.poolmanager.pool_classes_by_scheme = _GUARDED_POOLS
                with self._get(session, url, deadline) as response:
                    return self._read_body(response, deadline)
        except RequestFailed as exc:
            raise self._failed(exc) from exc

    def _get(self, session: requests.Session, url: str, deadline: float) -> requests.Response:
        """Follow redirects by hand so each hop's scheme is checked and the hops are counted."""
        for _hop in range(self._max_redirects + 1):
            check_scheme(url)
            remaining = self._remaining(deadline)
            with mapped_errors(url):  # a blocked hop names its own host
                response = session.get(
                    url,
                    headers={"Accept": _ACCEPT},
                    stream=True,
                    allow_redirects=False,
                    timeout=(remaining, remaining),
                )
            if not response.is_redirect:
                if not 200 <= response.status_code < 300:
                    response.close()
                    raise FetchFailed(f"The image URL returned HTTP {response.status_code}.")
                return response
            url = urljoin(response.url, session.get_redirect_target(response))
            response.close()
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

    def _read_body(self, response: requests.Response, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise self._too_large(f"{int(declared):,} bytes")
        sock = _socket_of(response.raw)
        body = bytearray()
        while True:
            # read1 returns what one socket read gave, so the deadline is checked often
            # even when a server drips data; urllib3 bounds decompressed output to _CHUNK.
            remaining = self._remaining(deadline)
            if sock is not None and sock.fileno() != -1:  # -1: closed, the body is all in
                # The read timeout was fixed when the hop began; shrink it so one stalled
                # read cannot outlive the deadline.
                sock.settimeout(remaining)
            chunk = response.raw.read1(_CHUNK, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self._max_bytes:
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


def _socket_of(raw: urllib3.HTTPResponse) -> socket.socket | None:
    connection = raw.connection
    if connection is not None and connection.sock is not None:
        return connection.sock
    try:
        # With "Connection: close", http.client hands the socket to the response's file.
        return raw._fp.fp.raw._sock
    except AttributeError:
        return None  # then the watchdog alone ends a stalled read at the deadline
