"""China Mobile CMPP 2.0 / 3.0 packets (the ISMG interface specification, sections 6-7).

A packet is a 12-octet header (Total_Length, Command_Id, Sequence_Id, big-endian unsigned) and
a body of fixed-size fields: Octet Strings padded with NUL on the right. 2.0 and 3.0 differ in
field sizes (terminal ids 21 vs 32 octets, Result 1 vs 4 octets, Status 1 vs 4 in
CMPP_CONNECT_RESP) and 3.0 adds terminal types and LinkID (20) where 2.0 has Reserve (8).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Final

from gateway.channels.sms import link
from gateway.channels.sms.link import Malformed as Malformed

FRAMING: Final = link.Framing(with_status=False)
MAX_PACKET: Final = 4096

CONNECT: Final = 0x00000001
TERMINATE: Final = 0x00000002
SUBMIT: Final = 0x00000004
DELIVER: Final = 0x00000005
ACTIVE_TEST: Final = 0x00000008
RESP: Final = 0x80000000

V20: Final = 0x20
V30: Final = 0x30

FMT_ASCII: Final = 0
FMT_BINARY: Final = 4
FMT_UCS2: Final = 8
FMT_GBK: Final = 15

DELIVER_OK: Final = 0
DELIVER_FLOW_CONTROL: Final = 8
"""CMPP_DELIVER_RESP Result 8 (flow control error): not taken, the ISMG delivers it again."""
DELIVER_STRUCTURE: Final = 1
"""Result 1 (message structure error): a deliver we will never take (no source number)."""
DELIVER_OTHER: Final = 9
"""Result 9 (other error): a deliver that cannot become a contact, refused for good."""
SUBMIT_FLOW_CONTROL: Final = 8


@dataclass(frozen=True, slots=True)
class Packet:
    command_id: int
    seq: int
    body: bytes = b""

    def encode(self) -> bytes:
        return FRAMING.encode(self.command_id, self.seq, self.body)


def octets(value: str | bytes, size: int) -> bytes:
    """A fixed-size Octet String, NUL-padded (longer is cut)."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw[:size].ljust(size, b"\x00")


def text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("latin-1")


class Cursor(link.Cursor):
    def skip(self, n: int) -> str:
        """Pass over a reserved field (2.0's Reserve); its value is no field of ours."""
        self.take(n)
        return ""

    def str(self, n: int) -> str:
        return text(self.take(n))


def terminal_size(version: int) -> int:
    return 32 if version >= V30 else 21


def result_size(version: int) -> int:
    return 4 if version >= V30 else 1


def authenticator(source_addr: str, secret: str, timestamp: str) -> bytes:
    """AuthenticatorSource = MD5(Source_Addr + 9 NUL + shared secret + "MMDDHHMMSS")."""
    raw = source_addr.encode("ascii") + b"\x00" * 9 + secret.encode("utf-8") + timestamp.encode()
    return hashlib.md5(raw, usedforsecurity=False).digest()


def connect_body(source_addr: str, secret: str, version: int, timestamp: str) -> bytes:
    return (octets(source_addr, 6) + authenticator(source_addr, secret, timestamp)
            + bytes([version]) + struct.pack(">I", int(timestamp)))


def parse_connect_resp(body: bytes, version: int) -> tuple[int, bytes, int]:
    """(Status, AuthenticatorISMG, Version) of a CMPP_CONNECT_RESP."""
    c = Cursor(body)
    status = c.uint(result_size(version))
    return status, c.take(16), c.u8()


def msg_id_resp(msg_id: int, result: int, version: int) -> bytes:
    """The body of CMPP_SUBMIT_RESP / CMPP_DELIVER_RESP."""
    return struct.pack(">Q", msg_id) + result.to_bytes(result_size(version), "big")


def parse_msg_id_resp(body: bytes, version: int) -> tuple[int, int]:
    c = Cursor(body)
    return c.uint(8), c.uint(result_size(version))


@dataclass(frozen=True, slots=True)
class Report:
    """A status report (the Msg_Content of a CMPP_DELIVER with Registered_Delivery = 1)."""

    msg_id: int
    stat: str
    submit_time: str
    done_time: str
    dest_terminal_id: str
    smsc_sequence: int

    def encode(self, version: int) -> bytes:
        return (struct.pack(">Q", self.msg_id) + octets(self.stat, 7) + octets(self.submit_time, 10)
                + octets(self.done_time, 10) + octets(self.dest_terminal_id, terminal_size(version))
                + struct.pack(">I", self.smsc_sequence))

    @classmethod
    def parse(cls, data: bytes, version: int) -> Report:
        c = Cursor(data)
        return cls(c.uint(8), c.str(7), c.str(10), c.str(10), c.str(terminal_size(version)),
                   c.uint(4))


