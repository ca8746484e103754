"""SMTP limits over real sockets: a connection cap, the per-sender rate limit (451 4.7.1)."""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

from tests.channels.email.conftest import MAILBOX
from tests.server.test_limits import _closed_by_server


async def test_smtp_connection_cap(start_mailbox: Any) -> None:
    gw = await start_mailbox(sections={"limits": {"max_connections": 2}})
    port = gw.adapters["mail"].port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for r, _ in held:
        assert (await r.readline()).startswith(b"220")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await _closed_by_server(reader)).startswith(b"421 4.3.2")
    writer.close()
    for _, w in held:
        w.close()


async def test_smtp_sender_over_the_rate_limit_gets_451_4_7_1(start_mailbox: Any) -> None:
    gw = await start_mailbox(sections={"limits": {"sender_contacts": 2, "sender_window": "1h"}})
    port = gw.adapters["mail"].port

    def send_all() -> list[tuple[int, bytes]]:
        replies = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            for i in range(3):
                raw = (
                    f"From: citizen@example.org\r\nTo: {MAILBOX}\r\n"
                    f"Message-ID: <m{i}@example.org>\r\nSubject: {i}\r\n\r\nbody {i}\r\n"
                ).encode()
                client.mail("citizen@example.org")
                client.rcpt(MAILBOX)
                try:
                    replies.append(client.data(raw))
                except smtplib.SMTPDataError as exc:
                    replies.append((exc.smtp_code, exc.smtp_error))
        return replies

    replies = await asyncio.to_thread(send_all)
    assert [code for code, _ in replies] == [250, 250, 451]
    assert replies[2][1].startswith(b"4.7.1")
