"""A long-lived bind to a carrier (SMPP, CMPP): one per link across a fleet, kept up by the
supervisor, with a send window, keep-alive, and the MO/receipt plumbing both protocols share.

The bind loop runs as ``ctx.leases.exclusive(lease, bind)`` under ``ctx.supervisor`` (loop
``<name>-bind``): only the lease holder connects; a dropped or refused link raises, the
supervisor starts it again with back-off, and the lease is contended anew. A protocol gives the
framing (header size and layout), the login, the keep-alive request, and what to do with each
request the peer sends (``handle``). The link takes MO the same way for both: a part of a long
message goes to the assembler, a whole one to Intake (``take_mo``), and a protocol only says how
its user data decodes (``decode_run``). ``LinkConfig`` holds the settings both share.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from abc import ABC, abstractmethod
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson

from gateway.adapters import AdapterContext, IntakeUnavailable, SendError
from gateway.channels.common import cancel_all
from gateway.channels.sms import common
from gateway.channels.sms.concat import Assembler, Concat, Part, assembled_id, group_key
from gateway.contact.phone import mask_phone
from gateway.queueing.coordination import Fence
from gateway.records import EventType, Inbound, Sender, clean_text
from gateway.server.config import ConfigError, Duration

log = logging.getLogger(__name__)


class Malformed(ValueError):
    """A body that does not hold what its command needs (a field runs past the end)."""


@dataclass(frozen=True, slots=True)
class Framing:
    """The header both protocols put before every body, big-endian 32-bit words: length
    (header included), command id, (SMPP only) command status, sequence number."""

    with_status: bool
    struct: struct.Struct = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "struct", struct.Struct(">IIII" if self.with_status else ">III"))

    @property
    def size(self) -> int:
        return self.struct.size

    def encode(self, command_id: int, seq: int, body: bytes = b"", status: int = 0) -> bytes:
        words = (command_id, status, seq) if self.with_status else (command_id, seq)
        return self.struct.pack(self.size + len(body), *words) + body

    def decode(self, head: bytes) -> tuple[int, int, int, int]:
        """(length, command_id, status, seq); status 0 where the protocol has none."""
        if self.with_status:
            length, command_id, status, seq = self.struct.unpack(head)
            return length, command_id, status, seq
        length, command_id, seq = self.struct.unpack(head)
        return length, command_id, 0, seq


class Cursor:
    """Reads the fields of one body in order; every overrun raises ``Malformed``."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise Malformed(f"body ends {self.pos + n - len(self.data)} octets early")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """What every carrier link's ``[adapters.NAME]`` has (defaults per protocol)."""

    host: str = ""
    port: int = 0
    window: int = 10
    """Requests sent and not yet answered, at most."""
    response_timeout: Duration = Duration(10)
    region: str = "CN"
    """Where a sender's national number is read (ISO 3166 code; docs/adapters.md)."""
    max_segments: int = 10
    concat_timeout: Duration = Duration(60)


def link_errors(config: LinkConfig, key: str, max_window: int, hint: str = "") -> list[
        tuple[str, str]]:
    """The problems of the shared settings (``ConfigError`` pairs)."""
    errors: list[tuple[str, str]] = []
    if not config.host:
        errors.append((f"{key}.host", "required"))
    if not 1 <= config.window <= max_window:
        errors.append((f"{key}.window", f"between 1 and {max_window}{hint}"))
    return errors


def raise_errors(errors: list[tuple[str, str]]) -> None:
    if errors:
        raise ConfigError(errors)


class LinkDown(ConnectionError):
    """The bind is gone (peer closed, timed out, unbound): the supervisor opens a new one."""


class BadFrame(Exception):
    """A header whose length cannot be trusted: the stream cannot be resynchronised."""


Response = tuple[int, int, bytes]
"""(command_id, status, body) of a response."""


