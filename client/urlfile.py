"""Reading URL lists: one URL per line, blank lines and ``#`` comments ignored.

The server parses, validates and numbers the lines itself (the ``text/plain`` body
is the file unchanged), so its ``invalid_urls`` line numbers are the file's. The
client parses with the same rule only to refuse an empty list without a request
and to show the offending lines next to the server's numbers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UrlLine:
    """A URL and the 1-based line of the input file it came from."""

    lineno: int
    url: str


def parse_url_lines(text: str) -> list[UrlLine]:
    """Keep every non-blank line that is not a comment, stripped, with its line number.

    Only whole-line comments count: a ``#`` inside a URL is a fragment, not a comment.
    """
    entries = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            entries.append(UrlLine(lineno, line))
    return entries


def read_url_text(name: str) -> str:
    """Read ``name`` (``-`` for stdin); OSError and UnicodeDecodeError are the caller's.

    The text is sent to the server as it is, so the server's line numbers are the
    file's; ``utf-8-sig`` drops the BOM some editors write.
    """
    return sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8-sig")
