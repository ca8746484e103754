"""The intake write's own connection to Redis: packed batches out, replies read by hiredis.

redis-py reads a pipeline's replies one coroutine call each (its connection, its parser, a
timeout context), and takes a pooled connection per batch (a lock, a readiness check that is
a system call, observability hooks). The intake batches (``RedisQueue.write_batch``) go
instead over one connection of their own: the batch is written as one buffer, and the
replies are parsed by a ``hiredis.Reader`` in the transport's ``data_received`` callback, which
hands the whole batch to its waiting caller at once. Batches in flight share the connection
in order (first sent, first answered).

The connection itself is made by redis-py (``pool.make_connection()`` and ``connect()``), so
the URL's TLS, user and password, database, a Sentinel master's lookup and the handshake are
exactly the client's; only its transport's protocol is replaced once it is ready.

With ``redis.min_replicas`` the batches keep their pooled connections: a ``WAIT`` blocks the
connection it was sent on until the replicas answer, and batches pipelined behind it would
wait in turn instead of side by side.

Failures keep the semantics of the pooled path: a reply that is a server error is a value
(``ResponseError`` and its kinds, ``NoScriptError`` included); a connection-level error
reply (``LOADING``, ``NOAUTH``...), a lost connection or no reply within the connection's
socket timeout fail the whole batch, and the connection is closed, so every batch still in
flight on it fails too (its outcome unknown: Intake spools it and the dedupe key makes the
replay a no-op where the write landed). The next batch opens a new connection. A caller that
gives up (its batch's ``write_timeout``) fails only its own batch: the link stays open, and
that batch's replies are read and dropped when they come.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

log = logging.getLogger(__name__)

_MORE = object()
"""What ``hiredis.Reader.gets`` answers while a reply is not complete."""
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
"""``usable``'s flags, combined once (each ``|`` of the two ``IntFlag`` members is three
Python calls of ``enum``: about 1 us a batch sent while the link was idle)."""

Answer = Callable[[list[Any] | None, Exception | None], None]
"""Where a batch's outcome goes (``Link.start``): ``(replies, None)`` once they have all come,
error replies as values, or ``(None, error)`` when its outcome is unknown. Called once, from
the link's callbacks (never from ``start`` itself); it must not raise."""


