"""Request JSON parsing that refuses hostile nesting as invalid JSON (400), not a 500.

Python's decoder recurses once per level, so ``[[[[...]]]]`` a hundred thousand deep
raises RecursionError, which Flask does not treat as a parse error. Nesting that does
parse but is deeper than any request of ours needs is refused too: later code (repr,
marshmallow, logging) may recurse over it again with less stack left.
"""

from __future__ import annotations

import json
from typing import Any

from flask.json.provider import DefaultJSONProvider

from shared.errors import InvalidJSON

MAX_DEPTH = 32  # our deepest request body is 3 levels


class TooDeep(ValueError):
    """JSON nested deeper than MAX_DEPTH (or than Python's decoder can recurse)."""


def loads(s: str | bytes, **kwargs: Any) -> Any:
    """``json.loads``, refusing nesting deeper than MAX_DEPTH with ``TooDeep``. Every
    JSON a client sends is read through this: request bodies (the provider below) and
    each line of a JSON Lines batch (api/bulk.py)."""
    try:
        value = json.loads(s, **kwargs)
    except RecursionError:
        raise TooDeep("JSON nested too deeply") from None
    if too_deep(value, MAX_DEPTH):
        raise TooDeep(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def invalid_json(body: bytes) -> InvalidJSON:
    """``400 invalid_json`` for a body that does not parse; when it is JSON Lines sent as
    JSON, saying which Content-Type takes it."""
    if _looks_like_json_lines(body):
        return InvalidJSON(
            "The request body is not valid JSON: it looks like JSON Lines, one object per "
            "line. POST /v1/batches takes them with Content-Type: application/jsonl."
        )
    return InvalidJSON()


def _looks_like_json_lines(body: bytes) -> bool:
    # The first lines only: enough to tell, and the body may hold 10,000.
    lines = [line for line in body.split(b"\n", 3)[:3] if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(loads(line), dict) for line in lines)
    except ValueError:
        return False


class JSONProvider(DefaultJSONProvider):
    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s, **kwargs)


def too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit``; iterative, so any depth is safe."""
    if not isinstance(value, dict | list):
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False
