"""The API app behind a real HTTP server on loopback, as a client would see it."""

from __future__ import annotations

import contextlib
import threading

from werkzeug.serving import make_server


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
