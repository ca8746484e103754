"""A new session copies aiosmtpd's settings from one its constructor built (``_init_like``):
held here to the constructor's own result, attribute by attribute, with no mutable object
shared between sessions (an aiosmtpd upgrade that adds per-session state fails these)."""

from __future__ import annotations

import asyncio
import collections
import types
import weakref
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from gateway.channels.email.common import EmailConfig
from gateway.channels.email.smtp import GatewaySMTP, Handler, Listener
from gateway.server.config import HostPort

MAILBOX = "12345@hotline.example.gov.cn"


async def _accept(raw: bytes, envelope: Any) -> str:
    return "00000000-0000-7000-8000-000000000000"


def _listener(**overrides: Any) -> Listener:
    config = EmailConfig(
        listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,), hostname="mx", **overrides
    )
    return Listener(config, Handler(config, _accept))


def _shape(value: Any, owner: object) -> Any:
    """``value`` as comparable between two sessions: what it is bound to is "this session"
    or not, per-session stream objects by their kind and state."""
    if isinstance(value, types.MethodType):
        return ("bound", value.__func__, "self" if value.__self__ is owner else value.__self__)
    if isinstance(value, collections.defaultdict):
        return ("defaultdict", value.default_factory and value.default_factory(),
                _shape(dict(value), owner))
    if isinstance(value, dict):
        return {k: _shape(v, owner) for k, v in value.items()}
    if isinstance(value, tuple):
        return (type(value), tuple(_shape(v, owner) for v in value))
    if isinstance(value, (list, collections.deque)):
        return (type(value), [_shape(v, owner) for v in value])
    if isinstance(value, weakref.ref):
        return ("weakref", _shape(value(), owner))
    if isinstance(value, asyncio.StreamReader):
        return ("reader", value._limit, bytes(value._buffer))  # type: ignore[attr-defined]
    if isinstance(value, asyncio.Future):
        return ("future", value.done())
    return value


def _configs(certificate: tuple[Path, Path]) -> list[dict[str, Any]]:
    cert, key = certificate
    return [{}, {"tls_cert": cert, "tls_key": key}, {"tls_cert": cert, "tls_key": key,
                                                     "require_tls": True}]


async def test_a_session_is_what_aiosmtpds_constructor_makes(
    certificate: tuple[Path, Path],
) -> None:
    for overrides in _configs(certificate):
        listener = _listener(**overrides)
        built = listener._session(None)  # aiosmtpd's constructor
        copied = listener._session(listener._session(None))
        assert type(copied) is GatewaySMTP
        assert set(vars(copied)) == set(vars(built))
        for name, value in vars(built).items():
            assert _shape(vars(copied)[name], copied) == _shape(value, built), name
        # every command and AUTH mechanism of the class, bound to the session itself
        assert copied._smtp_methods["DATA"] == copied.smtp_DATA
        assert set(copied._smtp_methods) == {
            n[5:] for n in dir(SMTP) + dir(GatewaySMTP) if n.startswith("smtp_")
        }
        for name, mechanism in copied._auth_methods.items():
            assert mechanism.method.__self__ is copied, name


_SHARED = {"event_handler", "loop", "_loop", "_sessions", "_metrics", "tls_context"}
"""What every session of a listener shares on purpose (as aiosmtpd's constructor does)."""
_IMMUTABLE = (str, bytes, int, float, bool, type(None), frozenset, types.FunctionType, type)


async def test_a_session_shares_no_mutable_object_with_the_one_it_copies(
    certificate: tuple[Path, Path],
) -> None:
    for overrides in _configs(certificate):
        listener = _listener(**overrides)
        like = listener._session(None)
        copied = listener._session(like)
        for name, value in vars(copied).items():
            if name in _SHARED or isinstance(value, _IMMUTABLE):
                continue
            assert value is not vars(like).get(name), name
            if isinstance(value, dict):
                for key, item in value.items():  # bound methods: to this session or shared
                    method = getattr(item, "method", item)
                    assert getattr(method, "__self__", None) is not like, (name, key)


async def test_sessions_of_a_listener_answer_as_before() -> None:
    """Several sessions at once over sockets, each its own state (envelope, replies)."""
    listener = _listener()
    await listener.start()
    try:
        async def one(n: int) -> list[bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            replies = [await reader.readline()]
            for command in (b"EHLO c\r\n", f"MAIL FROM:<s{n}@example.org>\r\n".encode(),
                            f"RCPT TO:<{MAILBOX}>\r\n".encode(), b"RCPT TO:<x@elsewhere.org>\r\n",
                            b"DATA\r\n", b"Subject: x\r\n\r\nbody\r\n.\r\n", b"QUIT\r\n"):
                writer.write(command)
                while (line := await reader.readline())[3:4] == b"-":
                    pass
                replies.append(line)
            writer.close()
            return replies

        results = await asyncio.gather(*(one(n) for n in range(3)))
    finally:
        await listener.stop()
    for replies in results:
        assert [r[:3] for r in replies] == [
            b"220", b"250", b"250", b"250", b"550", b"354", b"250", b"221"
        ]


def test_a_listener_started_again_on_another_loop_makes_its_sessions_on_that_loop() -> None:
    """The session copied from is made again on a new loop (its loop is copied with it)."""
    listener = _listener()

    async def greeting() -> bytes:
        await listener.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            # bounded: on the old loop the session never starts and nothing would come
            line = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            assert listener._like is not None
            assert listener._like.loop is asyncio.get_running_loop()
            return line
        finally:
            await listener.stop()

    assert asyncio.run(greeting())[:3] == b"220"
    assert asyncio.run(greeting())[:3] == b"220"  # a new loop
