"""A local HTTP server for photos, with slow, gated and failing paths for fault tests."""

from __future__ import annotations

import functools
import http.server
import sys
import threading
import time
from pathlib import Path

from harness.serving import LoopbackHTTPServer

SLOW_S = 1.5
GATE_MAX_S = 600


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


class _QuietServer(LoopbackHTTPServer):
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

    ``keep_alive``: answer in HTTP/1.1 and keep each connection open for the client's
    next request, as image hosts and CDNs do (the benchmarks' photo server). Tests keep
    HTTP/1.0, a connection per request: a test that stops the server stops its photos,
    where a kept connection would still be served by its thread.
    """

    def __init__(self, directory: Path, keep_alive: bool = False) -> None:
        self.hits: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        attributes = {"hits": self.hits, "gates": self.gates}
        if keep_alive:
            attributes["protocol_version"] = "HTTP/1.1"
        handler_class = type("Handler", (QuietHandler,), attributes)
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
