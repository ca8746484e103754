"""A long-lived bind to a carrier (SMPP, CMPP): one per link across a fleet, kept up by the
supervisor, with a send window, keep-alive, and the MO/receipt plumbing both protocols share.

The bind loop runs as ``ctx.leases.exclusive(lease, bind)`` under ``ctx.supervisor`` (loop
``<name>-bind``): only the lease holder connects; a dropped or refused link raises, the
supervisor starts it again with back-off, and the lease is contended anew. A protocol gives the
framing (header size and layout), the login, the keep-alive request, and what to do with each
request the peer sends (``handle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson

from gateway.adapters import AdapterContext
from gateway.channels.sms import common
from gateway.channels.sms.concat import Assembler, Part
from gateway.queueing.coordination import Fence
from gateway.records import EventType

log = logging.getLogger(__name__)


class LinkDown(ConnectionError):
    """The bind is gone (peer closed, timed out, unbound): the supervisor opens a new one."""


class BadFrame(Exception):
    """A header whose length cannot be trusted: the stream cannot be resynchronised."""


Response = tuple[int, int, bytes]
"""(command_id, status, body) of a response."""


class BoundLink(ABC):
    """The protocol-independent half of an SMPP or CMPP adapter."""

    channel = "sms"
    HEADER_SIZE = 16
    MAX_FRAME = 64 * 1024
    REMEMBER_S = 7 * 86400
    """How long a submitted message id is remembered for its delivery receipt."""
    MAX_INFLIGHT = 512
    """MO being made durable at once; a peer that sends more without waiting for answers
    gets the protocol's retry-later answer for the excess instead of unbounded work."""

    def __init__(self, ctx: AdapterContext, *, lease: str, host: str, port: int, window: int,
                 response_timeout: float, keepalive: float, concat_timeout: float) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.lease = lease
        self.host, self.port = host, port
        self.response_timeout = response_timeout
        self.keepalive_s = keepalive
        self.loop_name = f"{ctx.name}-bind"
        data_dir = Path(ctx.settings.gateway.data_dir) / "sms" / ctx.name / "parts"
        self.assembler = Assembler(data_dir, concat_timeout, ctx.clock, self.handover,
                                   state=ctx.state)
        self.assembler.load()
        self.reports = common.DeliveryReports(ctx)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._window = asyncio.Semaphore(max(1, window))
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self.bound = asyncio.Event()
        self.binds = 0
        """Binds made since start (tests, metrics)."""

    # ------------------------------------------------------------------ protocol hooks

    @abstractmethod
    def frame(self, command_id: int, seq: int, body: bytes, status: int = 0) -> bytes: ...

    @abstractmethod
    def header(self, head: bytes) -> tuple[int, int, int, int]:
        """(length, command_id, status, seq) of a header of ``HEADER_SIZE`` octets."""

    @abstractmethod
    async def login(self) -> None:
        """Bind/connect on the open link; raise ``LinkDown`` when refused."""

    @abstractmethod
    async def keepalive(self) -> None:
        """One keep-alive request (enquire_link, CMPP_ACTIVE_TEST)."""

    @abstractmethod
    async def handle(self, command_id: int, seq: int, body: bytes) -> None:
        """A request from the peer (a response to ours never comes here)."""

    @abstractmethod
    def is_response(self, command_id: int) -> bool: ...

    @abstractmethod
    async def bad_length(self, length: int, command_id: int, seq: int) -> None:
        """Called before the link is dropped for a length that cannot be right."""

    @abstractmethod
    async def handover(self, parts: list[Part], complete: bool) -> object:
        """Submit the parts of a long message as one contact."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.assembler.start()
        self.ctx.supervisor.spawn(
            self.loop_name, lambda: self.ctx.leases.exclusive(self.lease, self._bind),
            required=False, backoff=(0.2, 30.0),
        )

    async def stop(self) -> None:
        await self.ctx.supervisor.stop(self.loop_name)
        await self.assembler.stop()
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ the link

    def _next_seq(self) -> int:
        seq = next(self._seq)
        if seq >= 0x7FFFFFFF:
            self._seq = itertools.count(1)
        return seq

    async def write(self, command_id: int, seq: int, body: bytes = b"", status: int = 0) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise LinkDown("not bound")
        writer.write(self.frame(command_id, seq, body, status))
        await writer.drain()

    async def request(self, command_id: int, body: bytes = b"") -> Response:
        """Send one request within the window and wait for its response."""
        async with self._window:
            seq = self._next_seq()
            future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
            self._pending[seq] = future
            try:
                await self.write(command_id, seq, body)
                return await asyncio.wait_for(future, self.response_timeout)
            finally:
                self._pending.pop(seq, None)

    def spawn(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run the answer to one request in the background; False (``work`` dropped) when
        ``MAX_INFLIGHT`` are running already: answer retry-later at once."""
        if len(self._tasks) >= self.MAX_INFLIGHT:
            work.close()
            return False
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _bind(self, fence: Fence) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.response_timeout
        )
        self._writer = writer
        reading = asyncio.get_running_loop().create_task(self._read(reader))
        try:
            await self._first(reading, self.login())
            self.binds += 1
            self.bound.set()
            log.info("%s: bound (fence %d)", self.name, fence.token)
            while True:
                await self._first(reading, asyncio.sleep(self.keepalive_s))
                await self._first(reading, self.keepalive())
        finally:
            self.bound.clear()
            self._writer = None
            reading.cancel()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkDown("bind lost"))
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading

    async def _first(self, reading: asyncio.Task[None], aw: Any) -> Any:
        """Await ``aw`` unless the reader ends first (the link is gone: raise)."""
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task, reading}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        exc = reading.exception() if not reading.cancelled() else None
        raise LinkDown(f"link closed: {exc!r}" if exc else "link closed by the peer")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                head = await reader.readexactly(self.HEADER_SIZE)
            except asyncio.IncompleteReadError:
                return
            length, command_id, status, seq = self.header(head)
            if length < self.HEADER_SIZE or length > self.MAX_FRAME:
                # No way to find the next frame: say why, then drop the link (a new bind follows).
                await self.bad_length(length, command_id, seq)
                log.warning("%s: frame with length %d, link reset", self.name, length)
                return
            try:
                body = await reader.readexactly(length - self.HEADER_SIZE)
            except asyncio.IncompleteReadError:
                return
            if self.is_response(command_id):
                future = self._pending.get(seq)
                if future is not None and not future.done():
                    future.set_result((command_id, status, body))
                continue
            await self.handle(command_id, seq, body)

    # ------------------------------------------------------------------ receipts

    async def remember(self, message_id: str, contact_id: str, reply_ref: str) -> None:
        """Keep which reply a carrier's message id belongs to, for its receipt."""
        with contextlib.suppress(Exception):
            await self.ctx.state.put(f"msg:{message_id.lower()}",
                                     orjson.dumps({"c": contact_id, "r": reply_ref}),
                                     self.REMEMBER_S)

    async def receipt(self, message_id: str, kind: EventType | None,
                      detail: dict[str, Any]) -> bool:
        """Record a receipt; False: not recorded now, answer so that the carrier repeats it."""
        if not message_id or kind is None:
            return True
        try:
            raw = await self.ctx.state.get(f"msg:{message_id.lower()}")
        except Exception as exc:
            log.warning("%s: receipt lookup failed: %s", self.name, exc)
            return False
        if raw is None:
            log.info("%s: receipt for an unknown message id", self.name)
            return True
        ref = orjson.loads(raw)
        return await self.reports.record(ref["c"], ref["r"], kind, detail)
