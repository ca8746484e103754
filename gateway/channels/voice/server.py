"""FastAGI server on asyncio: one session per connection, routed on the script name."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

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
from gateway.server.listeners import start_stream_listener
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


Handler = Callable[[AgiSession], Awaitable[None]]


@dataclass(slots=True)
class _Watch:
    """What the server's sweep needs of one open session."""

    started: float
    """``time.monotonic()`` at accept."""
    stream: AgiStream | None = None
    expired: str = ""
    """Why the sweep cancelled the session: ``session`` or ``idle``; empty while it has not."""


class FastAgiServer:
    """Accepts FastAGI connections and runs the handler named by ``agi_network_script``.

    Every session is bounded: the header block by ``max_header_bytes``, the whole session by
    ``session_timeout`` seconds, each wait for the peer by ``read_timeout``. Whatever happens,
    the socket is closed when the handler returns, since Asterisk continues the dialplan only
    then. The two time bounds are kept by one sweep over the open sessions, every quarter of
    the shorter bound (at most a second), rather than by timers per session and per read
    (an ``asyncio.timeout`` costs a timer set and cancelled, 10-25 us on uvloop, three times
    a session): a bound is enforced up to a quarter of itself late.
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
    ) -> None:
        self.handlers = dict(handlers)
        self.metrics = metrics
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
        self._sessions: dict[asyncio.Task[None], _Watch] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.sessions_total = 0

    async def start(self) -> None:
        """Listen; ``port`` holds the bound port afterwards (``0`` picks a free one)."""
        self._server = await start_stream_listener(
            self._accept, self.host, self.port, limit=self.max_header_bytes, backlog=1024
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received_at = self.clock.now_us()
        if self.allow and not self._allowed(writer):
            writer.close()
            return
        if not self.connections.take():
            writer.close()
            return
        task = asyncio.current_task()
        watch = _Watch(time.monotonic())
        if task is not None:
            self._sessions[task] = watch
        self.sessions_total += 1
        started = self.metrics.session_opened("agi") if self.metrics else 0.0
        try:
            await self._session(reader, writer, received_at, watch)
        except asyncio.CancelledError:
            if not watch.expired or task is None:
                raise  # stopped from outside
            task.uncancel()
            if watch.expired == "idle":
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
            writer.close()
            self.connections.release()
            if task is not None:
                self._sessions.pop(task, None)
            if self.metrics is not None:
                self.metrics.session_closed("agi", started)

    async def _sweep(self) -> None:
        """Cancel the sessions past ``session_timeout``, or silent past ``read_timeout``."""
        bounds = [b for b in (self.session_timeout, self.read_timeout) if b is not None]
        interval = min(1.0, max(0.005, min(bounds) / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for task, watch in list(self._sessions.items()):
                if watch.expired:
                    continue
                waiting = watch.stream.waiting_since if watch.stream is not None else None
                if now - watch.started > self.session_timeout:
                    watch.expired = "session"
                elif (self.read_timeout is not None and waiting is not None
                      and now - waiting > self.read_timeout):
                    watch.expired = "idle"
                else:
                    continue
                task.cancel()

    def _allowed(self, writer: asyncio.StreamWriter) -> bool:
        peer = writer.get_extra_info("peername")
        try:
            address = ipaddress.ip_address(peer[0])
        except (TypeError, ValueError, IndexError):
            return False
        if any(address in net for net in self.allow):
            return True
        log.warning("FastAGI connection from %s refused (not in agi_allow)", address)
        return False

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        received_at: Micros,
        watch: _Watch,
    ) -> None:
        stream = watch.stream = AgiStream(reader)  # its waits bounded by the sweep
        env = await read_header_block(stream, max_bytes=self.max_header_bytes)
        request = env.get("agi_network_script", "")
        name = script_name(request)
        handler = self.handlers.get(name)
        if handler is None:
            log.warning("FastAGI script %r is not served here", name[:64])
            return
        peer = writer.get_extra_info("peername")
        session = AgiSession(
            env=env,
            script=name,
            query=query_params(request),
            args=script_args(env),
            received_at=received_at,
            channel=AgiChannel(stream, writer),
            peer=str(peer[0]) if isinstance(peer, tuple) and peer else "",
        )
        await handler(session)
