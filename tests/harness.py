"""Shared test helpers (a gateway's settings come from the kit's plugin: ``settings_for``)."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from pathlib import Path
from typing import Any

import hiredis

from gateway.testing.plugin import settings_for

__all__ = [
    "ServerRelay", "answer_before_body", "free_port", "free_ports", "read_answer", "require",
    "settings_for",
]


def free_port() -> int:
    """One free loopback port (see ``free_ports``). For two or more, ``free_ports(n)``:
    ``free_port()`` twice can give the same port."""
    return free_ports(1)[0]


def free_ports(n: int, *, bus: int = 0) -> list[int]:
    """``n`` distinct free loopback ports for servers a test starts (and may kill and start
    again on the same port).

    Taken below the kernel's ephemeral range (``ip_local_port_range``), where ``bind(0)``
    finds its ports and where every outgoing connection takes its local port: a port from
    there, let go by a killed server, was taken by a client's connection before the server
    came back (``address already in use``, seen in the fleet soak). Each port stays bound
    until all are picked, so no two are the same (separate ``bind(0)`` calls gave one port
    twice about once in 10,000). With ``bus``, port + ``bus`` is free and held too (a Redis
    Cluster node's bus port) and below the range as well, so no port is another's bus port.
    """
    low = _ephemeral_low()
    top = max(low - bus, _FIRST_PORT + 1000)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(10_000):
            if len(ports) == n:
                return ports
            port = random.randrange(_FIRST_PORT, top)
            pair = [socket.socket() for _ in range(2 if bus else 1)]
            try:
                for s, number in zip(pair, (port, port + bus), strict=False):
                    s.bind(("127.0.0.1", number))
            except OSError:
                for s in pair:
                    s.close()
                continue
            held.extend(pair)
            ports.append(port)
        raise AssertionError(f"no {n} free ports in {_FIRST_PORT}-{top}")
    finally:
        for s in held:
            s.close()


_FIRST_PORT = 20000


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


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


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 answer, head and body (by its ``Content-Length``), as it came."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


class ServerRelay:
    """A TCP relay in front of the embedded server (``upstream``: its Unix socket) that a test
    points a client at (``start`` gives its URL). Each client connection is piped both ways;
    ``passing`` sees each of the client's commands first (RESP parsed), and may close the
    connection instead of passing it on."""

    def __init__(self, server: Any) -> None:
        self.upstream = server
        self._server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> str:
        """Listen; with ``tls``, terminate TLS as a proxy would (a ``rediss://`` URL)."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=tls)
        port = self._server.sockets[0].getsockname()[1]
        return f"{'rediss' if tls else 'redis'}://127.0.0.1:{port}/0"

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def passing(self, command: list[Any]) -> bool:
        """True: the read that holds ``command`` goes on to the server; False: nothing of it
        does, and the client's connection is closed (the command was in flight, never ran)."""
        return True

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream.socket))
        more = object()  # what the parser gives while a command is not whole
        parser = hiredis.Reader(notEnoughData=more)

        async def up() -> None:
            try:
                while data := await reader.read(65536):
                    parser.feed(data)
                    while (message := parser.gets()) is not more:
                        if not await self.passing(message):
                            return
                    up_writer.write(data)
                    await up_writer.drain()
            finally:
                up_writer.close()
                writer.close()

        async def down() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            finally:
                writer.close()

        await asyncio.gather(up(), down(), return_exceptions=True)
