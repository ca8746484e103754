"""RFC 2920 PIPELINING: the replies to a group of commands go out in one write, the same
replies aiosmtpd sends one write at a time; over sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.channels.email.common import EmailConfig
from gateway.channels.email.smtp import GatewaySMTP, Handler
from gateway.server.config import HostPort

MAILBOX = "12345@hotline.example.gov.cn"
MESSAGE = b"Subject: lamp\r\n\r\nThe lamp is out.\r\n.\r\n"


class _OneWriteEach(GatewaySMTP):
    """Our listener with aiosmtpd's own reply writes (one per reply)."""

    push = SMTP.push  # type: ignore[assignment]


async def _transcript(
    kind: type[GatewaySMTP], groups: list[tuple[bytes, int]]
) -> tuple[list[bytes], list[bytes]]:
    """Send each group of lines in one write and read its replies (how many is given)
    before the next: the reply lines, and the writes the server made for them."""

    async def accept(raw: bytes, envelope: Any) -> str:
        return "00000000-0000-7000-8000-000000000000"

    config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
    handler = Handler(config, accept)
    loop = asyncio.get_running_loop()
    sessions: list[GatewaySMTP] = []
    writes: list[bytes] = []

    def protocol() -> GatewaySMTP:
        proto = kind(handler, line_length=1000, max_session_s=60.0, sessions=set(),
                     data_size_limit=10_000, enable_SMTPUTF8=True, decode_data=False,
                     hostname="mx", timeout=60.0, loop=loop)
        sessions.append(proto)
        return proto

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    replies: list[bytes] = []
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        replies.append(await reader.readline())
        transport: Any = sessions[0].transport
        write = transport.write

        def counted(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        transport.write = counted
        for group, count in groups:
            writer.write(group)
            await writer.drain()
            for _ in range(count):
                while (reply := await reader.readline())[3:4] == b"-":
                    replies.append(reply)
                replies.append(reply)
        writer.close()
    finally:
        server.close()
    return replies, writes


GROUPS = [
    (b"EHLO client.example.org\r\n", 1),
    (f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{MAILBOX}>\r\n"
     f"RCPT TO:<x@elsewhere.example>\r\nDATA\r\n".encode(), 4),
    (MESSAGE, 1),
    (f"RSET\r\nMAIL FROM:<b@example.org>\r\nRCPT TO:<{MAILBOX}>\r\nNOOP\r\nDATA\r\n".encode(), 5),
    (MESSAGE + b"QUIT\r\n", 2),
]


async def test_the_replies_to_a_group_of_commands_go_out_in_one_write():
    replies, writes = await _transcript(GatewaySMTP, GROUPS[:2])
    assert replies[-4:] == [
        b"250 OK\r\n",
        b"250 2.1.5 OK\r\n",
        b"550 5.7.1 Relaying denied: not a mailbox of this server\r\n",
        b"354 End data with <CR><LF>.<CR><LF>\r\n",
    ]
    # the EHLO's lines in one write, then the group's four replies in one write
    assert writes == [b"".join(replies[1:-4]), b"".join(replies[-4:])]


async def test_pipelined_replies_are_aiosmtpds_to_the_byte():
    ours, our_writes = await _transcript(GatewaySMTP, GROUPS)
    theirs, their_writes = await _transcript(_OneWriteEach, GROUPS)
    assert ours == theirs
    assert ours[-1] == b"221 Bye\r\n"
    assert b"".join(our_writes) == b"".join(their_writes) == b"".join(ours[1:])
    assert len(our_writes) == len(GROUPS) < len(their_writes)


class _WaitingRcpt(Handler):
    """A ``RCPT`` hook that waits (for a lookup, say) and never gets its answer here."""

    async def handle_RCPT(self, *args: Any) -> str:
        await asyncio.Event().wait()
        raise AssertionError("not reached")


async def _held_then(end: str) -> bytes:
    """``MAIL`` and ``RCPT`` in one write: ``MAIL``'s 250 is held (the next line is already
    received) while the ``RCPT`` hook waits; then the client half-closes, or the idle timeout
    ends the session. Everything the client gets until the connection closes."""

    async def accept(raw: bytes, envelope: Any) -> str:
        return "00000000-0000-7000-8000-000000000000"

    config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
    handler = _WaitingRcpt(config, accept)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GatewaySMTP(handler, line_length=1000, max_session_s=60.0, sessions=set(),
                            data_size_limit=10_000, enable_SMTPUTF8=True, decode_data=False,
                            hostname="mx", timeout=0.5 if end == "idle" else 60.0, loop=loop),
        "127.0.0.1", 0,
    )
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        await reader.readline()
        writer.write(b"EHLO client\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{MAILBOX}>\r\n".encode())
        if end == "eof":
            writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)  # until the server closes
        writer.close()
        return got
    finally:
        server.close()


async def test_a_reply_held_is_sent_when_the_client_half_closes() -> None:
    assert (await _held_then("eof")).startswith(b"250 OK\r\n")


async def test_a_reply_held_is_sent_before_the_idle_timeout_closes() -> None:
    assert (await _held_then("idle")).startswith(b"250 OK\r\n")
