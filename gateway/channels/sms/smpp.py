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

import contextlib
import hashlib
import itertools
import logging
import re
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.adapters import (
    AdapterContext,
    ChannelType,
    InvalidContact,
    RateLimited,
    SendError,
    SendReceipt,
)
from gateway.channels.sms import common, gsm7
from gateway.channels.sms import smpp_pdu as P
from gateway.channels.sms.concat import Concat, parse_udh
from gateway.channels.sms.link import BoundLink, LinkConfig, LinkDown, link_errors, raise_errors
from gateway.contact.phone import mask_phone
from gateway.records import Contact, EventType, Reply
from gateway.server.config import AdapterSettings, Duration, Secret

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SmppConfig(LinkConfig):
    """``[adapters.NAME]`` with ``type = "smpp"`` (and ``LinkConfig``'s keys)."""

    port: int = 2775
    system_id: str = ""
    password: Secret | None = None
    system_type: str = ""
    address_range: str = ""
    enquire_link: Duration = Duration(30)
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
    gsm_substitutions: bool = True


STATES: dict[int, EventType | None] = {2: "delivered", 3: "failed", 4: "failed", 5: "failed",
                                      8: "failed"}
"""message_state (section 5.3.2.35): DELIVERED, EXPIRED, DELETED, UNDELIVERABLE, REJECTED."""
STATS: dict[str, EventType | None] = {"DELIVRD": "delivered", "EXPIRED": "failed",
                                     "DELETED": "failed", "UNDELIV": "failed",
                                     "REJECTD": "failed"}
_RECEIPT_TEXT = re.compile(r"id:(?P<id>\S+).*?stat:(?P<stat>[A-Z]+)", re.S)
_TEMPORARY = frozenset({P.ESME_RMSGQFUL, P.ESME_RTHROTTLED, P.ESME_RSYSERR, P.ESME_RX_T_APPN})


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


def decimal_alias(message_id: str) -> str | None:
    """The decimal form of a hexadecimal message id: many SMSCs answer submit_sm with a hex id
    and write it in decimal in the receipt text (SMPP 3.4 appendix B leaves it open)."""
    if len(message_id) <= 16 and all(c in "0123456789abcdefABCDEF" for c in message_id):
        alias = str(int(message_id, 16))
        return alias if alias != message_id else None
    return None


def sender_address(addr: str, ton: int, region: str) -> str:
    if ton == 1 and addr.isdigit():
        return "+" + addr
    return common.phone_address(addr, region)


