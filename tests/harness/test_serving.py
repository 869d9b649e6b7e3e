"""The harness's HTTP servers (photos, webhook receiver, slow hosts) take a burst of
connections without dropping any."""

from __future__ import annotations

import contextlib
import socket
from http.server import BaseHTTPRequestHandler

from harness.serving import LoopbackHTTPServer

#: More connections than a worker's FETCH_THREADS open at once (16 by default).
BURST = 64
#: A connection the backlog holds completes at once; a dropped SYN is sent again after
#: 1 s, then 3 s, and the server below never accepts: such a connect times out.
CONNECT_TIMEOUT_S = 3


def test_a_burst_of_connections_waits_in_the_backlog_and_none_is_dropped() -> None:
    # Not serving: every connection stays in the listen backlog. With socketserver's
    # default of 5, the seventh SYN would be dropped and its connect would time out.
    server = LoopbackHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    with contextlib.ExitStack() as opened:
        opened.callback(server.server_close)
        for _ in range(BURST):
            conn = socket.create_connection(server.server_address, timeout=CONNECT_TIMEOUT_S)
            opened.callback(conn.close)
