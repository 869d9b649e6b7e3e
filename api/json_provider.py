"""Request JSON parsing that refuses hostile nesting as invalid JSON (400), not a 500.

Python's decoder recurses once per level, so ``[[[[...]]]]`` a hundred thousand deep
raises RecursionError, which Flask does not treat as a parse error. Nesting that does
parse but is deeper than any request of ours needs is refused too: later code (repr,
marshmallow, logging) may recurse over it again with less stack left.
"""

from __future__ import annotations

from typing import Any

from flask.json.provider import DefaultJSONProvider

MAX_DEPTH = 32  # our deepest request body is 3 levels


class JSONProvider(DefaultJSONProvider):
    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            value = super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
        if too_deep(value, MAX_DEPTH):
            raise ValueError(f"JSON nested deeper than {MAX_DEPTH} levels")
        return value


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
