"""SMPP 3.4 PDUs: the header, the bodies the gateway uses, TLVs (SMPP v3.4 sections 3-5).

Every PDU is a 16-octet header (command_length, command_id, command_status, sequence_number,
big-endian) and a body. C-Octet Strings end with a NUL and have a maximum size that includes it;
optional parameters (TLVs) follow the mandatory fields as tag (2), length (2), value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from gateway.channels.sms import link
from gateway.channels.sms.link import Malformed as Malformed

FRAMING: Final = link.Framing(with_status=True)
MAX_PDU: Final = 64 * 1024
"""Largest PDU accepted: a deliver_sm with a full message_payload fits with room to spare."""

GENERIC_NACK: Final = 0x80000000
BIND_RECEIVER: Final = 0x00000001
BIND_TRANSMITTER: Final = 0x00000002
SUBMIT_SM: Final = 0x00000004
DELIVER_SM: Final = 0x00000005
UNBIND: Final = 0x00000006
BIND_TRANSCEIVER: Final = 0x00000009
ENQUIRE_LINK: Final = 0x00000015
RESP: Final = 0x80000000

KNOWN: Final = frozenset(
    {GENERIC_NACK, BIND_RECEIVER, BIND_TRANSMITTER, SUBMIT_SM, DELIVER_SM, UNBIND,
     BIND_TRANSCEIVER, ENQUIRE_LINK, 0x00000003, 0x00000007, 0x00000008, 0x0000000B,
     0x00000021, 0x00000102, 0x00000103}
)
"""Request ids of SMPP 3.4 (query_sm, replace_sm, cancel_sm, outbind, submit_multi, alert,
data_sm too); their responses are these | RESP."""

# command_status values (section 5.1.3)
ESME_ROK: Final = 0x00
ESME_RINVMSGLEN: Final = 0x01
ESME_RINVCMDLEN: Final = 0x02
ESME_RINVCMDID: Final = 0x03
ESME_RINVBNDSTS: Final = 0x04
ESME_RSYSERR: Final = 0x08
ESME_RMSGQFUL: Final = 0x14
ESME_RTHROTTLED: Final = 0x58
ESME_RX_T_APPN: Final = 0x64
ESME_RX_P_APPN: Final = 0x65
"""ESME receiver permanent application error: the SMSC does not deliver this message again."""
"""ESME receiver temporary app error: the SMSC keeps the message and delivers it again."""

# TLV tags (section 5.3.2)
TLV_RECEIPTED_MESSAGE_ID: Final = 0x001E
TLV_SAR_MSG_REF_NUM: Final = 0x020C
TLV_SAR_TOTAL_SEGMENTS: Final = 0x020E
TLV_SAR_SEGMENT_SEQNUM: Final = 0x020F
TLV_MESSAGE_PAYLOAD: Final = 0x0424
TLV_MESSAGE_STATE: Final = 0x0427

ESM_UDHI: Final = 0x40
ESM_TYPE_MASK: Final = 0x3C
ESM_DELIVERY_RECEIPT: Final = 0x04
ESM_INTERMEDIATE: Final = 0x20


@dataclass(frozen=True, slots=True)
class Pdu:
    command_id: int
    status: int
    seq: int
    body: bytes = b""

    def encode(self) -> bytes:
        return FRAMING.encode(self.command_id, self.seq, self.body, self.status)


def header(data: bytes) -> tuple[int, int, int, int]:
    """(command_length, command_id, command_status, sequence_number) of 16 octets."""
    return FRAMING.decode(data)


def cstr(value: str | bytes, size: int) -> bytes:
    """A C-Octet String of at most ``size`` octets including the NUL (longer is cut)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw[: size - 1] + b"\x00"


class Cursor(link.Cursor):
    """Reads the fields of one body in order; every overrun raises ``Malformed``."""

    def cstr(self, size: int) -> str:
        end = self.data.find(b"\x00", self.pos, self.pos + size)
        if end < 0:
            raise Malformed(f"C-Octet String at {self.pos} without NUL within {size} octets")
        value = self.data[self.pos : end].decode("latin-1")
        self.pos = end + 1
        return value

    def octets(self, n: int) -> bytes:
        return self.take(n)

    def tlvs(self) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        while self.pos < len(self.data):
            if self.pos + 4 > len(self.data):
                raise Malformed("truncated TLV header")
            tag, length = struct.unpack_from(">HH", self.data, self.pos)
            self.pos += 4
            found.setdefault(tag, self.octets(length))
        return found


