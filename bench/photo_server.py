"""``python -m bench.photo_server DIR``: serve DIR's photos over HTTP on 127.0.0.1.

Prints the base URL on its first line of output, then serves until terminated.
A process of its own, so serving images does not share a GIL with the drivers.
It keeps connections open between requests (HTTP/1.1), as image hosts and CDNs do:
the service's fetchers and the no-bookkeeping pipeline's sessions reuse them.
"""

from __future__ import annotations

import signal
import sys
import tempfile
from pathlib import Path

from harness import photos


def main(directory: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for photo in Path(directory).iterdir():
            (root / photo.name).symlink_to(photo)
        with photos.PhotoServer(root, keep_alive=True) as server:
            print(server.base_url, flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            signal.pause()


if __name__ == "__main__":
    main(sys.argv[1])