class SmppAdapter(BoundLink):
    """One SMPP link: the bind loop, MO, receipts and submit_sm."""

    provider = "smpp"
    framing = P.FRAMING
    MAX_FRAME = P.MAX_PDU

    def __init__(self, ctx: AdapterContext, config: SmppConfig) -> None:
        super().__init__(ctx, config, lease=f"smpp:{config.host}:{config.port}:{config.system_id}",
                         keepalive=config.enquire_link)
        self.config = config
        self._refs = itertools.count(1)

    # ------------------------------------------------------------------ the bind

    def is_response(self, command_id: int) -> bool:
        return bool(command_id & P.RESP)

    async def login(self) -> None:
        cfg = self.config
        bind = P.Bind(cfg.system_id, cfg.password.reveal() if cfg.password else "",
                      cfg.system_type, address_range=cfg.address_range)
        _, status, _ = await self.request(P.BIND_TRANSCEIVER, bind.body())
        if status != P.ESME_ROK:
            raise LinkDown(f"bind_transceiver refused: status 0x{status:08x}")

    async def keepalive(self) -> None:
        await self.request(P.ENQUIRE_LINK)

    async def bad_length(self, length: int, command_id: int, seq: int) -> None:
        await self.write(P.GENERIC_NACK, seq, status=P.ESME_RINVCMDLEN)

    async def handle(self, command_id: int, seq: int, body: bytes) -> None:
        if command_id == P.ENQUIRE_LINK:
            await self.write(command_id | P.RESP, seq)
        elif command_id == P.UNBIND:
            await self.write(command_id | P.RESP, seq)
            raise LinkDown("unbound by the SMSC")
        elif command_id == P.DELIVER_SM:
            try:
                sm = P.ShortMessage.parse(body)
            except P.Malformed as exc:
                log.warning("smpp %s: malformed deliver_sm: %s", self.name, exc)
                await self.write(P.GENERIC_NACK, seq, status=P.ESME_RINVCMDLEN)
                return
            if not self.spawn(self._deliver(seq, sm)):
                await self.write(P.DELIVER_SM | P.RESP, seq, P.message_id_body(""),
                                 P.ESME_RX_T_APPN)
        elif command_id in P.KNOWN:
            await self.write(P.GENERIC_NACK, seq, status=P.ESME_RINVBNDSTS)
        else:
            await self.write(P.GENERIC_NACK, seq, status=P.ESME_RINVCMDID)

    # ------------------------------------------------------------------ inbound

    async def _deliver(self, seq: int, sm: P.ShortMessage) -> None:
        try:
            status = await self._take(sm)
        except (common.BadRequest, InvalidContact) as exc:  # never takeable: not retried
            log.warning("smpp %s: deliver_sm refused: %s", self.name, exc)
            status = P.ESME_RX_P_APPN
        except RateLimited:  # the sender's limit: the SMSC delivers it again later
            status = P.ESME_RX_T_APPN
        except Exception:
            log.exception("smpp %s: deliver_sm not taken", self.name)
            status = P.ESME_RX_T_APPN
        with contextlib.suppress(ConnectionError, OSError):
            await self.write(P.DELIVER_SM | P.RESP, seq, P.message_id_body(""), status)

    async def _take(self, sm: P.ShortMessage) -> int:
        """Make the MO durable (or record the receipt); return the deliver_sm_resp status."""
        receipt = receipt_of(sm)
        if receipt is not None:
            return P.ESME_ROK if await self.receipt(*receipt) else P.ESME_RX_T_APPN
        received_at = self.ctx.clock.now_us()
        day = datetime.fromtimestamp(received_at / 1e6, UTC).strftime("%Y%m%d")
        concat, data = concat_of(sm)
        taken = await self.take_mo(
            received_at=received_at,
            sender=sender_address(sm.source_addr, sm.source_addr_ton, self.config.region),
            recipient=sm.destination_addr, external_id=external_id(sm, day), concat=concat,
            data=data, charset=str(sm.data_coding), meta={"data_coding": sm.data_coding},
        )
        return P.ESME_ROK if taken else P.ESME_RX_T_APPN

    def decode_run(self, data: bytes, charset: str) -> tuple[str, str]:
        return decode(data, int(charset), self.config)

    # ------------------------------------------------------------------ outbound

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        cfg = self.config
        _, segments = common.reply_segments(reply.text, cfg.max_segments,
                                            gsm_substitutions=cfg.gsm_substitutions)
        self.sendable(segments.count)
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
                _, status, body = await self.request(P.SUBMIT_SM, sm.body())
            except (ConnectionError, OSError, TimeoutError) as exc:
                raise SendError(f"smpp submit_sm: {type(exc).__name__}", retryable=True) from exc
            if status != P.ESME_ROK:
                raise SendError(f"smpp submit_sm refused: status 0x{status:02x}",
                                retryable=status in _TEMPORARY)
            message_id = P.parse_message_id(body)
            ids.append(message_id)
            if message_id:
                alias = decimal_alias(message_id)
                await self.remember(message_id, contact.id, reply_ref, *([alias] if alias else []))
        log.info("reply %s to %s accepted by the SMSC (%d %s segments)", reply_ref,
                 mask_phone(dest), segments.count, segments.encoding)
        return SendReceipt(
            external_id=ids[0] if ids else None,
            detail={"ref": reply_ref, "message_ids": ids, "segments": segments.count,
                    "encoding": segments.encoding},
        )


def _check(config: SmppConfig, key: str, settings: AdapterSettings) -> None:
    errors = link_errors(config, key, 1000)
    if not config.system_id or len(config.system_id) > 15:
        errors.append((f"{key}.system_id", "required, at most 15 characters"))
    if config.password is not None and len(config.password.reveal()) > 8:
        errors.append((f"{key}.password", "at most 8 characters (SMPP 3.4)"))
    errors += common.charset_errors(config.eight_bit_charset, f"{key}.eight_bit_charset")
    raise_errors(errors)


CHANNEL: ChannelType[SmppConfig] = ChannelType(
    name="smpp",
    channel="sms",
    config=SmppConfig,
    factory=SmppAdapter,
    check=_check,
    example={"host": "smsc.example.net", "port": 2775, "system_id": "hotline",
             "password": "secret1", "source_addr": "12345"},
)
