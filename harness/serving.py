"""Real HTTP servers on loopback for tests and benches: the API app as a client would
see it (``serving``), and the base class of the harness's own small servers."""

from __future__ import annotations

import contextlib
import http.server
import threading

from werkzeug.serving import make_server


class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """A thread per connection, and a listen backlog of 128 instead of socketserver's 5.

    With 5, a worker whose FETCH_THREADS connect at once overflows the backlog: the
    kernel drops the extra SYNs (``ListenOverflows`` in /proc/net/netstat) and each of
    those clients sends its SYN again after its initial 1 s retransmission timeout.
    Waiting clients' jobs then took 1.1-1.3 s instead of 0.1-0.3 (a p99 of 1.1 s under
    16 waiting clients, bench.bookkeeping's null model): a stall no real image host
    causes, charged to the service by every benchmark. Real servers default higher
    (nginx: 511).
    """

    request_queue_size = 128


@contextlib.contextmanager
def serving(app):
    """The API app served on 127.0.0.1 by a real HTTP server; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
