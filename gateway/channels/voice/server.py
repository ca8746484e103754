"""FastAGI server on asyncio: one session per connection, routed on the script name."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from gateway.channels.voice.agi import (
    MAX_HEADER_BYTES,
    AgiChannel,
    AgiClosed,
    AgiError,
    AgiIdle,
    AgiStream,
    query_params,
    read_header_block,
    script_args,
    script_name,
)
from gateway.contact.clock import Clock, Micros
from gateway.server.connguard import ConnectionCount, default_cap
from gateway.server.listeners import create_listener
from gateway.server.metrics import AdapterMetrics

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AgiSession:
    """One FastAGI call: its headers, routing facts and the command channel."""

    env: dict[str, str]
    script: str
    query: dict[str, str]
    args: list[str]
    received_at: Micros
    channel: AgiChannel
    peer: str = ""
    connection: _Connection | None = field(default=None, repr=False)

    def within(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        """``asyncio.timeout(seconds)`` for a step of the session (TimeoutError when it runs
        longer), kept by the server's sweep instead of a timer of its own: up to a quarter
        of the server's shortest bound late (``FastAgiServer.step_timeout``)."""
        if self.connection is None:
            return asyncio.timeout(seconds)
        return _Step(self.connection, seconds)


class _Step:
    """``AgiSession.within``: the sweep cancels the session's task once ``step_until`` has
    passed (``expired = "step"``), and leaving the block turns that cancellation into
    ``TimeoutError``, as ``asyncio.timeout`` does."""

    __slots__ = ("conn", "seconds")

    def __init__(self, conn: _Connection, seconds: float) -> None:
        self.conn = conn
        self.seconds = seconds

    async def __aenter__(self) -> None:
        self.conn.step_until = time.monotonic() + self.seconds

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        conn = self.conn
        conn.step_until = 0.0
        if conn.expired != "step":
            return
        conn.expired = ""
        if conn.task is not None and conn.task.uncancel() == 0 and kind is not None and (
            issubclass(kind, asyncio.CancelledError)
        ):
            raise TimeoutError from exc


Handler = Callable[[AgiSession], Awaitable[None]]


