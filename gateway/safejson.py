"""JSON from outside, bounded: nesting depth and string length checked right after parsing.

orjson parses up to 1024 levels but encodes only 254, so a body nested between the two was
taken by the parser and failed later, in the write path. Every parser that reads a peer's JSON
goes through :func:`loads`, which answers both cases the same way (``BadJson``, a 400).
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_DEPTH = 32
"""Arrays and objects inside each other; real webhook bodies use fewer than 10."""
MAX_STRING = 1 << 20
"""Characters in one string or object key (the body size bounds the total anyway)."""


class BadJson(ValueError):
    """Not UTF-8 JSON, nested deeper than allowed, or holding a string longer than allowed."""


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = MAX_DEPTH,
          max_string: int = MAX_STRING) -> Any:
    """Parse ``raw`` and check its bounds; raise :class:`BadJson`."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJson("not valid UTF-8 JSON") from exc
    check(value, max_depth=max_depth, max_string=max_string)
    return value


def check(value: Any, *, max_depth: int = MAX_DEPTH, max_string: int = MAX_STRING) -> None:
    """Raise :class:`BadJson` if parsed JSON ``value`` exceeds the bounds (no recursion)."""
    if not isinstance(value, (dict, list)):
        if isinstance(value, str) and len(value) > max_string:
            raise BadJson(f"a string longer than {max_string} characters")
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise BadJson(f"nested deeper than {max_depth} levels")
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(key, str) and len(key) > max_string:
                raise BadJson(f"a key longer than {max_string} characters")
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
            elif isinstance(item, str) and len(item) > max_string:
                raise BadJson(f"a string longer than {max_string} characters")
