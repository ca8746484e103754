"""CMPP 2.0 / 3.0 (China Mobile): one long-lived connection to the ISMG, MO and status reports by
CMPP_DELIVER, replies by CMPP_SUBMIT.

The link is held by one instance of a fleet (lease ``cmpp:<host>:<port>:<source_addr>``) and
kept up by the supervisor like the SMPP bind (``link.py``). CMPP_CONNECT carries
AuthenticatorSource = MD5(Source_Addr + 9 NUL + shared secret + timestamp "MMDDHHMMSS") in the
configured time zone; ACTIVE_TEST keeps the link alive both ways; at most ``window`` (the
specification: 16) CMPP_SUBMIT are unanswered at a time.

Nothing lost: a CMPP_DELIVER is answered Result 0 only once the contact (or the part, or the
status report) is recorded; otherwise Result 8 (flow control error) so that the ISMG delivers it
again. Msg_Id is the ISMG's unique id (time, gateway code, sequence): with the sender it is the
contact's external id, so a redelivery is a duplicate for Intake.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from gateway.adapters import (
    AdapterContext,
    ChannelType,
    InvalidContact,
    RateLimited,
    SendError,
    SendReceipt,
)
from gateway.channels.sms import cmpp_pdu as C
from gateway.channels.sms import common
from gateway.channels.sms.concat import parse_udh
from gateway.channels.sms.link import BoundLink, LinkConfig, LinkDown, link_errors, raise_errors
from gateway.contact.phone import mask_phone
from gateway.records import Contact, EventType, Reply
from gateway.server.config import AdapterSettings, Duration, Secret

log = logging.getLogger(__name__)

FORMATS: dict[int, str] = {C.FMT_ASCII: "ascii", C.FMT_UCS2: "utf-16-be", C.FMT_GBK: "gb18030"}
"""Msg_Fmt to codec; 4 (binary) and anything else are read as ISO-8859-1."""


@dataclass(frozen=True, slots=True)
class CmppConfig(LinkConfig):
    """``[adapters.NAME]`` with ``type = "cmpp"`` (and ``LinkConfig``'s keys)."""

    port: int = 7890
    source_addr: str = ""
    """The SP's enterprise code (Source_Addr, 6 characters), given by the carrier."""
    shared_secret: Secret | None = None
    version: Literal["2.0", "3.0"] = "2.0"
    service_id: str = ""
    """Service_Id of replies (business code, at most 10)."""
    src_id: str = ""
    """Src_Id of replies: the SP's access number (e.g. 1065xxxx12345); default: the number
    the citizen wrote to."""
    msg_fmt: Literal[8, 15] = 8
    """Replies in UCS-2 (8) or GBK (15); text in plain ASCII goes as Msg_Fmt 0."""
    fee_user_type: int = 2
    fee_type: str = "01"
    """01: free of charge to the citizen."""
    fee_code: str = "000000"
    window: int = 16
    active_test: Duration = Duration(180)
    response_timeout: Duration = Duration(60)
    timezone: str = "Asia/Shanghai"
    """Zone of the CMPP_CONNECT timestamp (the ISMG's clock)."""


def decode(data: bytes, fmt: int) -> tuple[str, str]:
    codec = FORMATS.get(fmt, "latin-1")
    return data.decode(codec, "replace"), codec


def pieces(text: str, codec: str, single: int = 140, part: int = 134) -> list[bytes]:
    """The text in messages of at most ``single`` octets, or ``part`` when it takes several
    (6 octets of UDH each); a character (a UCS-2 surrogate pair, a GBK double byte) is never cut."""
    encoded = [c.encode(codec) for c in text]
    if sum(map(len, encoded)) <= single:
        return [b"".join(encoded)]
    out: list[bytes] = []
    current = b""
    for raw in encoded:
        if len(current) + len(raw) > part:
            out.append(current)
            current = b""
        current += raw
    return [*out, current] if current else out


def report_kind(stat: str) -> EventType | None:
    """DELIVRD is delivered; every other final stat (EXPIRED, UNDELIV, REJECTD, DELETED, the
    gateways' own codes such as MA:0001) is failed."""
    if stat == "DELIVRD":
        return "delivered"
    if stat in ("", "ACCEPTD", "ENROUTE", "UNKNOWN"):
        return None
    return "failed"


class CmppAdapter(BoundLink):
    """One CMPP link."""

    provider = "cmpp"
    framing = C.FRAMING
    MAX_FRAME = C.MAX_PACKET

    def __init__(self, ctx: AdapterContext, config: CmppConfig) -> None:
        super().__init__(ctx, config,
                         lease=f"cmpp:{config.host}:{config.port}:{config.source_addr}",
                         keepalive=config.active_test)
        self.config = config
        self.version = C.V30 if config.version == "3.0" else C.V20
        self._refs = itertools.count(1)

    def is_response(self, command_id: int) -> bool:
        return bool(command_id & C.RESP)

    def timestamp(self) -> str:
        now = datetime.fromtimestamp(self.ctx.clock.now_us() / 1e6, ZoneInfo(self.config.timezone))
        return now.strftime("%m%d%H%M%S")

    async def login(self) -> None:
        cfg = self.config
        secret = cfg.shared_secret.reveal() if cfg.shared_secret else ""
        body = C.connect_body(cfg.source_addr, secret, self.version, self.timestamp())
        _, _, resp = await self.request(C.CONNECT, body)
        try:
            status, _, _ = C.parse_connect_resp(resp, self.version)
        except C.Malformed as exc:
            raise LinkDown(f"CMPP_CONNECT_RESP malformed: {exc}") from None
        if status != 0:
            raise LinkDown(f"CMPP_CONNECT refused: Status {status}")

    async def keepalive(self) -> None:
        await self.request(C.ACTIVE_TEST)

    async def bad_length(self, length: int, command_id: int, seq: int) -> None:
        """CMPP has no generic nack: the link is dropped and connected again."""

    async def handle(self, command_id: int, seq: int, body: bytes) -> None:
        if command_id == C.ACTIVE_TEST:
            await self.write(C.ACTIVE_TEST | C.RESP, seq, b"\x00")
        elif command_id == C.TERMINATE:
            await self.write(C.TERMINATE | C.RESP, seq)
            raise LinkDown("terminated by the ISMG")
        elif command_id == C.DELIVER:
            if not self.spawn(self._deliver(seq, body)):
                msg_id = int.from_bytes(body[:8], "big") if len(body) >= 8 else 0
                await self.write(C.DELIVER | C.RESP, seq,
                                 C.msg_id_resp(msg_id, C.DELIVER_FLOW_CONTROL, self.version))
        else:
            log.warning("cmpp %s: command 0x%08x ignored", self.name, command_id)

    # ------------------------------------------------------------------ inbound

    async def _deliver(self, seq: int, body: bytes) -> None:
        msg_id = int.from_bytes(body[:8], "big") if len(body) >= 8 else 0
        try:
            deliver = C.Deliver.parse(body, self.version)
        except C.Malformed as exc:
            log.warning("cmpp %s: malformed CMPP_DELIVER: %s", self.name, exc)
            result = 1  # message structure error
        else:
            try:
                result = await self._take(deliver)
            except common.BadRequest as exc:  # no source number: never takeable, not retried
                log.warning("cmpp %s: CMPP_DELIVER refused: %s", self.name, exc)
                result = C.DELIVER_STRUCTURE
            except InvalidContact as exc:
                log.warning("cmpp %s: CMPP_DELIVER refused: %s", self.name, exc)
                result = C.DELIVER_OTHER
            except RateLimited:  # the sender's limit: the ISMG delivers it again later
                result = C.DELIVER_FLOW_CONTROL
            except Exception:
                log.exception("cmpp %s: CMPP_DELIVER not taken", self.name)
                result = C.DELIVER_FLOW_CONTROL
        try:
            await self.write(C.DELIVER | C.RESP, seq, C.msg_id_resp(msg_id, result, self.version))
        except (ConnectionError, OSError):
            pass

    async def _take(self, d: C.Deliver) -> int:
        if d.registered_delivery == 1:
            try:
                report = C.Report.parse(d.msg_content, self.version)
            except C.Malformed:
                return 1
            ok = await self.receipt(str(report.msg_id), report_kind(report.stat),
                                    {"stat": report.stat, "smsc_id": str(report.msg_id)})
            return C.DELIVER_OK if ok else C.DELIVER_FLOW_CONTROL
        data = d.msg_content
        concat = None
        if d.tp_udhi and data:
            udh_len = data[0] + 1
            concat, data = parse_udh(data[:udh_len]), data[udh_len:]
        taken = await self.take_mo(
            received_at=self.ctx.clock.now_us(),
            sender=common.phone_address(d.src_terminal_id, self.config.region),
            recipient=d.dest_id, external_id=f"cmpp:{d.msg_id}:{d.src_terminal_id}",
            concat=concat, data=data, charset=str(d.msg_fmt),
            meta={"msg_fmt": d.msg_fmt, "service_id": d.service_id},
        )
        return C.DELIVER_OK if taken else C.DELIVER_FLOW_CONTROL

    def decode_run(self, data: bytes, charset: str) -> tuple[str, str]:
        return decode(data, int(charset))

    # ------------------------------------------------------------------ outbound

    def _terminal(self, address: str) -> str:
        if address.startswith("+86"):
            return address[3:]
        return address.lstrip("+")

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        cfg = self.config
        text = reply.text
        if not text.strip():
            raise SendError("empty reply", retryable=False)
        fmt = C.FMT_ASCII if text.isascii() else cfg.msg_fmt
        chunks = pieces(text, FORMATS[fmt])
        self.sendable(len(chunks))
        ref = next(self._refs) & 0xFF
        reply_ref = reply.id or f"{contact.id}-{self.ctx.clock.now_us()}"
        ids: list[str] = []
        total = len(chunks)
        for n, chunk in enumerate(chunks, 1):
            udhi = 1 if total > 1 else 0
            content = (bytes([5, 0, 3, ref, total, n]) + chunk) if udhi else chunk
            submit = C.Submit(
                src_id=cfg.src_id or contact.recipient,
                dest_terminal_ids=(self._terminal(contact.sender.address),),
                msg_content=content, msg_fmt=fmt, msg_src=cfg.source_addr,
                service_id=cfg.service_id, pk_total=total, pk_number=n, tp_udhi=udhi,
                registered_delivery=1, fee_user_type=cfg.fee_user_type,
                fee_type=cfg.fee_type, fee_code=cfg.fee_code,
            )
            try:
                _, _, body = await self.request(C.SUBMIT, submit.encode(self.version))
                msg_id, result = C.parse_msg_id_resp(body, self.version)
            except (ConnectionError, OSError, TimeoutError, C.Malformed) as exc:
                raise SendError(f"cmpp submit: {type(exc).__name__}", retryable=True) from exc
            if result != 0:
                raise SendError(f"cmpp submit refused: Result {result}",
                                retryable=result == C.SUBMIT_FLOW_CONTROL)
            ids.append(str(msg_id))
            await self.remember(str(msg_id), contact.id, reply_ref)
        log.info("reply %s to %s accepted by the ISMG (%d parts, Msg_Fmt %d)", reply_ref,
                 mask_phone(contact.sender.address), total, fmt)
        return SendReceipt(external_id=ids[0] if ids else None,
                           detail={"ref": reply_ref, "message_ids": ids, "segments": total,
                                   "msg_fmt": fmt})


def _check(config: CmppConfig, key: str, settings: AdapterSettings) -> None:
    errors = link_errors(config, key, 16, " (the specification's limit)")
    if not config.source_addr or len(config.source_addr) > 6 or not config.source_addr.isascii():
        errors.append((f"{key}.source_addr", "required, at most 6 characters"))
    try:
        ZoneInfo(config.timezone)
    except Exception:
        errors.append((f"{key}.timezone", f"unknown {config.timezone!r}"))
    raise_errors(errors)


CHANNEL: ChannelType[CmppConfig] = ChannelType(
    name="cmpp",
    channel="sms",
    config=CmppConfig,
    factory=CmppAdapter,
    check=_check,
    example={"host": "ismg.example.cn", "port": 7890, "source_addr": "901234",
             "shared_secret": "secret", "version": "3.0", "src_id": "106512345"},
)