class BoundLink(ABC):
    """The protocol-independent half of an SMPP or CMPP adapter."""

    channel = "sms"
    provider: ClassVar[str]
    """``meta.provider`` of the contacts (``smpp``, ``cmpp``)."""
    framing: ClassVar[Framing]
    MAX_FRAME = 64 * 1024
    REMEMBER_S = 7 * 86400
    """How long a submitted message id is remembered for its delivery receipt."""
    MAX_INFLIGHT = 512
    """MO being made durable at once; a peer that sends more without waiting for answers
    gets the protocol's retry-later answer for the excess instead of unbounded work."""

    def __init__(self, ctx: AdapterContext, config: LinkConfig, *, lease: str,
                 keepalive: Duration) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.link_config = config
        self.lease = lease
        self.host, self.port = config.host, config.port
        self.response_timeout = float(config.response_timeout)
        self.keepalive_s = float(keepalive)
        self.loop_name = f"{ctx.name}-bind"
        data_dir = Path(ctx.settings.gateway.data_dir) / "sms" / ctx.name / "parts"
        self.assembler = Assembler(data_dir, float(config.concat_timeout), ctx.clock,
                                   self.handover, state=ctx.state)
        self.assembler.load()
        self.reports = common.DeliveryReports(ctx)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._window = asyncio.Semaphore(max(1, config.window))
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._remembering: dict[str, asyncio.Future[None]] = {}
        """Message ids being stored by ``remember`` (their receipts may come first)."""
        self.bound = asyncio.Event()
        self.binds = 0
        """Binds made since start (tests, metrics)."""

    # ------------------------------------------------------------------ protocol hooks

    @property
    def HEADER_SIZE(self) -> int:
        return self.framing.size

    def frame(self, command_id: int, seq: int, body: bytes, status: int = 0) -> bytes:
        return self.framing.encode(command_id, seq, body, status)

    def header(self, head: bytes) -> tuple[int, int, int, int]:
        """(length, command_id, status, seq) of a header of ``HEADER_SIZE`` octets."""
        return self.framing.decode(head)

    @abstractmethod
    def decode_run(self, data: bytes, charset: str) -> tuple[str, str]:
        """(text, codec used) of user data in the protocol's coding ``charset`` (as kept in
        a ``Part``: the data_coding or Msg_Fmt number)."""

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
        await cancel_all(self._tasks)

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
                async with asyncio.timeout(self.response_timeout):  # not wait_for (3.11)
                    return await future
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
        async with asyncio.timeout(self.response_timeout):
            reader, writer = await asyncio.open_connection(self.host, self.port)
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

    # ------------------------------------------------------------------ MO

    async def take_mo(self, *, received_at: int, sender: str, recipient: str,
                      external_id: str, concat: Concat | None, data: bytes, charset: str,
                      meta: dict[str, Any]) -> bool:
        """Make one MO durable: a part of a long message in the assembler, a whole message
        through Intake. False: not durable, answer the protocol's retry-later."""
        if concat is not None and concat.total > 1:
            part = Part(
                group=group_key(sender, recipient, concat), seq=concat.seq, total=concat.total,
                external_id=external_id, data=data, charset=charset,
                received_at=received_at, origin_at=None, sender=sender, recipient=recipient,
                meta={"ref": concat.ref},
            )
            try:
                await self.assembler.add(part)
            except OSError as exc:
                log.error("%s part from %s not stored: %s", self.provider, mask_phone(sender),
                          exc)
                return False
            return True
        text, used = self.decode_run(data, charset)
        inbound = Inbound(
            channel="sms", adapter=self.name, external_id=external_id, sender=Sender(sender),
            recipient=recipient, received_at=received_at, text=clean_text(text),
            meta={"provider": self.provider, "decoded_as": used, **meta},
        )
        try:
            await self.ctx.intake.submit(inbound)
        except IntakeUnavailable:
            log.warning("%s MO from %s refused: intake unavailable", self.provider,
                        mask_phone(sender))
            return False
        return True

    async def handover(self, parts: list[Part], complete: bool) -> object:
        """Submit the parts of a long message as one contact (runs of one coding decoded
        together: a character may straddle two parts)."""
        texts, used = [], []
        for charset, run in itertools.groupby(parts, key=lambda p: p.charset):
            text, codec = self.decode_run(b"".join(p.data for p in run), charset)
            texts.append(text)
            used.append(codec)
        first = parts[0]
        inbound = Inbound(
            channel="sms", adapter=self.name, external_id=assembled_id(parts),
            sender=Sender(first.sender), recipient=first.recipient,
            received_at=min(p.received_at for p in parts), text=clean_text("".join(texts)),
            meta={
                "provider": self.provider,
                "decoded_as": used[0] if len(set(used)) == 1 else used,
                "concat": {"ref": first.meta.get("ref"), "total": first.total,
                           "parts": [p.seq for p in parts]},
                "incomplete": not complete,
            },
        )
        return await self.ctx.intake.submit(inbound)

    # ------------------------------------------------------------------ outbound

    def sendable(self, count: int) -> None:
        """Raise ``SendError`` when a reply of ``count`` segments cannot go out now."""
        limit = self.link_config.max_segments
        if count > limit:
            raise SendError(f"reply needs {count} segments (max_segments {limit})",
                            retryable=False)
        if not self.bound.is_set():
            raise SendError(f"{self.provider} link not bound on this instance", retryable=True,
                            retry_after_s=5)

    # ------------------------------------------------------------------ receipts

    async def remember(
        self, message_id: str, contact_id: str, reply_ref: str, *aliases: str
    ) -> None:
        """Keep which reply a carrier's message id belongs to, for its receipt; ``aliases``:
        other forms of the id a receipt may carry (SMPP's decimal form of a hex id). Every
        form is marked as being stored before the first is written, so a receipt that comes
        right behind the submit's answer waits for whichever form it carries."""
        loop = asyncio.get_running_loop()
        record = orjson.dumps({"c": contact_id, "r": reply_ref})
        pending: list[tuple[str, asyncio.Future[None]]] = []
        for form in (message_id, *aliases):
            key = f"msg:{form.lower()}"
            done: asyncio.Future[None] = loop.create_future()
            self._remembering[key] = done
            pending.append((key, done))

        def stored(key: str, done: asyncio.Future[None]) -> None:
            # a receipt waiting for this form reads it now (or, cancelled, finds none)
            if self._remembering.get(key) is done:
                del self._remembering[key]
            if not done.done():
                done.set_result(None)

        try:
            for key, done in pending:
                with contextlib.suppress(Exception):
                    await self.ctx.state.put(key, record, self.REMEMBER_S)
                stored(key, done)
        finally:  # cancelled: the forms not stored are let go as well
            for key, done in pending:
                stored(key, done)

    async def receipt(self, message_id: str, kind: EventType | None,
                      detail: dict[str, Any]) -> bool:
        """Record a receipt; False: not recorded now, answer so that the carrier repeats it."""
        if not message_id or kind is None:
            return True
        key = f"msg:{message_id.lower()}"
        try:
            raw = await self.ctx.state.get(key)
            storing = self._remembering.get(key)
            if raw is None and storing is not None:
                # a carrier that reports at once: the receipt came on the bind right behind
                # the submit's answer, before the send had stored the message id
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.response_timeout):
                        await asyncio.shield(storing)
                raw = await self.ctx.state.get(key)
        except Exception as exc:
            log.warning("%s: receipt lookup failed: %s", self.name, exc)
            return False
        if raw is None:
            log.info("%s: receipt for an unknown message id", self.name)
            return True
        ref = orjson.loads(raw)
        return await self.reports.record(ref["c"], ref["r"], kind, detail)
