"""Our DATA reading (whole lines in blocks) against aiosmtpd's own (line by line), over sockets."""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.smtp import SMTP
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.channels.email.common import EmailConfig
from gateway.channels.email.smtp import GatewaySMTP, Handler
from gateway.server.config import HostPort

MAILBOX = "12345@hotline.example.gov.cn"
LINE = 60  # the reader's limit is the line bound: short, so that long lines are easy to make
SIZE = 400


class _AiosmtpdData(GatewaySMTP):
    """Our listener with aiosmtpd's own DATA."""

    smtp_DATA = SMTP.smtp_DATA  # type: ignore[assignment]


async def _session(
    kind: type[GatewaySMTP], chunks: list[bytes], end: bytes = b"\r\n.\r\n"
) -> tuple[list[bytes], list[bytes]]:
    received: list[bytes] = []

    async def accept(raw: bytes, envelope: Any) -> str:
        received.append(raw)
        return "00000000-0000-7000-8000-000000000000"

    config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
    handler = Handler(config, accept)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: kind(handler, line_length=LINE, max_session_s=60.0, sessions=set(),
                     data_size_limit=SIZE, enable_SMTPUTF8=True, decode_data=False,
                     hostname="mx", timeout=60.0, loop=loop),
        "127.0.0.1", 0,
    )
    replies: list[bytes] = []
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        for command in (b"EHLO client\r\n", b"MAIL FROM:<a@example.org>\r\n",
                        f"RCPT TO:<{MAILBOX}>\r\n".encode(), b"DATA\r\n"):
            writer.write(command)
            while (line := await reader.readline())[3:4] == b"-":
                pass
            replies.append(line)
        try:
            for chunk in chunks:  # the message in pieces, each given time to be read alone
                writer.write(chunk)
                await writer.drain()
                for _ in range(3):
                    await asyncio.sleep(0)
            # the end, and pipelined commands right behind it, which must stay commands
            writer.write(end + b"NOOP\r\nQUIT\r\n")
            await writer.drain()
            replies.extend((await reader.read()).splitlines())  # until the server closes
        except ConnectionError:  # closed early (an early dot, then bogus commands)
            replies.append(b"closed")
        writer.close()
    finally:
        server.close()
    return replies, received


TOKENS = [b"line of text", b"\r\n", b"\r\n.\r\n", b".", b"..", b"\r", b"\n", b"x" * 50,
          b"y" * 59, b"z" * 61, b"\r\n.", b".\r\n", b"\xe4\xbd\xa0\xe5\xa5\xbd", b" ", b"\x00"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.lists(st.sampled_from(TOKENS), max_size=12).map(b"".join), max_size=6),
)
def test_data_is_read_as_aiosmtpd_reads_it(chunks: list[bytes]) -> None:
    """Whatever arrives after DATA, in whatever pieces (long lines, lines over the size
    limit, dots, bare CR and LF, an early lone dot): the replies and the message handed on
    are aiosmtpd's own, and what follows the end is still read as a command."""

    async def both() -> None:
        ours = await _session(GatewaySMTP, chunks)
        theirs = await _session(_AiosmtpdData, chunks)
        assert ours == theirs

    asyncio.run(both())


def test_a_plain_message_in_one_piece_and_in_many():
    body = b"Subject: x\r\n\r\n" + b"".join(b"..line %d\r\n" % n for n in range(10))
    for chunks in ([body], [body[i : i + 7] for i in range(0, len(body), 7)]):
        replies, received = asyncio.run(_session(GatewaySMTP, chunks))
        assert [r[:3] for r in replies] == [b"250", b"250", b"250", b"354", b"250", b"250",
                                            b"221"]
        assert received == [body.replace(b"..line", b".line") + b"\r\n"]


def test_lines_and_messages_at_their_bounds_are_read_as_aiosmtpd_reads_them():
    """Each line length about the line bound and each message size about the size limit, in
    one piece and byte by byte: aiosmtpd's replies and content."""
    bodies = [b"y" * n + b"\r\n" for n in range(LINE - 4, LINE + 3)]
    bodies += [b"z" * (n - 2) + b"\r\n" for n in range(SIZE - 3, SIZE + 3)]  # the whole size
    bodies += [b"a\r\n" * ((n - 2) // 3) + b"b" * ((n - 2) % 3) + b"\r\n"
               for n in range(SIZE - 3, SIZE + 3)]

    async def compare() -> None:
        for body in bodies:
            for chunks, end in (
                ([body[:-2]], b"\r\n.\r\n"),  # all but the end
                ([bytes([c]) for c in body[:-2]], b"\r\n.\r\n"),  # byte by byte
                ([], body + b".\r\n"),  # the whole message and its end at once
            ):
                ours = await _session(GatewaySMTP, chunks, end)
                theirs = await _session(_AiosmtpdData, chunks, end)
                assert ours == theirs, (len(body), len(chunks))

    asyncio.run(compare())
