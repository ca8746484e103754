"""The kit for SMTP adapters: deliveries are SMTP transactions over a real socket.

The acknowledgement is the final reply to DATA: 2xx (the message is durable), 4xx (retry
later: the client keeps it and tries again), 5xx (refused). A redelivery is the same message
again (the same ``Message-ID``), as a client does when the connection broke before it read the
250.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from gateway.testing.contract import Delivery, KitAdapter, Outcome, ProviderAnswer

if TYPE_CHECKING:
    from gateway.server.runtime import Gateway


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    """One SMTP reply (its lines joined); code 0 when the server closed."""
    lines: list[str] = []
    while True:
        line = await reader.readline()
        if not line:
            return 0, " ".join(lines)
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]) if line[:3].isdigit() else 0, " ".join(lines)


def _outcome(code: int) -> Outcome:
    return ("ok" if 200 <= code < 300 else "retry" if 400 <= code < 500
            else "refused" if 500 <= code < 600 else "other")


async def session(port: int, commands: Sequence[bytes], data: bytes | None = None,
                  *, host: str = "127.0.0.1") -> list[tuple[int, str]]:
    """Greeting, then each command line in turn with its reply; with ``data``, DATA and the
    message (dot-stuffed) after them. Stops at the first 4xx/5xx or a closed connection;
    returns every reply, the greeting first."""
    reader, writer = await asyncio.open_connection(host, port)
    replies = [await _reply(reader)]
    try:
        for command in commands:
            writer.write(command + b"\r\n")
            await writer.drain()
            replies.append(await _reply(reader))
            if not 200 <= replies[-1][0] < 400:
                return replies
        if data is not None:
            writer.write(b"DATA\r\n")
            replies.append(await _reply(reader))
            if replies[-1][0] != 354:
                return replies
            body = b"\r\n".join((b"." + line if line.startswith(b".") else line)
                                for line in data.replace(b"\r\n", b"\n").split(b"\n"))
            writer.write(body + b"\r\n.\r\n")
            await writer.drain()
            replies.append(await _reply(reader))
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await _reply(reader)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return replies


@dataclass(frozen=True)
class SmtpKit(KitAdapter):
    """How the kit reaches one SMTP adapter listening on ``port_of(adapter)``.

    ``message(message_id, text)`` is the message delivered (by default a plain UTF-8 mail from
    ``sender`` to ``mailbox`` with ``Message-ID: <message_id@kit.invalid>``). ``bad`` are
    command sequences (after the greeting, without the final QUIT) whose last reply must be a
    5xx, storing nothing: a relay attempt, a syntax error, a message over the size limit...
    ``phone`` is an address or number that must never reach a log (the sender's, by default).
    """

    type: str
    table: Mapping[str, Any]
    mailbox: str
    bad: Sequence[Sequence[bytes]]
    secrets: Sequence[str] = ()
    sender: str = "citizen.kit@example.org"
    phone: str = "citizen.kit@example.org"
    reply_config: Callable[[str], Mapping[str, Any]] | None = None
    reply_answer: ProviderAnswer = field(default_factory=ProviderAnswer)
    name: str = "kit"
    until_ready: Callable[[Gateway], Awaitable[None]] | None = None
    port_of: Callable[[Any], int] = lambda adapter: int(adapter.port)

    def message(self, message_id: str, text: str) -> bytes:
        mail = EmailMessage()
        mail["From"] = self.sender
        mail["To"] = self.mailbox
        mail["Subject"] = text[:20]
        mail["Message-ID"] = f"<{message_id}@kit.invalid>"
        mail["Date"] = "Tue, 01 Dec 2026 08:00:00 +0800"
        mail.set_content(text)
        return mail.as_bytes()

    def port(self, gateway: Gateway) -> int:
        return self.port_of(gateway.adapters[self.name])

    async def deliver(self, gateway: Gateway, message_id: str, text: str) -> Delivery:
        return await self.send_message(gateway, self.message(message_id, text))

    async def send_message(self, gateway: Gateway, raw: bytes) -> Delivery:
        """One transaction from ``sender`` to ``mailbox`` carrying ``raw`` (RFC 5322 bytes)."""
        replies = await session(
            self.port(gateway),
            [b"EHLO client.kit.invalid", f"MAIL FROM:<{self.sender}>".encode(),
             f"RCPT TO:<{self.mailbox}>".encode()],
            raw,
        )
        code, line = replies[-1]
        return Delivery(_outcome(code), f"SMTP {line}")

    async def send_commands(self, gateway: Gateway, commands: Sequence[bytes]) -> Delivery:
        """A session of these command lines; the answer is the last reply's."""
        code, line = (await session(self.port(gateway), commands))[-1]
        return Delivery(_outcome(code), f"SMTP {line}")

    async def refusals(self, gateway: Gateway) -> list[Delivery]:
        return [await self.send_commands(gateway, commands) for commands in self.bad]