class Link(asyncio.Protocol):
    """One connection for pipelined command batches (see the module's docstring)."""

    def __init__(self, conn: Any, transport: asyncio.Transport, read_timeout: float) -> None:
        self._conn = conn
        self.transport = transport
        self.read_timeout = read_timeout
        self._old: asyncio.BaseProtocol | None = None
        self._reader = hiredis.Reader(replyError=BaseParser.parse_error, notEnoughData=_MORE)
        self._loop = asyncio.get_running_loop()
        """Kept: on Python 3.11 each ``asyncio.get_running_loop()`` is a ``getpid`` system
        call (its check that the process has not forked)."""
        self._waiting: collections.deque[tuple[int, list[Any], Answer, float]] = (
            collections.deque()
        )
        """Batches sent and not fully answered, in order: their command count, the replies
        read so far, where their outcome goes and when the batch was sent (the loop's
        clock)."""
        self._watch: asyncio.TimerHandle | None = None
        """The one timer that enforces ``read_timeout``: due when the oldest batch waiting
        was sent plus ``read_timeout`` (or earlier), armed while batches wait."""
        pool = getattr(conn, "connection_pool", None)
        self._sentinel_master = bool(getattr(pool, "is_master", False))
        """A Sentinel master's connection: ``READONLY`` means it was demoted (redis-py's
        ``SentinelManagedConnection`` disconnects then, so the next one asks Sentinel)."""
        self.closed = False
        self._peek: socket.socket | None = None
        """A duplicate of the plain socket's descriptor, for ``usable``'s peek (None on TLS,
        where the socket's bytes are records, or where there is no socket to reach)."""
        raw = transport.get_extra_info("socket")
        if raw is not None and transport.get_extra_info("sslcontext") is None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                self._peek = socket.fromfd(raw.fileno(), raw.family, raw.type)

    def usable(self) -> bool:
        """False when closed, or when no batch is in flight and the server has closed the
        connection (or sent bytes nobody asked for) before the event loop has seen it: one
        non-blocking peek, as redis-py's pool checks a connection before use. The link is
        then closed, and the caller opens a new one instead of failing a batch that was
        never run (a server's ``timeout``, a restart, CLIENT KILL). Only while idle: a
        system call a batch at low rates, none while batches follow each other."""
        if self.closed:
            return False
        if self._waiting or self._peek is None:
            return True
        try:
            self._peek.recv(1, _PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: the connection is as it was
        except OSError:
            pass
        self.close()  # end of stream, an error, or bytes out of step
        return False

    @classmethod
    async def open(cls, pool: Any) -> Link | None:
        """A new connection made by ``pool``'s redis-py connection class; None when its
        transport cannot be taken over (then the caller keeps the pooled path)."""
        conn = pool.make_connection()
        try:
            await conn.connect()
        except BaseException:  # refused, or the batch's deadline came first: nothing left open
            closer = getattr(conn, "_close", None)
            if closer is not None:
                closer()
            raise
        transport = getattr(getattr(conn, "_writer", None), "transport", None)
        if transport is None or not hasattr(transport, "set_protocol"):
            await conn.disconnect(nowait=True)
            return None
        link = cls(conn, transport, float(getattr(conn, "socket_timeout", None) or 5.0))
        link._old = transport.get_protocol()
        transport.set_protocol(link)
        return link

    async def send(self, payload: bytes, count: int) -> list[Any]:
        """Write ``payload`` (``count`` packed commands) and return its ``count`` replies,
        error replies as values; raise for the batch when its outcome is unknown.

        A caller that gives up (its batch's deadline) has its wait cancelled: its replies,
        which still come in order, are read and dropped; the link stays open for the batches
        behind it, each under its own deadline. (Closing it then failed every batch in flight
        whenever one was late: under load, a spool storm.)"""
        future: asyncio.Future[list[Any]] = self._loop.create_future()
        self.start(payload, count, functools.partial(_settle, future))
        return await future

    def start(self, payload: bytes, count: int, answer: Answer) -> None:
        """Write ``payload`` (``count`` packed commands) now, without a wait: ``answer`` gets
        its outcome once it is known, from the link's own callbacks (the replies' bytes
        arriving, the read timeout, the connection's end), with no task or future between
        (``send`` awaits it; Intake's batch of one is written from its submitter's own step:
        ``RedisQueue.start_batch``). Raise, with ``answer`` never called, when the link is
        closed or the write fails (the link is closed then)."""
        if self.closed:
            raise RedisConnectionError("Connection closed by server.")
        sent = self._loop.time()
        self._waiting.append((count, [], answer, sent))
        if self._watch is None:  # else it is due by the oldest batch's bound, earlier
            self._watch = self._loop.call_at(sent + self.read_timeout, self._check)
        try:
            self.transport.write(payload)
        except BaseException:
            self._waiting.pop()  # nobody will answer it: the caller has the error
            self.close()
            raise

    def _answer(self, answer: Answer, replies: list[Any]) -> None:
        """A batch's replies have all come: what redis-py's ``read_response`` raises instead of
        returning fails the batch (and closes the link: the connection's, not the batch's
        errors); server errors that concern a command are values."""
        error: Exception | None = None
        for reply in replies:
            if isinstance(reply, Exception):
                if not isinstance(reply, ResponseError):  # LOADING, NOAUTH...: the connection's
                    error = reply
                    break
                if self._sentinel_master and isinstance(reply, ReadOnlyError):
                    error = RedisConnectionError("The previous master is now a slave")
                    break
            elif type(reply) is list and reply and isinstance(reply[0], RedisConnectionError):
                error = reply[0]
                break
        if error is None:
            _call(answer, replies, None)
            return
        self.close()
        _call(answer, None, error)

    def _check(self) -> None:
        """``read_timeout``: the oldest batch waiting has had no whole answer for that long
        (replies come in order, so no batch behind it has either): it and every batch behind
        it fail with ``TimeoutError``, and the link is closed. Otherwise the timer is
        set again for the batch now oldest: one timer a ``read_timeout`` while batches
        follow each other, instead of a timer set and cancelled for every batch (a libuv
        timer each on uvloop, about 10 us with ``asyncio.timeout``)."""
        self._watch = None
        if self.closed or not self._waiting:
            return
        loop = self._loop
        due = self._waiting[0][3] + self.read_timeout
        if loop.time() < due:
            self._watch = loop.call_at(due, self._check)
            return
        # every batch waiting fails as late, the oldest's and those behind it alike: a
        # stalled server, not a lost connection (``RedisQueue.execute`` resends reads on a
        # lost connection only: here they would wait as long again)
        waiting, self._waiting = self._waiting, collections.deque()
        self.close()
        error = TimeoutError(f"no reply from Redis in {self.read_timeout} s")
        for _, _, answer, _ in waiting:
            _call(answer, None, error)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while waiting:
                reply = reader.gets()
                if reply is _MORE:
                    return
                count, replies, answer, _ = waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    waiting.popleft()
                    self._answer(answer, replies)
                    if self.closed:  # a connection's error reply: every batch behind it failed
                        return
        except hiredis.ProtocolError as exc:
            self._fail(RedisConnectionError(f"Protocol error from Redis: {exc}"))
            return
        if reader.has_data():  # bytes nobody asked for: the stream is out of step
            self._fail(RedisConnectionError("Redis sent a reply nobody waited for"))

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(
            "Connection closed by server." if exc is None else f"Connection lost: {exc}"
        ))
        old, self._old = self._old, None
        if old is not None:  # redis-py's stream protocol, so its streams see the end too
            old.connection_lost(exc)

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        self.close()
        for _, _, answer, _ in waiting:
            _call(answer, None, error)

    def close(self) -> None:
        """Close the connection; every batch still waiting on it fails."""
        if self.closed:
            return
        self.closed = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        self.transport.close()
        peek, self._peek = self._peek, None
        if peek is not None:
            peek.close()  # the duplicate descriptor only
        closer = getattr(self._conn, "_close", None)
        if closer is not None:  # redis-py's own silent close: its streams let go
            closer()
        if self._waiting:
            self._fail(RedisConnectionError("Connection closed"))


