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


def configure(max_depth: int, max_string: int) -> None:
    """Set the bounds every later :func:`loads` uses by default (``[limits]``)."""
    global MAX_DEPTH, MAX_STRING
    MAX_DEPTH, MAX_STRING = max(1, max_depth), max(1, max_string)


class BadJson(ValueError):
    """Not UTF-8 JSON, nested deeper than allowed, or holding a string longer than allowed."""


def loads(raw: bytes | bytearray | memoryview | str, *, max_depth: int = 0,
          max_string: int = 0) -> Any:
    """Parse ``raw`` and check its bounds (0: the configured ones); raise :class:`BadJson`."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJson("not valid UTF-8 JSON") from exc
    if isinstance(raw, (bytes, str)) and _within(raw, max_depth or MAX_DEPTH,
                                                 max_string or MAX_STRING):
        return value
    check(value, max_depth=max_depth, max_string=max_string)
    return value


def _within(raw: bytes | str, max_depth: int, max_string: int) -> bool:
    """True when the text alone proves the bounds, without walking the value: no string or key
    has more characters than the whole text, and nothing nests deeper than the text has
    opening brackets (those inside strings only make the count larger). Most bodies pass."""
    if len(raw) > max_string:
        return False
    if isinstance(raw, bytes):
        return raw.count(b"{") + raw.count(b"[") <= max_depth
    return raw.count("{") + raw.count("[") <= max_depth


def check(value: Any, *, max_depth: int = 0, max_string: int = 0) -> None:
    """Raise :class:`BadJson` if parsed JSON ``value`` exceeds the bounds (no recursion)."""
    max_depth = max_depth or MAX_DEPTH
    max_string = max_string or MAX_STRING
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
