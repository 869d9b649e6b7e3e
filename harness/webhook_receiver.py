"""A scripted webhook receiver: a real HTTP server on 127.0.0.1 for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import threading
import time
from http.server import BaseHTTPRequestHandler

from harness.serving import LoopbackHTTPServer


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict = dataclasses.field(default_factory=dict)
    delay_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Received:
    path: str
    headers: dict  # names in lower case
    body: bytes
    at: float


class Receiver:
    """Answers POSTs with the next scripted reply (the last one repeats) and records them."""

    def __init__(self) -> None:
        self.script: list[Reply] = [Reply()]
        self.received: list[Received] = []
        self.release = threading.Event()  # ends a scripted hang early at teardown
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                reply = receiver._next(self.path, headers, body)
                if reply.delay_s:
                    receiver.release.wait(reply.delay_s)
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

        class Server(LoopbackHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that timed out and left is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._lock = threading.Lock()

    def _next(self, path: str, headers: dict, body: bytes) -> Reply:
        with self._lock:
            self.received.append(Received(path, headers, body, time.monotonic()))
            return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def answer(self, *replies: Reply | int) -> Receiver:
        self.script = [Reply(r) if isinstance(r, int) else r for r in replies]
        return self

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