def _call(answer: Answer, replies: list[Any] | None, error: Exception | None) -> None:
    """An answer that raises (a defect) is logged, not raised into the transport's callback,
    where it would end the connection and every batch on it."""
    try:
        answer(replies, error)
    except Exception:
        log.exception("intake link: a batch's answer failed")


def _settle(
    future: asyncio.Future[list[Any]], replies: list[Any] | None, error: Exception | None
) -> None:
    """``Link.send``'s answer: its caller's future (left alone once the caller gave up)."""
    if future.done():
        return
    if error is not None or replies is None:
        future.set_exception(error or RuntimeError("a batch without replies"))
    else:
        future.set_result(replies)


class Lane:
    """A ``Link`` of one's own, opened at first use and again once it is closed or found
    unusable; concurrent callers wait for the one connection (``RedisQueue`` keeps two: the
    intake batches' and ``execute``'s)."""

    def __init__(self) -> None:
        self.link: Link | None = None
        self._opening = asyncio.Lock()

    def ready(self) -> Link | None:
        """The lane's link when it is open and usable, without a wait (the common case: no
        coroutine to await a batch); None: ``get`` it."""
        own = self.link
        return own if own is not None and own.usable() else None

    async def get(self, pool: Any) -> Link | None:
        """The lane's link, usable; None when ``pool``'s connection class cannot be taken
        over (``Link.open``: the caller keeps the pooled path)."""
        own = self.ready()
        if own is not None:
            return own
        async with self._opening:
            own = self.link
            if own is None or own.closed:
                own = self.link = await Link.open(pool)
            return own

    def close(self) -> None:
        own, self.link = self.link, None
        if own is not None:
            own.close()
