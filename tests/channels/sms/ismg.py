"""A local ISMG (China Mobile SMS gateway) over TCP, from the CMPP 2.0/3.0 specification: checks
CMPP_CONNECT's authenticator itself, answers ACTIVE_TEST and CMPP_SUBMIT (with Msg_Ids), sends
CMPP_DELIVER and records every CMPP_DELIVER_RESP. Bodies are built with our codec, whose layouts
tests/channels/sms/test_cmpp_codec.py checks against an independent implementation's vectors."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

from gateway.channels.sms import cmpp_pdu as C
from tests.channels.sms.carrier import CarrierServer


@dataclass
class Ismg(CarrierServer):
    HEADER_SIZE = 12
    version: int
    source_addr: str = "901234"
    secret: str = "s3cret"
    port: int = 0
    connects: list[tuple[str, int, str]] = field(default_factory=list)
    """(Source_Addr, Version, timestamp) of every accepted CMPP_CONNECT."""
    refused: int = 0
    submits: list[C.Submit] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.connected = self.link_up
        self._seq = itertools.count(1)
        self._msg_ids = itertools.count(0x1000)
        self._waiting: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._raw: dict[int, asyncio.Future[tuple[int, bytes]]] = {}

    @staticmethod
    def _packet(command_id: int, seq: int, body: bytes, length: int | None = None) -> bytes:
        total = 12 + len(body) if length is None else length
        return struct.pack(">III", total, command_id, seq) + body

    def _send(self, writer: asyncio.StreamWriter, command_id: int, seq: int, body: bytes) -> None:
        writer.write(self._packet(command_id, seq, body))

    async def frame(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        rsize = 4 if self.version >= C.V30 else 1
        _, command_id, seq = struct.unpack(">III", head)
        if command_id == C.CONNECT:
            source, auth = body[:6].rstrip(b"\0").decode(), body[6:22]
            version, stamp = body[22], struct.unpack(">I", body[23:27])[0]
            ts = f"{stamp:010d}"
            expected = hashlib.md5(source.encode() + b"\0" * 9 + self.secret.encode()
                                   + ts.encode()).digest()
            status = 0 if (auth == expected and source == self.source_addr) else 3
            if status:
                self.refused += 1
            else:
                self.connects.append((source, version, ts))
            ismg_auth = hashlib.md5(status.to_bytes(rsize, "big") + auth
                                    + self.secret.encode()).digest()
            self._send(writer, C.CONNECT | C.RESP, seq,
                       status.to_bytes(rsize, "big") + ismg_auth + bytes([self.version]))
            if not status:
                self.connected.set()
        elif command_id == C.ACTIVE_TEST:
            self._send(writer, C.ACTIVE_TEST | C.RESP, seq, b"\0")
        elif command_id == C.SUBMIT:
            self.submits.append(C.Submit.parse(body, self.version))
            self._send(writer, C.SUBMIT | C.RESP, seq,
                       C.msg_id_resp(next(self._msg_ids), 0, self.version))
        elif command_id & C.RESP and seq in self._raw:
            self._raw.pop(seq).set_result((command_id, body))
        elif command_id & C.RESP:
            msg_id = int.from_bytes(body[:8], "big")
            result = int.from_bytes(body[8:8 + rsize], "big")
            future = self._waiting.pop(seq, None)
            if future is not None and not future.done():
                future.set_result((msg_id, result))

    async def deliver(self, **fields: Any) -> tuple[int, int]:
        """Send one CMPP_DELIVER; return the (Msg_Id, Result) of its CMPP_DELIVER_RESP."""
        seq = next(self._seq)
        packet = self._packet(C.DELIVER, seq, C.Deliver(**fields).encode(self.version))
        return await self.exchange(packet, seq, self._waiting)

    async def raw(self, command_id: int, body: bytes = b"", length: int | None = None
                  ) -> tuple[int, bytes]:
        """Send any packet (``length`` overrides Total_Length); return the answer's
        (Command_Id, body)."""
        seq = next(self._seq)
        return await self.exchange(self._packet(command_id, seq, body, length), seq, self._raw)
