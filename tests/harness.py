"""Shared test helpers (a gateway's settings come from the kit's plugin: ``settings_for``)."""

from __future__ import annotations

import socket

from gateway.testing.plugin import settings_for

__all__ = ["answer_before_body", "free_port", "free_ports", "require", "settings_for"]


def free_port() -> int:
    """One free loopback port. For two or more, ``free_ports(n)``: ``free_port()`` twice can
    give the same port (the second bind may be handed the port the first just let go)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: each stays bound until all are picked, so no two
    are the same (separate ``free_port()`` calls gave one port twice about once in 10,000)."""
    held = [socket.socket() for _ in range(n)]
    try:
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in held]
    finally:
        for s in held:
            s.close()


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