@dataclass(frozen=True, slots=True)
class Deliver:
    msg_id: int
    dest_id: str
    src_terminal_id: str
    msg_content: bytes
    msg_fmt: int = 0
    service_id: str = ""
    tp_pid: int = 0
    tp_udhi: int = 0
    src_terminal_type: int = 0
    registered_delivery: int = 0
    link_id: str = ""

    def encode(self, version: int) -> bytes:
        v3 = version >= V30
        return (
            struct.pack(">Q", self.msg_id) + octets(self.dest_id, 21) + octets(self.service_id, 10)
            + bytes([self.tp_pid, self.tp_udhi, self.msg_fmt])
            + octets(self.src_terminal_id, terminal_size(version))
            + (bytes([self.src_terminal_type]) if v3 else b"")
            + bytes([self.registered_delivery, len(self.msg_content)]) + self.msg_content
            + (octets(self.link_id, 20) if v3 else b"\x00" * 8)
        )

    @classmethod
    def parse(cls, body: bytes, version: int) -> Deliver:
        v3 = version >= V30
        c = Cursor(body)
        msg_id, dest_id, service_id = c.uint(8), c.str(21), c.str(10)
        tp_pid, tp_udhi, msg_fmt = c.u8(), c.u8(), c.u8()
        src = c.str(terminal_size(version))
        src_type = c.u8() if v3 else 0
        registered, length = c.u8(), c.u8()
        content = c.take(length)
        link_id = c.str(20) if v3 else c.skip(8)
        return cls(msg_id, dest_id, src, content, msg_fmt, service_id, tp_pid, tp_udhi, src_type,
                   registered, link_id)


@dataclass(frozen=True, slots=True)
class Submit:
    src_id: str
    dest_terminal_ids: tuple[str, ...]
    msg_content: bytes
    msg_fmt: int = FMT_UCS2
    msg_src: str = ""
    service_id: str = ""
    pk_total: int = 1
    pk_number: int = 1
    registered_delivery: int = 1
    msg_level: int = 0
    fee_user_type: int = 0
    fee_terminal_id: str = ""
    fee_terminal_type: int = 0
    tp_pid: int = 0
    tp_udhi: int = 0
    fee_type: str = "01"
    fee_code: str = "0"
    valid_time: str = ""
    at_time: str = ""
    dest_terminal_type: int = 0
    link_id: str = ""
    msg_id: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def encode(self, version: int) -> bytes:
        v3 = version >= V30
        size = terminal_size(version)
        return (
            struct.pack(">Q", self.msg_id)
            + bytes([self.pk_total, self.pk_number, self.registered_delivery, self.msg_level])
            + octets(self.service_id, 10) + bytes([self.fee_user_type])
            + octets(self.fee_terminal_id, size)
            + (bytes([self.fee_terminal_type]) if v3 else b"")
            + bytes([self.tp_pid, self.tp_udhi, self.msg_fmt])
            + octets(self.msg_src, 6) + octets(self.fee_type, 2) + octets(self.fee_code, 6)
            + octets(self.valid_time, 17) + octets(self.at_time, 17) + octets(self.src_id, 21)
            + bytes([len(self.dest_terminal_ids)])
            + b"".join(octets(d, size) for d in self.dest_terminal_ids)
            + (bytes([self.dest_terminal_type]) if v3 else b"")
            + bytes([len(self.msg_content)]) + self.msg_content
            + (octets(self.link_id, 20) if v3 else b"\x00" * 8)
        )

    @classmethod
    def parse(cls, body: bytes, version: int) -> Submit:
        v3 = version >= V30
        size = terminal_size(version)
        c = Cursor(body)
        msg_id = c.uint(8)
        pk_total, pk_number, registered, level = c.u8(), c.u8(), c.u8(), c.u8()
        service_id, fee_user_type, fee_terminal = c.str(10), c.u8(), c.str(size)
        fee_terminal_type = c.u8() if v3 else 0
        tp_pid, tp_udhi, fmt = c.u8(), c.u8(), c.u8()
        msg_src, fee_type, fee_code = c.str(6), c.str(2), c.str(6)
        valid, at, src = c.str(17), c.str(17), c.str(21)
        dests = tuple(c.str(size) for _ in range(c.u8()))
        dest_type = c.u8() if v3 else 0
        content = c.take(c.u8())
        link_id = c.str(20) if v3 else c.skip(8)
        return cls(src, dests, content, fmt, msg_src, service_id, pk_total, pk_number, registered,
                   level, fee_user_type, fee_terminal, fee_terminal_type, tp_pid, tp_udhi,
                   fee_type, fee_code, valid, at, dest_type, link_id, msg_id)
