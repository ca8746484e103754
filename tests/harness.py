"""Shared test helpers: settings for a gateway on a real Redis with its own prefix and data dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config import Settings, parse_settings


def settings_for(
    data_dir: Path,
    redis_url: str,
    prefix: str,
    *,
    adapters: dict[str, dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> tuple[Settings, dict[str, Any]]:
    """Build validated settings: HTTP on an ephemeral loopback port, open intake for loopback."""
    raw: dict[str, Any] = {
        "gateway": {"data_dir": str(data_dir), "instance": f"test-{prefix}"},
        "redis": {"url": redis_url, "prefix": prefix, "write_timeout": "1s"},
        "http": {"listen": "127.0.0.1:0"},
        "api": {"open_to_loopback": True},
        # many tests write from one sender: the rate limit is on where a test counts it
        "limits": {"sender_contacts": 0},
        "adapters": adapters or {},
    }
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return parse_settings(raw, "<test>")


async def answer_before_body(port: int, head: bytes, first: bytes = b"") -> tuple[int, bytes]:
    """Send a request's head and the first bytes of a much longer declared body, then read the
    answer without sending the rest: a server that reads the whole body before refusing never
    answers (the wait is bounded, so such a server fails the test instead of hanging it)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + first)
        await writer.drain()
        async with asyncio.timeout(15):
            status_line = await reader.readline()
            rest = await reader.read(65536)
        return int(status_line.split()[1]), rest
    finally:
        writer.close()


def require(ok: bool, what: str) -> None:
    """Fail (never skip) with what the test needs when a real program is missing: `.ci/run`
    installs every one of them, so a missing program is a broken machine, not a pass."""
    import pytest

    if not ok:
        pytest.fail(f"this test needs {what}", pytrace=False)