def tlv(tag: int, value: bytes) -> bytes:
    return struct.pack(">HH", tag, len(value)) + value


@dataclass(frozen=True, slots=True)
class Bind:
    system_id: str
    password: str
    system_type: str = ""
    interface_version: int = 0x34
    addr_ton: int = 0
    addr_npi: int = 0
    address_range: str = ""

    def body(self) -> bytes:
        return (
            cstr(self.system_id, 16) + cstr(self.password, 9) + cstr(self.system_type, 13)
            + bytes([self.interface_version, self.addr_ton, self.addr_npi])
            + cstr(self.address_range, 41)
        )

    @classmethod
    def parse(cls, body: bytes) -> Bind:
        c = Cursor(body)
        return cls(c.cstr(16), c.cstr(9), c.cstr(13), c.u8(), c.u8(), c.u8(), c.cstr(41))


@dataclass(frozen=True, slots=True)
class ShortMessage:
    """The body of submit_sm and deliver_sm (same layout, section 4.4.1 and 4.6.1)."""

    source_addr: str
    destination_addr: str
    short_message: bytes = b""
    service_type: str = ""
    source_addr_ton: int = 0
    source_addr_npi: int = 0
    dest_addr_ton: int = 0
    dest_addr_npi: int = 0
    esm_class: int = 0
    protocol_id: int = 0
    priority_flag: int = 0
    schedule_delivery_time: str = ""
    validity_period: str = ""
    registered_delivery: int = 0
    replace_if_present_flag: int = 0
    data_coding: int = 0
    sm_default_msg_id: int = 0
    tlvs: dict[int, bytes] = field(default_factory=dict)

    def body(self) -> bytes:
        if len(self.short_message) > 254:
            raise ValueError("short_message longer than 254 octets: use message_payload")
        return (
            cstr(self.service_type, 6)
            + bytes([self.source_addr_ton, self.source_addr_npi]) + cstr(self.source_addr, 21)
            + bytes([self.dest_addr_ton, self.dest_addr_npi]) + cstr(self.destination_addr, 21)
            + bytes([self.esm_class, self.protocol_id, self.priority_flag])
            + cstr(self.schedule_delivery_time, 17) + cstr(self.validity_period, 17)
            + bytes([self.registered_delivery, self.replace_if_present_flag, self.data_coding,
                     self.sm_default_msg_id, len(self.short_message)])
            + self.short_message
            + b"".join(tlv(tag, value) for tag, value in self.tlvs.items())
        )

    @classmethod
    def parse(cls, body: bytes) -> ShortMessage:
        c = Cursor(body)
        service_type = c.cstr(6)
        s_ton, s_npi, source = c.u8(), c.u8(), c.cstr(21)
        d_ton, d_npi, dest = c.u8(), c.u8(), c.cstr(21)
        esm, pid, prio = c.u8(), c.u8(), c.u8()
        schedule, validity = c.cstr(17), c.cstr(17)
        registered, replace, coding, default_id, length = c.u8(), c.u8(), c.u8(), c.u8(), c.u8()
        message = c.octets(length)
        return cls(
            source, dest, message, service_type, s_ton, s_npi, d_ton, d_npi, esm, pid, prio,
            schedule, validity, registered, replace, coding, default_id, c.tlvs(),
        )

    @property
    def payload(self) -> bytes:
        """The user data: ``message_payload`` when present, else ``short_message``."""
        return self.tlvs.get(TLV_MESSAGE_PAYLOAD, self.short_message)


def message_id_body(message_id: str) -> bytes:
    """The body of submit_sm_resp / deliver_sm_resp."""
    return cstr(message_id, 65)


def parse_message_id(body: bytes) -> str:
    """message_id of a submit_sm_resp (an error response may have no body at all)."""
    return Cursor(body).cstr(65) if body else ""
