"""Shared test helpers (a gateway's settings come from the kit's plugin: ``settings_for``)."""

from __future__ import annotations

from gateway.testing.plugin import settings_for

__all__ = ["answer_before_body", "require", "settings_for"]


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