class _Connection(AgiStream, asyncio.Protocol):
    """One FastAGI connection as a bare protocol: the transport appends what it delivers to
    the receive buffer the AGI parsers read (``AgiStream``), commands are written to the
    transport, and the server's sweep reads when it started and since when it waits.

    It replaces ``asyncio.start_server``'s streams (a ``StreamReader``, its protocol and a
    ``StreamWriter`` per connection, each read copied out of the reader's buffer into ours):
    the same session on a bare protocol costs about two thirds of the CPU (bench: a bare
    server reading the header block, 59 against 37 us a connection on uvloop).
    """

    __slots__ = (
        "_eof", "_error", "_lost", "_paused", "_resumed", "_waiter", "expired", "received_at",
        "server", "started", "step_until", "task", "transport",
    )

    def __init__(self, server: FastAgiServer) -> None:
        super().__init__(None)
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.received_at: Micros = 0
        self.started = 0.0
        """``time.monotonic()`` at accept."""
        self.expired = ""
        """Why the sweep cancelled the session: ``session``, ``idle`` or ``step`` (a bound set
        with ``AgiSession.within``); empty while it has not."""
        self.step_until = 0.0
        """``time.monotonic()`` by which the step under way must end (0: none)."""
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._error: BaseException | None = None
        self._lost = False
        self._paused = False
        """Reading paused: more than ``_HIGH_WATER`` bytes wait in the buffer unread."""
        self._resumed: asyncio.Future[None] | None = None
        """Set while a write waits for the transport's buffer to drain."""

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass
        self.server._opened(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # a peer that floods between commands is not read on
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # as a StreamReaderProtocol: the socket stays open for our last writes

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        resumed = self._resumed
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def pause_writing(self) -> None:
        if self._resumed is None or self._resumed.done():
            self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        resumed = self._resumed
        if resumed is not None and not resumed.done():
            resumed.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------------ AgiStream, AgiWriter

    async def fill(self) -> bool:
        """Wait for the peer's next bytes (already in ``buffer`` when this returns True);
        False at EOF. The sweep bounds the wait (``waiting_since``)."""
        if self._paused and self.transport is not None:
            self._paused = False  # the reader wants more: the buffer holds no full line
            self.transport.resume_reading()
        size = len(self.buffer)
        self.waiting_since = time.monotonic()
        try:
            while len(self.buffer) == size and not self._ended():
                self._waiter = self.server.loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            self.waiting_since = None
        if len(self.buffer) > size:
            return True
        if self._error is not None:
            raise self._error
        return False

    def _ended(self) -> bool:
        return self._eof or self._error is not None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._lost:
            self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        resumed = self._resumed
        if resumed is not None and not resumed.done():
            await resumed
            if self._lost:
                raise ConnectionResetError("connection lost")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""


_HIGH_WATER = 2 * 65536
"""Unread bytes past which the connection stops reading from the socket until the session
reads again (twice the longest reply line: a peer cannot make us hold more)."""


class FastAgiServer:
    """Accepts FastAGI connections and runs the handler named by ``agi_network_script``.

    Every session is bounded: the header block by ``max_header_bytes``, the whole session by
    ``session_timeout`` seconds, each wait for the peer by ``read_timeout``. Whatever happens,
    the socket is closed when the handler returns, since Asterisk continues the dialplan only
    then. The two time bounds, and a handler's bound on a step (``AgiSession.within``: the
    intake's), are kept by one sweep over the open sessions, every quarter of the shortest
    bound (at most a second), rather than by timers per session, per read and per step (an
    ``asyncio.timeout`` costs a timer set and cancelled, about 5 us on uvloop, four times a
    session): a bound is enforced up to a quarter of the shortest late.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        host: str,
        port: int,
        clock: Clock,
        *,
        session_timeout: float = 10.0,
        read_timeout: float | None = None,
        max_header_bytes: int = MAX_HEADER_BYTES,
        allow: tuple[str, ...] = (),
        metrics: AdapterMetrics | None = None,
        max_connections: int = 0,
        step_timeout: float | None = None,
        busy: Callable[[], bool] | None = None,
        refused: Callable[[], None] | None = None,
    ) -> None:
        self.handlers = dict(handlers)
        self.busy = busy
        """True while the gateway refuses contacts (overloaded): a new connection is closed
        before its header block is read, and the dialplan's fail path queues the call
        (``gateway/server/admission.py``)."""
        self.refused = refused
        self.step_timeout = step_timeout
        """The shortest bound handlers set with ``AgiSession.within`` (the intake's
        ``intake_timeout``): the sweep runs often enough for it too."""
        self.metrics = metrics
        self._counts = metrics.sessions("agi") if metrics is not None else None
        self.host = host
        self.port = port
        self.clock = clock
        self.session_timeout = session_timeout
        self.read_timeout = read_timeout
        """Longest silence of the peer (header block, each reply) before the session ends."""
        self.max_header_bytes = max_header_bytes
        self.allow = tuple(ipaddress.ip_network(net, strict=False) for net in allow)
        """FastAGI has no authentication: when set, only these peers are served."""
        self.connections = ConnectionCount(default_cap(max_connections))
        """Open sessions against ``[limits] max_connections``: over it a connection is closed
        at once, before its header block is read (the dialplan's fail path queues the call)."""
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop
        """The loop it serves on (set by ``start``), kept: on Python 3.11 each
        ``asyncio.get_running_loop()`` is a ``getpid`` system call, and a session took three."""
        self._sessions: dict[asyncio.Task[None], _Connection] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.sessions_total = 0

    async def start(self) -> None:
        """Listen; ``port`` holds the bound port afterwards (``0`` picks a free one)."""
        self.loop = asyncio.get_running_loop()
        self._server = await create_listener(
            lambda: _Connection(self), self.host, self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep(), name="fastagi-sweep")
        log.info("FastAGI listening on %s:%d", self.host, self.port)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let running sessions finish for ``grace`` seconds, then cancel them."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        pending = set(self._sessions)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        if server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    def _opened(self, conn: _Connection) -> None:
        """A connection was accepted: refused at once (``agi_allow``, the cap, the gateway
        overloaded), else its session runs in a task of its own."""
        conn.received_at = self.clock.now_us()
        if self.allow and not self._allowed(conn):
            conn.close()
            return
        if self.busy is not None and self.busy():
            if self.refused is not None:
                self.refused()
            conn.close()
            return
        if not self.connections.take():
            conn.close()
            return
        conn.started = time.monotonic()
        task = conn.task = self.loop.create_task(self._run(conn))
        self._sessions[task] = conn

    async def _run(self, conn: _Connection) -> None:
        task = conn.task
        self.sessions_total += 1
        counts = self._counts
        started = counts.opened() if counts is not None else 0.0
        try:
            await self._session(conn)
        except asyncio.CancelledError:
            if not conn.expired or task is None:
                raise  # stopped from outside
            task.uncancel()
            if conn.expired == "idle":
                log.warning("FastAGI session closed: peer sent nothing for %gs",
                            self.read_timeout)
            else:
                log.warning("FastAGI session exceeded %.1fs; closed", self.session_timeout)
        except AgiClosed:
            log.debug("FastAGI peer closed early")
        except AgiIdle as exc:
            log.warning("FastAGI session closed: %s", exc)
        except AgiError as exc:
            log.warning("FastAGI protocol error: %s", exc)
        except (ConnectionError, OSError) as exc:
            log.info("FastAGI connection lost: %s", exc)
        except Exception:
            log.exception("FastAGI session failed")
        finally:
            conn.close()
            self.connections.release()
            if task is not None:
                self._sessions.pop(task, None)
            if counts is not None:
                counts.closed(started)

    async def _sweep(self) -> None:
        """Cancel the sessions past ``session_timeout``, or silent past ``read_timeout``."""
        bounds = [
            b for b in (self.session_timeout, self.read_timeout, self.step_timeout)
            if b is not None
        ]
        interval = min(1.0, max(0.005, min(bounds) / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for task, conn in list(self._sessions.items()):
                if conn.expired:
                    continue
                waiting = conn.waiting_since
                if now - conn.started > self.session_timeout:
                    conn.expired = "session"
                elif (self.read_timeout is not None and waiting is not None
                      and now - waiting > self.read_timeout):
                    conn.expired = "idle"
                elif conn.step_until and now > conn.step_until:
                    conn.expired = "step"
                else:
                    continue
                task.cancel()

    def _allowed(self, conn: _Connection) -> bool:
        assert conn.transport is not None
        peer = conn.transport.get_extra_info("peername")
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if any(address in net for net in self.allow):
            return True
        log.warning("FastAGI connection from %s refused (not in agi_allow)", address)
        return False

    async def _session(self, conn: _Connection) -> None:
        env = await read_header_block(conn, max_bytes=self.max_header_bytes)
        request = env.get("agi_network_script", "")
        name = script_name(request)
        handler = self.handlers.get(name)
        if handler is None:
            log.warning("FastAGI script %r is not served here", name[:64])
            return
        session = AgiSession(
            env=env,
            script=name,
            query=query_params(request),
            args=script_args(env),
            received_at=conn.received_at,
            channel=AgiChannel(conn, conn),
            peer=conn.peer(),
            connection=conn,
        )
        await handler(session)
