"""E-mail fixtures: a mailbox on a started gateway, a recording SMTP relay, a test certificate."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from gateway.queueing.embedded import EmbeddedRedis
from gateway.server.runtime import Gateway

MAILBOX = "12345@hotline.example.gov.cn"
FIXTURES = Path(__file__).parent / "fixtures"


def mailbox_config(**overrides: Any) -> dict[str, Any]:
    return {"type": "smtp", "listen": "127.0.0.1:0", "mailboxes": [MAILBOX], **overrides}


StartMailbox = Callable[..., Awaitable[Gateway]]


@pytest.fixture
def start_mailbox(start_gateway: Any) -> StartMailbox:
    """``await start_mailbox(**adapter_overrides, sections={...})``: a gateway with one mailbox."""

    async def start(*, sections: dict[str, Any] | None = None, **overrides: Any) -> Gateway:
        return await start_gateway(  # type: ignore[no-any-return]
            adapters={"mail": mailbox_config(**overrides)}, **(sections or {})
        )

    return start


@dataclass
class Recorded:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    login: bytes | None


@dataclass
class Recorder:
    """An SMTP relay that records what it is given and answers DATA from a script."""

    messages: list[Recorded] = field(default_factory=list)
    script: list[str] = field(default_factory=list)
    attempts: int = 0
    port: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.attempts += 1
        if self.script:
            return self.script.pop(0)
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.messages.append(
            Recorded(envelope.mail_from or "", list(envelope.rcpt_tos),
                     envelope.original_content or b"", login)
        )
        return "250 2.0.0 OK"


def _authenticator(server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                   data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"gw" and data.password == b"s3cret"
    return AuthResult(success=ok, handled=False, auth_data=data if ok else None)


StartRecorder = Callable[..., Awaitable[Recorder]]


@pytest.fixture
async def start_recorder() -> AsyncIterator[StartRecorder]:
    """Start recording relays on loopback: ``await start_recorder(tls=(cert, key), auth=True)``."""
    servers: list[asyncio.Server] = []

    async def start(*, tls: tuple[Path, Path] | None = None, auth: bool = False) -> Recorder:
        recorder = Recorder()
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
        loop = asyncio.get_running_loop()

        def protocol() -> SMTP:
            return SMTP(
                recorder,
                hostname="relay.test",
                tls_context=context,
                require_starttls=context is not None,
                auth_required=auth,
                auth_require_tls=context is not None,
                authenticator=_authenticator if auth else None,
                loop=loop,
            )

        server = await loop.create_server(protocol, "127.0.0.1", 0)
        servers.append(server)
        recorder.port = server.sockets[0].getsockname()[1]
        return recorder

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of this test's own, to stop and restart."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start_sync()
    yield server
    server.stop_sync()
