"""SMPP 3.4: one long-lived bind to a carrier's SMSC, MO by deliver_sm, replies by submit_sm.

The bind (transceiver, the only mode this adapter opens) is held by one instance of a fleet at
a time: the bind loop runs under ``ctx.leases.exclusive("smpp:<host>:<port>:<system_id>")``
inside the supervisor, which reconnects with back-off after the link drops. Our own small codec
(``smpp_pdu``) rather than a library: smpplib is synchronous with a thread per client, and the
asyncio ones are unmaintained or wrap a native core we could not review; the PDUs this adapter
needs are few and fixed by the specification.

Nothing lost: a ``deliver_sm`` is answered ``deliver_sm_resp`` status 0 only after Intake made
the contact (or the concatenation part) durable; when it cannot, the answer is
``ESME_RX_T_APPN`` (0x64) and the SMSC delivers it again. A redelivery has the same external id
(a hash of the PDU's addresses, coding, user data and UTC day), so Intake deduplicates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from gateway.adapters import (
    AdapterContext,
    ChannelType,
    IntakeUnavailable,
    SendError,
    SendReceipt,
)
from gateway.channels.sms import common, gsm7
from gateway.channels.sms import smpp_pdu as P
from gateway.channels.sms.concat import Assembler, Concat, Part, assembled_id, group_key, parse_udh
from gateway.channels.sms.segments import split, substitute
from gateway.config import AdapterSettings, ConfigError, Duration, Secret
from gateway.phone import mask_phone
from gateway.queueing.coordination import Fence
from gateway.records import Contact, EventType, Inbound, Reply, Sender, clean_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SmppConfig:
    """``[adapters.NAME]`` with ``type = "smpp"``."""

    host: str = ""
    port: int = 2775
    system_id: str = ""
    password: Secret | None = None
    system_type: str = ""
    address_range: str = ""
    window: int = 10
    """Requests (submit_sm, enquire_link) sent and not yet answered, at most."""
    enquire_link: Duration = Duration(30)
    response_timeout: Duration = Duration(10)
    region: str = "CN"
    default_alphabet: Literal["gsm7", "ascii", "latin1"] = "gsm7"
    """What data_coding 0 (SMSC default alphabet) means on this link."""
    eight_bit_charset: str = ""
    """Charset of 8-bit user data (data_coding 4, or 15 on Chinese SMSCs), e.g. ``gbk``;
    empty: ISO-8859-1."""
    source_addr: str = ""
    """Sender of replies (the short code); default: the number the citizen wrote to."""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    registered_delivery: int = 1
    """1: ask the SMSC for a final delivery receipt."""
    max_segments: int = 10
    gsm_substitutions: bool = True
    concat_timeout: Duration = Duration(60)


STATES: dict[int, EventType | None] = {2: "delivered", 3: "failed", 4: "failed", 5: "failed",
                                      8: "failed"}
"""message_state (section 5.3.2.35): DELIVERED, EXPIRED, DELETED, UNDELIVERABLE, REJECTED."""
STATS: dict[str, EventType | None] = {"DELIVRD": "delivered", "EXPIRED": "failed",
                                     "DELETED": "failed", "UNDELIV": "failed",
                                     "REJECTD": "failed"}
_RECEIPT_TEXT = re.compile(r"id:(?P<id>\S+).*?stat:(?P<stat>[A-Z]+)", re.S)
_TEMPORARY = frozenset({P.ESME_RMSGQFUL, P.ESME_RTHROTTLED, P.ESME_RSYSERR, P.ESME_RX_T_APPN})


class LinkDown(ConnectionError):
    """The bind is gone (peer closed, timed out, unbound): the supervisor opens a new one."""


def decode(data: bytes, coding: int, config: SmppConfig) -> tuple[str, str]:
    """User data to text by data_coding (SMPP 3.4 5.2.19); returns (text, codec)."""
    if coding == 0:
        if config.default_alphabet == "gsm7":
            return gsm7.decode(data), "gsm7"
        name = "ascii" if config.default_alphabet == "ascii" else "latin-1"
        return data.decode(name, "replace"), name
    if coding == 1:
        return data.decode("ascii", "replace"), "ascii"
    if coding == 3:
        return data.decode("latin-1"), "latin-1"
    if coding == 8:
        return data.decode("utf-16-be", "replace"), "utf-16-be"
    if coding in (2, 4, 15) and config.eight_bit_charset:
        try:
            return data.decode(config.eight_bit_charset), config.eight_bit_charset
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1"), "latin-1"


def concat_of(sm: P.ShortMessage) -> tuple[Concat | None, bytes]:
    """The concatenation element (UDH or SAR TLVs) and the user data without the UDH."""
    data = sm.payload
    if sm.esm_class & P.ESM_UDHI and data:
        udh_len = data[0] + 1
        return parse_udh(data[:udh_len]), data[udh_len:]
    ref, total, seq = (sm.tlvs.get(t) for t in (P.TLV_SAR_MSG_REF_NUM, P.TLV_SAR_TOTAL_SEGMENTS,
                                                  P.TLV_SAR_SEGMENT_SEQNUM))
    if ref and total and seq and len(ref) == 2:
        if 1 <= seq[0] <= total[0]:
            return Concat(struct.unpack(">H", ref)[0], total[0], seq[0]), data
    return None, data


def external_id(sm: P.ShortMessage, day: str) -> str:
    """Same PDU delivered again (the same UTC day) -> same id, so Intake drops the repeat."""
    digest = hashlib.sha256(
        b"\x1f".join([sm.source_addr.encode("latin-1"), sm.destination_addr.encode("latin-1"),
                      bytes([sm.esm_class, sm.data_coding]), sm.payload, day.encode(),
                      b"".join(sm.tlvs.get(t, b"") for t in (P.TLV_SAR_MSG_REF_NUM,
                               P.TLV_SAR_TOTAL_SEGMENTS, P.TLV_SAR_SEGMENT_SEQNUM))])
    ).hexdigest()
    return "smpp:" + digest[:32]


def receipt_of(sm: P.ShortMessage) -> tuple[str, EventType | None, dict[str, Any]] | None:
    """(SMSC message id, outcome, detail) of a delivery receipt, or None when not one."""
    if sm.esm_class & P.ESM_TYPE_MASK not in (P.ESM_DELIVERY_RECEIPT, P.ESM_INTERMEDIATE):
        return None
    text = sm.payload.decode("latin-1")
    match = _RECEIPT_TEXT.search(text)
    raw_id = sm.tlvs.get(P.TLV_RECEIPTED_MESSAGE_ID)
    message_id = raw_id.rstrip(b"\x00").decode("latin-1") if raw_id else ""
    if not message_id and match:
        message_id = match["id"]
    state = sm.tlvs.get(P.TLV_MESSAGE_STATE)
    if sm.esm_class & P.ESM_TYPE_MASK == P.ESM_INTERMEDIATE:
        kind: EventType | None = None
    elif state:
        kind = STATES.get(state[0])
    else:
        kind = STATS.get(match["stat"]) if match else None
    detail: dict[str, Any] = {"smsc_id": message_id}
    if match:
        detail["stat"] = match["stat"]
    if state:
        detail["message_state"] = state[0]
    return message_id, kind, detail


def sender_address(addr: str, ton: int, region: str) -> str:
    if ton == 1 and addr.isdigit():
        return "+" + addr
    return common.phone_address(addr, region)


class SmppAdapter:
    """One SMPP link: the bind loop, MO, receipts and submit_sm."""

    channel = "sms"
    REMEMBER_S = 7 * 86400

    def __init__(self, ctx: AdapterContext, config: SmppConfig) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.config = config
        self.lease = f"smpp:{config.host}:{config.port}:{config.system_id}"
        self.loop_name = f"{ctx.name}-bind"
        data_dir = Path(ctx.settings.gateway.data_dir) / "sms" / ctx.name / "parts"
        self.assembler = Assembler(
            data_dir, float(config.concat_timeout), ctx.clock, self._handover, state=ctx.state
        )
        self.assembler.load()
        self.reports = common.DeliveryReports(ctx)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[P.Pdu]] = {}
        self._window = asyncio.Semaphore(max(1, config.window))
        self._seq = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._refs = itertools.count(1)
        self.bound = asyncio.Event()
        self.binds = 0
        """Binds made since start (tests, metrics)."""

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

    # ------------------------------------------------------------------ the bind

    def _next_seq(self) -> int:
        seq = next(self._seq)
        if seq >= 0x7FFFFFFF:
            self._seq = itertools.count(1)
        return seq

    async def _write(self, pdu: P.Pdu) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise LinkDown("not bound")
        writer.write(pdu.encode())
        await writer.drain()

    async def request(self, command_id: int, body: bytes = b"") -> P.Pdu:
        """Send one request within the window and wait for its response."""
        async with self._window:
            seq = self._next_seq()
            future: asyncio.Future[P.Pdu] = asyncio.get_running_loop().create_future()
            self._pending[seq] = future
            try:
                await self._write(P.Pdu(command_id, 0, seq, body))
                return await asyncio.wait_for(future, float(self.config.response_timeout))
            finally:
                self._pending.pop(seq, None)

    async def _bind(self, fence: Fence) -> None:
        cfg = self.config
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(cfg.host, cfg.port), float(cfg.response_timeout)
        )
        self._writer = writer
        reading = asyncio.get_running_loop().create_task(self._read(reader))
        try:
            bind = P.Bind(cfg.system_id, cfg.password.reveal() if cfg.password else "",
                          cfg.system_type, address_range=cfg.address_range)
            resp = await self._first(reading, self.request(P.BIND_TRANSCEIVER, bind.body()))
            if resp.status != P.ESME_ROK:
                raise LinkDown(f"bind_transceiver refused: status 0x{resp.status:08x}")
            self.binds += 1
            self.bound.set()
            log.info("smpp %s: bound (transceiver, fence %d)", self.name, fence.token)
            self.ctx.supervisor.degrade(self.loop_name, None)
            while True:
                await self._first(reading, asyncio.sleep(float(cfg.enquire_link)))
                await self._first(reading, self.request(P.ENQUIRE_LINK))
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
        raise LinkDown(f"link closed: {exc!r}" if exc else "link closed by the SMSC")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                head = await reader.readexactly(16)
            except asyncio.IncompleteReadError:
                return
            length, command_id, status, seq = P.header(head)
            if length < 16 or length > P.MAX_PDU:
                # No way to find the next PDU: say why, then drop the link (a new bind follows).
                await self._write(P.Pdu(P.GENERIC_NACK, P.ESME_RINVCMDLEN, seq))
                log.warning("smpp %s: PDU with command_length %d, link reset", self.name, length)
                return
            try:
                body = await reader.readexactly(length - 16)
            except asyncio.IncompleteReadError:
                return
            await self._dispatch(P.Pdu(command_id, status, seq, body))

    async def _dispatch(self, pdu: P.Pdu) -> None:
        cid = pdu.command_id
        if cid & P.RESP and cid != P.GENERIC_NACK:
            future = self._pending.get(pdu.seq)
            if future is not None and not future.done():
                future.set_result(pdu)
            return
        if cid == P.GENERIC_NACK:
            future = self._pending.get(pdu.seq)
            if future is not None and not future.done():
                future.set_result(pdu)
            log.warning("smpp %s: generic_nack 0x%08x", self.name, pdu.status)
            return
        if cid == P.ENQUIRE_LINK:
            await self._write(P.Pdu(cid | P.RESP, 0, pdu.seq))
        elif cid == P.UNBIND:
            await self._write(P.Pdu(cid | P.RESP, 0, pdu.seq))
            raise LinkDown("unbound by the SMSC")
        elif cid == P.DELIVER_SM:
            try:
                sm = P.ShortMessage.parse(pdu.body)
            except P.Malformed as exc:
                log.warning("smpp %s: malformed deliver_sm: %s", self.name, exc)
                await self._write(P.Pdu(P.GENERIC_NACK, P.ESME_RINVCMDLEN, pdu.seq))
                return
            task = asyncio.get_running_loop().create_task(self._deliver(pdu.seq, sm))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif cid in P.KNOWN:
            await self._write(P.Pdu(P.GENERIC_NACK, P.ESME_RINVBNDSTS, pdu.seq))
        else:
            await self._write(P.Pdu(P.GENERIC_NACK, P.ESME_RINVCMDID, pdu.seq))

    # ------------------------------------------------------------------ inbound

    async def _deliver(self, seq: int, sm: P.ShortMessage) -> None:
        try:
            status = await self._take(sm)
        except Exception:
            log.exception("smpp %s: deliver_sm not taken", self.name)
            status = P.ESME_RX_T_APPN
        with contextlib.suppress(ConnectionError, OSError):
            await self._write(P.Pdu(P.DELIVER_SM | P.RESP, status, seq, P.message_id_body("")))

    async def _take(self, sm: P.ShortMessage) -> int:
        """Make the MO durable (or record the receipt); return the deliver_sm_resp status."""
        receipt = receipt_of(sm)
        if receipt is not None:
            return await self._receipt(*receipt)
        received_at = self.ctx.clock.now_us()
        sender = sender_address(sm.source_addr, sm.source_addr_ton, self.config.region)
        recipient = sm.destination_addr
        day = datetime.fromtimestamp(received_at / 1e6, UTC).strftime("%Y%m%d")
        ext_id = external_id(sm, day)
        concat, data = concat_of(sm)
        if concat is not None and concat.total > 1:
            part = Part(
                group=group_key(sender, recipient, concat), seq=concat.seq, total=concat.total,
                external_id=ext_id, data=data, charset=str(sm.data_coding),
                received_at=received_at, origin_at=None, sender=sender, recipient=recipient,
                meta={"ref": concat.ref},
            )
            try:
                await self.assembler.add(part)
            except OSError as exc:
                log.error("smpp part from %s not stored: %s", mask_phone(sender), exc)
                return P.ESME_RX_T_APPN
            return P.ESME_ROK
        text, used = decode(data, sm.data_coding, self.config)
        inbound = Inbound(
            channel="sms", adapter=self.name, external_id=ext_id, sender=Sender(sender),
            recipient=recipient, received_at=received_at, text=clean_text(text),
            meta={"provider": "smpp", "data_coding": sm.data_coding, "decoded_as": used},
        )
        try:
            await self.ctx.intake.submit(inbound)
        except IntakeUnavailable:
            log.warning("smpp MO from %s refused: intake unavailable", mask_phone(sender))
            return P.ESME_RX_T_APPN
        return P.ESME_ROK

    async def _handover(self, parts: list[Part], complete: bool) -> object:
        texts, used = [], []
        for coding, run in itertools.groupby(parts, key=lambda p: p.charset):
            text, codec = decode(b"".join(p.data for p in run), int(coding), self.config)
            texts.append(text)
            used.append(codec)
        first = parts[0]
        inbound = Inbound(
            channel="sms", adapter=self.name, external_id=assembled_id(parts),
            sender=Sender(first.sender), recipient=first.recipient,
            received_at=min(p.received_at for p in parts), text=clean_text("".join(texts)),
            meta={
                "provider": "smpp", "decoded_as": used[0] if len(set(used)) == 1 else used,
                "concat": {"ref": first.meta.get("ref"), "total": first.total,
                           "parts": [p.seq for p in parts]},
                "incomplete": not complete,
            },
        )
        return await self.ctx.intake.submit(inbound)

    async def _receipt(self, message_id: str, kind: EventType | None, detail: dict[str, Any]
                       ) -> int:
        if not message_id or kind is None:
            return P.ESME_ROK
        try:
            raw = await self.ctx.state.get(f"msg:{message_id.lower()}")
        except Exception as exc:
            log.warning("smpp %s: receipt lookup failed: %s", self.name, exc)
            return P.ESME_RX_T_APPN
        if raw is None:
            log.info("smpp %s: receipt for an unknown message id", self.name)
            return P.ESME_ROK
        ref = orjson.loads(raw)
        ok = await self.reports.record(ref["c"], ref["r"], kind, detail)
        return P.ESME_ROK if ok else P.ESME_RX_T_APPN

    # ------------------------------------------------------------------ outbound

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        cfg = self.config
        text = reply.text
        if not text.strip():
            raise SendError("empty reply", retryable=False)
        if cfg.gsm_substitutions and split(substitute(text)).encoding == "gsm7":
            text = substitute(text)
        segments = split(text)
        if segments.count > cfg.max_segments:
            raise SendError(f"reply needs {segments.count} segments "
                            f"(max_segments {cfg.max_segments})", retryable=False)
        if not self.bound.is_set():
            raise SendError("smpp link not bound on this instance", retryable=True,
                            retry_after_s=5)
        gsm = segments.encoding == "gsm7"
        dest = contact.sender.address
        ref = next(self._refs) & 0xFF
        ids: list[str] = []
        reply_ref = reply.id or f"{contact.id}-{self.ctx.clock.now_us()}"
        for n, piece in enumerate(segments.parts, 1):
            data = gsm7.encode(piece) if gsm else piece.encode("utf-16-be")
            esm = 0
            if segments.count > 1:
                data = bytes([5, 0, 3, ref, segments.count, n]) + data
                esm = P.ESM_UDHI
            sm = P.ShortMessage(
                source_addr=cfg.source_addr or contact.recipient,
                source_addr_ton=cfg.source_addr_ton, source_addr_npi=cfg.source_addr_npi,
                destination_addr=dest.lstrip("+"),
                dest_addr_ton=1 if dest.startswith("+") else 0, dest_addr_npi=1,
                esm_class=esm, registered_delivery=cfg.registered_delivery,
                data_coding=0 if gsm else 8, short_message=data,
            )
            try:
                resp = await self.request(P.SUBMIT_SM, sm.body())
            except (ConnectionError, OSError, TimeoutError) as exc:
                raise SendError(f"smpp submit_sm: {type(exc).__name__}", retryable=True) from exc
            if resp.status != P.ESME_ROK:
                raise SendError(f"smpp submit_sm refused: status 0x{resp.status:02x}",
                                retryable=resp.status in _TEMPORARY)
            message_id = P.parse_message_id(resp.body)
            ids.append(message_id)
            if message_id:
                with contextlib.suppress(Exception):
                    await self.ctx.state.put(
                        f"msg:{message_id.lower()}",
                        orjson.dumps({"c": contact.id, "r": reply_ref}), self.REMEMBER_S,
                    )
        log.info("reply %s to %s accepted by the SMSC (%d %s segments)", reply_ref,
                 mask_phone(dest), segments.count, segments.encoding)
        return SendReceipt(
            external_id=ids[0] if ids else None,
            detail={"ref": reply_ref, "message_ids": ids, "segments": segments.count,
                    "encoding": segments.encoding},
        )


def _factory(ctx: AdapterContext, config: SmppConfig) -> SmppAdapter:
    return SmppAdapter(ctx, config)


def _check(config: SmppConfig, key: str, settings: AdapterSettings) -> None:
    errors: list[tuple[str, str]] = []
    if not config.host:
        errors.append((f"{key}.host", "required"))
    if not config.system_id or len(config.system_id) > 15:
        errors.append((f"{key}.system_id", "required, at most 15 characters"))
    if config.password is not None and len(config.password.reveal()) > 8:
        errors.append((f"{key}.password", "at most 8 characters (SMPP 3.4)"))
    if not 1 <= config.window <= 1000:
        errors.append((f"{key}.window", "between 1 and 1000"))
    if config.eight_bit_charset:
        try:
            b"".decode(config.eight_bit_charset)
        except LookupError:
            errors.append((f"{key}.eight_bit_charset", f"unknown {config.eight_bit_charset!r}"))
    if errors:
        raise ConfigError(errors)


CHANNEL: ChannelType[SmppConfig] = ChannelType(
    name="smpp",
    channel="sms",
    config=SmppConfig,
    factory=_factory,
    check=_check,
    example={"host": "smsc.example.net", "port": 2775, "system_id": "hotline",
             "password": "secret1", "source_addr": "12345"},
)
