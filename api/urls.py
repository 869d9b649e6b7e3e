"""Which URLs the API accepts (images to classify, webhooks): absolute http(s), bounded,
with no hidden characters. The schemas' ``HttpUrl`` field and the bulk line checks use
it; where a URL may point (SSRF) is the worker's check, at fetch time."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048

_ASCII_HIDDEN = re.compile(r"[\x00-\x20\x7f]")
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def is_valid_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return (
            parts.scheme.lower() in ("http", "https")
            and bool(parts.hostname)
            and len(url) <= MAX_URL_LENGTH
            and _no_hidden_characters(url)
        )
    except ValueError:  # e.g. an invalid IPv6 literal
        return False


def _no_hidden_characters(url: str) -> bool:
    """No whitespace, control (ANSI escapes reached the logs), format (invisible, bidi
    overrides) or surrogate character: never part of a real URL, only of an attack on
    its readers."""
    if url.isascii():  # nearly every URL: one regex search instead of a loop per character
        return _ASCII_HIDDEN.search(url) is None
    return not any(c.isspace() or unicodedata.category(c) in _HIDDEN_CATEGORIES for c in url)


def invalid_message(field: str) -> str:
    """What a refused URL is told."""
    return f"The {field} must be an absolute http(s) URL of at most {MAX_URL_LENGTH} characters."
