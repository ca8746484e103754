"""The SMTP listener: aiosmtpd's protocol on the gateway's own loop, with our policy.

aiosmtpd parses the protocol and enforces SIZE, line length and the idle timeout; the handler
here decides: which recipients are ours (550 for the rest, never an open relay), how many per
message, and answers DATA with 250 only once the contact is durable (451 when it cannot be).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import re
import socket
import ssl
import types
from collections.abc import Callable, Coroutine
from email.utils import formatdate
from typing import Any, AnyStr, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, _AuthMechAttr, _DataState

from gateway.adapters import IntakeUnavailable, InvalidContact, RateLimited
from gateway.channels.email.common import EmailConfig
from gateway.channels.email.normalize import Envelope as MailEnvelope
from gateway.channels.email.normalize import split_mailbox
from gateway.contact.attachments import AttachmentTooLarge
from gateway.server.connguard import ConnectionCount, default_cap
from gateway.server.listeners import create_listener
from gateway.server.metrics import AdapterMetrics

log = logging.getLogger(__name__)

Accept = Callable[[bytes, MailEnvelope], Coroutine[Any, Any, str]]
"""Makes one received message durable and returns its contact id."""


def _domain(name: str) -> str:
    """Compare domains in one form: lower case, ASCII (IDNA) when possible, no final dot."""
    name = name.strip().lower().lstrip("@").rstrip(".")
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def _mailbox(address: str) -> str:
    local, _, domain = split_mailbox(address)[0].rpartition("@")
    return f"{local.lower()}@{_domain(domain)}"


class Policy:
    """Which recipients this listener accepts."""

    def __init__(self, mailboxes: tuple[str, ...], domains: tuple[str, ...]) -> None:
        self.mailboxes = frozenset(_mailbox(m) for m in mailboxes)
        self.domains = frozenset(_domain(d) for d in domains)
        self._answers: dict[str, bool] = {}
        """Addresses asked about lately (the same few recipients come again and again; the
        IDNA codec alone costs ~10 µs a look), forgotten all at once past ``_REMEMBERED``."""

    def accepts(self, address: str) -> bool:
        """True for a configured mailbox (with or without ``+tag``) or an address in a domain."""
        answer = self._answers.get(address)
        if answer is None:
            answer = self._decide(address)
            if len(self._answers) >= _REMEMBERED:
                self._answers.clear()
            self._answers[address] = answer
        return answer

    def _decide(self, address: str) -> bool:
        if "@" not in address:
            return False
        mailbox = _mailbox(address)
        return mailbox in self.mailboxes or mailbox.rpartition("@")[2] in self.domains


_REMEMBERED = 4096


def trace_headers(envelope: MailEnvelope, hostname: str, at_us: int) -> bytes:
    """Return-Path and Received lines for a message delivered here (RFC 5321 4.4)."""
    helo = _TRACE_UNSAFE.sub("", envelope.helo or "unknown")[:100]
    peer = _TRACE_UNSAFE.sub("", envelope.peer or "unknown")[:60]
    peer = f"IPv6:{peer}" if ":" in peer else peer
    protocol = ("UTF8SMTP" if envelope.smtputf8 else "ESMTP") + ("S" if envelope.tls else "")
    stamp = _stamp(at_us // 1_000_000)
    return_path = envelope.mail_from or ""
    return (
        f"Return-Path: <{_TRACE_UNSAFE.sub('', return_path)[:320]}>\r\n"
        f"Received: from {helo} ([{peer}])\r\n\tby {hostname} with {protocol}; {stamp}\r\n"
    ).encode("utf-8", "replace")


_TRACE_UNSAFE = re.compile(r"[\x00-\x20\x7f<>()\[\];]")


@functools.lru_cache(maxsize=4)
def _stamp(second: int) -> str:
    """The RFC 5322 date of a second (formatted once a second, not once a message)."""
    return formatdate(second, usegmt=True)


def masked(address: str) -> str:
    """Hide the local part of an address in logs: ``c***@example.org``."""
    local, at, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain}" if at else "***"


class Handler:
    """aiosmtpd hooks (``handle_<VERB>``): policy and hand-off, no protocol parsing."""

    def __init__(
        self,
        config: EmailConfig,
        accept: Accept,
        busy: Callable[[], bool] | None = None,
        refused: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.policy = Policy(config.mailboxes, config.domains)
        self.accept = accept
        self.busy = busy
        """True while the gateway refuses contacts (overloaded): RCPT is answered 451, so
        the message is not sent (``gateway/server/admission.py``)."""
        self.refused = refused
        self.in_flight: set[asyncio.Task[str]] = set()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # Commands are read and answered strictly in order, and STARTTLS drops buffered input
        # (RFC 3207 4.2): pipelining is safe to announce.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self.policy.accepts(address):
            log.info("smtp: recipient %s refused (not ours)", masked(address))
            return "550 5.7.1 Relaying denied: not a mailbox of this server"
        if self.busy is not None and self.busy():
            if self.refused is not None:
                self.refused()
            return "451 4.3.2 Overloaded, try again later"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        mail_from = envelope.mail_from or ""
        peer: Any = session.peer  # typed str in aiosmtpd, a (host, port) tuple in fact
        env = MailEnvelope(
            mail_from="" if mail_from == "<>" else mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            peer=str(peer[0]) if isinstance(peer, tuple) and peer else None,
            helo=session.host_name,
            smtputf8=bool(envelope.smtp_utf8),
            tls=session.ssl is not None,
        )
        # Shielded: a client that hangs up mid-way must not cut a write to the queue in half.
        task = asyncio.get_running_loop().create_task(self.accept(raw, env))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)
        try:
            contact_id = await asyncio.shield(task)
        except IntakeUnavailable:
            return "451 4.3.0 Queue unavailable, try again later"
        except AttachmentTooLarge:
            return "552 5.3.4 Message too big for the attachment store"
        except RateLimited:
            return "451 4.7.1 Too many messages from this sender, try again later"
        except InvalidContact as exc:  # not retried for ever: the sender gets a bounce
            log.warning("smtp: message from %s refused: %s", peer, exc)
            return "554 5.6.0 Message cannot be taken as a contact"
        except Exception:
            log.exception("smtp: message from %s not accepted", peer)
            return "451 4.3.0 Temporary failure, try again later"
        return f"250 2.0.0 OK queued as {contact_id}"

    async def handle_exception(self, error: Exception) -> str:
        log.warning("smtp: session error %s", type(error).__name__)
        return "451 4.3.0 Temporary error, try again later"


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol with a per-connection line bound and a session time bound."""

    _paused: bool
    _connection_lost: bool
    """asyncio's flow control state (``FlowControlMixin``), read by ``push``."""

    def __init__(
        self,
        handler: Handler,
        *,
        line_length: int,
        max_session_s: float,
        sessions: set[GatewaySMTP],
        metrics: AdapterMetrics | None = None,
        like: GatewaySMTP | None = None,
        **kwargs: Any,
    ) -> None:
        self.line_length_limit = line_length
        self._metrics = metrics
        self._started: float | None = None
        self._sessions = sessions
        # aiosmtpd keeps these limits on the class and grows them per EHLO: keep ours apart.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._max_session_s = max_session_s
        self._session_timer: asyncio.TimerHandle | None = None
        self._idle_due = 0.0
        self._idle_armed = 0.0
        self._replies: list[bytes] = []
        """Replies held to go out with the next (``push``)."""
        if like is None:
            super().__init__(handler, **kwargs)
        else:
            self._init_like(like)

    def _init_like(self, like: GatewaySMTP) -> None:
        """What aiosmtpd's constructor makes, taken from ``like``: a session built by it with
        the same handler and arguments that never connected (``Listener``). The constructor
        finds the handler's hooks, the ``smtp_`` commands and the AUTH mechanisms by
        introspection (``inspect.getmembers``, ``dir``, ``inspect.signature``: ~150 µs, most of
        what a new connection cost us before its greeting); here its settings are copied, the
        tables rebound to this session, and the stream state made new.
        ``tests/channels/email/test_smtp_session_init.py`` holds the result to the
        constructor's own, attribute by attribute, and no mutable object shared."""
        state = vars(self)
        for name, value in vars(like).items():
            state.setdefault(name, value)  # ours (set above) stay this session's own
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=self.loop,
        )
        self._handle_hooks = dict(like._handle_hooks)
        self._smtp_methods = {n: _rebound(m, like, self) for n, m in like._smtp_methods.items()}
        self._auth_methods = {
            name: _AuthMechAttr(_rebound(m.method, like, self), m.is_builtin)
            for name, m in like._auth_methods.items()
        }

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._metrics is not None and self._started is None:
            self._started = self._metrics.session_opened("smtp")
        super().connection_made(transport)
        if self._session_timer is None:
            self._session_timer = self.loop.call_later(self._max_session_s, self._session_expired)

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_timer is not None:
            self._session_timer.cancel()
        self._sessions.discard(self)
        if self._metrics is not None and self._started is not None:
            self._metrics.session_closed("smtp", self._started)
            self._started = None
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        """Send one reply line; counted by its code (``gateway_smtp_replies_total``).

        aiosmtpd echoes some arguments (``502 Could not VRFY <arg>``); an argument holding bytes
        that are not UTF-8 (kept as surrogates) failed to encode and the reply became its
        catch-all 451. Such characters are replaced instead, and so is a bare CR in an echoed
        command (``500 Error: command "X\\r..." not recognized`` was two lines to a client)."""
        if self._metrics is not None:
            code = status[:3]
            self._metrics.smtp_reply(code.decode() if isinstance(code, bytes) else code)
        if isinstance(status, str):
            if "\r" in status:
                status = status.replace("\r", "?")
            reply = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii", "replace")
        else:
            reply = status
        # RFC 2920 (PIPELINING): replies to commands sent in one group may go out as one
        # write. A reply after which the session reads on is held while the next command is
        # already received (a whole line in the reader's buffer: reading it does not wait for
        # the client), and so is every line of a multi-line reply but its last; any other
        # (354, 221, 421, a TLS or AUTH step) sends what is held with it.
        if reply[:4] == b"250-" or (
            reply[:3] in _READS_ON and reply[3:4] == b" " and self._next_line_received()
        ):
            if len(self._replies) < _MOST_HELD:
                self._replies.append(reply + b"\r\n")
                return
        if self._replies:
            self._replies.append(reply + b"\r\n")
            reply = b"".join(self._replies)
            self._replies.clear()
        else:
            reply += b"\r\n"
        self._writer.write(reply)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%r << %r", self.session.peer if self.session else None, reply)
        # ``drain`` raises, yields or waits only on one of these; else it returns at once (a
        # coroutine and two calls a reply for nothing)
        if (
            self._paused
            or self._connection_lost
            or self._writer.transport.is_closing()
            or self._reader.exception() is not None
        ):
            await self._writer.drain()

    def _next_line_received(self) -> bool:
        buffer = getattr(self._reader, "_buffer", None)
        return isinstance(buffer, bytearray) and b"\n" in buffer

    def eof_received(self) -> bool | None:
        # aiosmtpd ends the session here (its coroutine cancelled, the connection closed):
        # replies held for the next are sent first, as aiosmtpd had sent each at once
        self._send_held()
        return super().eof_received()

    def _timeout_cb(self) -> None:
        self._send_held()  # before the idle timeout closes the connection, as above
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _send_held(self) -> None:
        transport = self.transport
        if self._replies and transport is not None and not transport.is_closing():
            cast(asyncio.WriteTransport, transport).write(b"".join(self._replies))
        self._replies.clear()

    def last_word(self, reply: bytes) -> None:
        """Send the replies held, then ``reply`` (a 421), and close the connection."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # uvloop's transports are not asyncio's classes: no isinstance check (one here kept
        # every 421 from being sent under ``gateway serve``)
        cast(asyncio.WriteTransport, transport).write(b"".join([*self._replies, reply]))
        self._replies.clear()
        if self._metrics is not None:
            self._metrics.smtp_reply(reply[:3].decode())
        transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's address parse; an address the standard library's parser trips over is
        a syntax error (501/553) instead of aiosmtpd's catch-all 451, which the client would
        retry: besides its ``HeaderParseError`` that parser raises ``IndexError``
        (``RCPT TO:<``, ``MAIL FROM:<a@``) and ``AttributeError`` (``RCPT TO:<12345@[``)."""
        plain = _PLAIN_PATH.match(arg)
        if plain is not None:  # the common ``<local@domain> PARAMS``, as that parser reads it
            local = plain.group(1).rpartition("@")[0]
            if self.local_part_limit and len(local) > self.local_part_limit:
                return None, None
            return plain.group(1), arg[plain.end() :]
        try:
            return super()._getaddr(arg)
        except Exception:  # whatever the parser raises, the address is not one
            return None, None

    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's ``DATA``, the message read in blocks of whole lines.

        aiosmtpd reads a message line by line (a ``readuntil`` and a debug log call each: about
        a tenth of the listener's time on a 2 KB mail, most of it on a large one). Here the
        lines already received are taken at once, up to the lone dot if it is there, and run
        through the same rules (line length, size limit, transparency); a line too long, a
        message over the limit, or no whole line received yet goes through aiosmtpd's own
        steps, one line at a time. Replies and content are aiosmtpd's, to the byte."""
        if self._decode_data or "DATA" not in self._handle_hooks:
            await super().smtp_DATA(arg)
            return
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reading = _DataReading(self.data_size_limit, self.line_length_limit)
        await self._read_data(reading)
        if reading.state is not _DataState.NOMINAL:
            if reading.state is _DataState.TOO_LONG:
                await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
            else:
                await self.push("552 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        content = b"".join(line[1:] if line[:1] == b"." else line for line in reading.lines)
        reading.lines.clear()
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self, reading: _DataReading) -> None:
        reader = self._reader
        buffer = getattr(reader, "_buffer", None)  # read, never changed, here
        reader_limit = getattr(reader, "_limit", 0)
        fragments: list[bytes] = []
        while self.transport is not None:
            if (
                not fragments
                and reading.state is _DataState.NOMINAL
                and isinstance(buffer, bytearray)
            ):
                if buffer[:3] == b".\r\n":
                    await reader.readexactly(3)
                    return
                end = buffer.find(b"\r\n.\r\n")
                whole = end + 2 if end >= 0 else buffer.rfind(b"\r\n") + 2
                if whole >= 2:  # whole lines received (and the lone dot after them, if found)
                    block = await reader.readexactly(whole + 3 if end >= 0 else whole)
                    reading.take(block[:whole], reader_limit)
                    if end >= 0:
                        return
                    continue
            # aiosmtpd's own step: one line, or a piece of one too long for the reader
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.CancelledError:
                log.info("Connection lost during DATA")
                self._writer.close()
                raise
            except asyncio.LimitOverrunError as exc:
                if reading.state is _DataState.NOMINAL:
                    reading.state = _DataState.TOO_LONG
                reading.lines.clear()
                line = await reader.read(exc.consumed)
            if not fragments and line == b".\r\n":
                return
            reading.count(len(line))
            fragments.append(line)
            if line.endswith(b"\r\n"):
                if reading.state is _DataState.NOMINAL:
                    reading.keep(b"".join(fragments))
                fragments.clear()

    def data_received(self, data: bytes) -> None:
        # aiosmtpd restarts its idle timer on commands only: a large message still arriving
        # would be cut at idle_timeout. Any bytes from the client mean it is not idle.
        self._reset_timeout()
        super().data_received(data)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd's idle timer (``idle_timeout`` from now), moved lazily: the timer armed
        stays while it comes first and looks again when it fires (``_idle_check``), where
        aiosmtpd cancelled it and made a new one for every command and every read."""
        due = self.loop.time() + (duration or self._timeout_duration)
        self._idle_due = due
        handle = self._timeout_handle
        if handle is not None and self._idle_armed <= due and not handle.cancelled():
            return
        if handle is not None:
            handle.cancel()
        self._idle_armed = due
        self._timeout_handle = self.loop.call_at(due, self._idle_check)

    def _idle_check(self) -> None:
        due = self._idle_due
        if due - self.loop.time() > _TIMER_SLACK_S:  # the client was heard since it was armed
            self._idle_armed = due
            self._timeout_handle = self.loop.call_at(due, self._idle_check)
        else:
            self._timeout_cb()

    def _session_expired(self) -> None:
        self.last_word(b"421 4.4.2 Session time limit exceeded\r\n")


_library_sanitized_log = getattr(
    aiosmtpd.smtp.sanitized_log, "__wrapped__", aiosmtpd.smtp.sanitized_log
)
"""aiosmtpd's own function (this module imported again wraps it once, not twice)."""
_LOG_LEVELS: dict[object, int] = {
    logging.Logger.debug: logging.DEBUG,
    logging.Logger.info: logging.INFO,
}


def _sanitized_log(func: Callable[..., None], msg: AnyStr, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's ``sanitized_log`` (its debug and info line of every command), asking the
    logger first: aiosmtpd masks the arguments (a regular expression each) and calls the logger
    whether or not the line is logged, about 9K instructions a command with ``mail.log`` at
    WARNING, as ``Listener.start`` sets it. Logged lines are the library's own."""
    level = _LOG_LEVELS.get(getattr(func, "__func__", None))
    logger = getattr(func, "__self__", None)
    if level is not None and isinstance(logger, logging.Logger) and not logger.isEnabledFor(level):
        return
    _library_sanitized_log(func, msg, *args, **kwargs)


_sanitized_log.__wrapped__ = _library_sanitized_log  # type: ignore[attr-defined]
aiosmtpd.smtp.sanitized_log = _sanitized_log  # read by SMTP._handle_client at each command


def _rebound(method: Any, old: object, new: object) -> Any:
    """``method`` bound to ``new`` instead if it was bound to ``old``; else itself."""
    if getattr(method, "__self__", None) is old:
        return types.MethodType(method.__func__, new)
    return method


_READS_ON = frozenset(
    c.encode() for c in "250 251 252 450 451 452 455 500 501 503 504 530 550 551 552 553 "
    "554 555".split()
)
"""Reply codes after which a session reads the next command (``502`` is left out: aiosmtpd
closes the connection after its ``502 5.5.1 Too many unrecognized commands``)."""

_MOST_HELD = 128
"""Most replies held for one write (a client pipelining many RCPTs)."""

_TIMER_SLACK_S = 0.002
"""A timer may fire this much before its time (the loop's clock in milliseconds)."""

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_PATH = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?=[!-'*-~])|\Z)"
)
"""A path the standard library's address parser (``get_angle_addr``, what aiosmtpd calls, ~0.3 ms
a command) takes as it is: dot-atom local part and domain, then nothing or parameters."""


class _DataReading:
    """What aiosmtpd's ``DATA`` loop keeps: the lines, the bytes counted, the state."""

    __slots__ = ("line_limit", "lines", "size", "size_limit", "state")

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.lines: list[bytes] = []
        self.size = 0
        self.state = _DataState.NOMINAL

    def count(self, size: int) -> None:
        """Count bytes received; past the size limit the message is dropped (552 at its end)."""
        self.size += size
        if self.state is _DataState.NOMINAL and self.size_limit and self.size > self.size_limit:
            self.state = _DataState.TOO_MUCH
            self.lines.clear()

    def keep(self, line: bytes) -> None:
        """A whole line (its CRLF included) while nothing is wrong yet."""
        if len(line) > self.line_limit:
            self.state = _DataState.TOO_LONG
            self.lines.clear()
        else:
            self.lines.append(line)

    def take(self, block: bytes, reader_limit: int) -> None:
        """Whole lines, none of them the lone dot, as aiosmtpd's loop takes them one by one: a
        line longer than the reader's limit comes to it in pieces (LimitOverrunError) and makes
        the message too long; the size is counted first, then the line's length."""
        lines = block.split(b"\r\n")
        lines.pop()  # after the last CRLF
        if (
            (self.size_limit and self.size + len(block) > self.size_limit)
            or max(map(len, lines)) + 2 > min(self.line_limit, reader_limit + 2)
        ):
            for line in lines:  # the rare case, line by line
                if len(line) > reader_limit and self.state is _DataState.NOMINAL:
                    self.state = _DataState.TOO_LONG
                    self.lines.clear()
                self.count(len(line) + 2)
                if self.state is _DataState.NOMINAL:
                    self.keep(line + b"\r\n")
            return
        self.size += len(block)
        self.lines.extend(line + b"\r\n" for line in lines)


class _Busy(asyncio.Protocol):
    """A connection over the listener's cap: 421 and closed (the client retries later)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio subclasses: no isinstance check
        cast(asyncio.Transport, transport).write(
            b"421 4.3.2 Too many connections, try again later\r\n"
        )
        transport.close()


def tls_context(config: EmailConfig) -> ssl.SSLContext | None:
    """Return the server TLS context for STARTTLS, or None without a certificate."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


class Listener:
    """The SMTP server socket; ``port`` is the bound port once started."""

    def __init__(
        self,
        config: EmailConfig,
        handler: Handler,
        metrics: AdapterMetrics | None = None,
        max_connections: int = 0,
    ) -> None:
        self.config = config
        self.handler = handler
        self.metrics = metrics
        self.connections = ConnectionCount(default_cap(max_connections))
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tls = tls_context(config)
        self._sessions: set[GatewaySMTP] = set()
        self._like: GatewaySMTP | None = None
        """The session every new one copies aiosmtpd's settings from (made at the first)."""
        # Once, not per connection: aiosmtpd would call getfqdn() (a DNS lookup) every time.
        self.hostname = config.hostname or socket.getfqdn()

    def _protocol(self) -> asyncio.Protocol:
        self.connections.open = len(self._sessions)
        if not self.connections.take():  # over the cap: refused the SMTP way, at once
            return _Busy()
        if self._like is None or self._like.loop is not asyncio.get_running_loop():
            self._like = self._session(None)  # at the first session (of a loop)
        proto = self._session(self._like)
        self._sessions.add(proto)
        return proto

    def _session(self, like: GatewaySMTP | None) -> GatewaySMTP:
        """A session; ``like`` one built by aiosmtpd's constructor with the same arguments,
        never connected, to copy its settings from (``GatewaySMTP._init_like``)."""
        c = self.config
        return GatewaySMTP(
            self.handler,
            line_length=c.max_line_length + 2,
            max_session_s=float(c.max_session_time),
            sessions=self._sessions,
            metrics=self.metrics,
            like=like,
            data_size_limit=c.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident="intake gateway ESMTP",
            tls_context=self._tls,
            require_starttls=c.require_tls,
            timeout=float(c.idle_timeout),
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> None:
        # aiosmtpd logs every command line and address at INFO: keep addresses out of our logs.
        logging.getLogger("mail.log").setLevel(logging.WARNING)
        self._server = await create_listener(
            self._protocol, self.config.listen.host, self.config.listen.port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let messages being queued finish, then close every session."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        if self.handler.in_flight:
            await asyncio.wait(set(self.handler.in_flight), timeout=30)
        for proto in list(self._sessions):
            proto.last_word(b"421 4.3.2 Service shutting down\r\n")
        self._sessions.clear()
        await server.wait_closed()
