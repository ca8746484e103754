"""The listener's last words (421) under uvloop, the loop ``gateway serve`` runs: its
transports are not asyncio's classes, and an isinstance check on them sent none."""

from __future__ import annotations

import asyncio
from typing import Any

import uvloop

from gateway.channels.email.common import EmailConfig
from gateway.channels.email.smtp import Handler, Listener
from gateway.server.config import HostPort

MAILBOX = "12345@hotline.example.gov.cn"


async def _accept(raw: bytes, envelope: Any) -> str:
    return "00000000-0000-7000-8000-000000000000"


async def _until_closed(reader: asyncio.StreamReader) -> list[bytes]:
    lines = []
    while line := await reader.readline():
        lines.append(line)
    return lines


def test_a_session_over_its_time_is_told_421_under_uvloop():
    async def scenario() -> list[bytes]:
        config = EmailConfig(
            listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,), max_session_time=1
        )
        listener = Listener(config, Handler(config, _accept))
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"EHLO client.example.org\r\n")
            lines = await _until_closed(reader)  # the server closes it after a second
            writer.close()
            return lines
        finally:
            await listener.stop()

    lines = uvloop.run(scenario())
    assert lines[0].startswith(b"220 ") and lines[-2] == b"250 HELP\r\n"
    assert lines[-1] == b"421 4.4.2 Session time limit exceeded\r\n"


def test_sessions_are_told_421_when_the_listener_stops_under_uvloop():
    async def scenario() -> list[bytes]:
        config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
        listener = Listener(config, Handler(config, _accept))
        await listener.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        banner = await reader.readline()
        writer.write(b"NOOP\r\n")
        assert await reader.readline() == b"250 OK\r\n"
        await listener.stop()
        lines = [banner, *await _until_closed(reader)]
        writer.close()
        return lines

    lines = uvloop.run(scenario())
    assert lines[0].startswith(b"220 ")
    assert lines[1:] == [b"421 4.3.2 Service shutting down\r\n"]
