"""A local SMSC over TCP whose PDUs are encoded and decoded by smpplib (an independent SMPP 3.4
codec, not ours): binds, answers enquire_link and submit_sm, delivers deliver_sm and records
every answer. ``raw`` sends arbitrary bytes for the fault cases."""

from __future__ import annotations

import asyncio
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

from smpplib import smpp

from tests.channels.sms.carrier import CarrierServer


class _Seq:
    """smpplib's PDU asks its client for sequence numbers."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.sequence = 0

    def next_sequence(self) -> int:
        self.sequence = next(self.counter)
        return self.sequence


@dataclass
class Smsc(CarrierServer):
    accept_bind: bool = True
    binds: list[Any] = field(default_factory=list)
    submits: list[Any] = field(default_factory=list)
    answers: list[tuple[int, int, int]] = field(default_factory=list)
    """(command_id, status, sequence) of every response the ESME sent."""
    port: int = 0
    message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0xA000))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.bound = self.link_up
        self._seq = _Seq()
        self._waiting: dict[int, asyncio.Future[tuple[int, int, int]]] = {}
        self.enquire_links = 0
        self.submit_delay = 0.0
        """Answer submit_sm only after this long (to see the ESME's window fill)."""
        self.in_flight = 0
        self.max_in_flight = 0

    async def frame(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        data = head + body
        command_id, status, seq = struct.unpack(">III", data[4:16])
        if command_id & 0x80000000:
            self.answers.append((command_id, status, seq))
            future = self._waiting.pop(seq, None)
            if future is not None and not future.done():
                future.set_result((command_id, status, seq))
            return
        pdu = smpp.parse_pdu(data, client=self._seq)
        if pdu.command == "bind_transceiver":
            self.binds.append(pdu)
            ok = self.accept_bind
            resp = smpp.make_pdu("bind_transceiver_resp", client=self._seq,
                                 system_id="SMSC", status=0 if ok else 0x0E)
            if ok:
                self.bound.set()
        elif pdu.command == "enquire_link":
            self.enquire_links += 1
            resp = smpp.make_pdu("enquire_link_resp", client=self._seq)
        elif pdu.command == "submit_sm":
            self.submits.append(pdu)
            resp = smpp.make_pdu("submit_sm_resp", client=self._seq,
                                 message_id=f"{next(self.message_ids):X}")
            if self.submit_delay:
                resp.sequence = seq
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                asyncio.get_running_loop().call_later(
                    self.submit_delay, self._answer_late, writer, resp.generate())
                return
        else:
            resp = smpp.make_pdu("generic_nack", client=self._seq, status=3)
        resp.sequence = seq
        writer.write(resp.generate())

    def _answer_late(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.in_flight -= 1
        if not writer.is_closing():
            writer.write(data)

    async def raw(self, data: bytes, seq: int) -> tuple[int, int, int]:
        """Send bytes on the bind; wait for the ESME's answer carrying ``seq``."""
        return await self.exchange(data, seq, self._waiting)

    def make(self, command: str, **fields: Any) -> Any:
        """A PDU made by smpplib, with the next sequence number."""
        return smpp.make_pdu(command, client=self._seq, **fields)

    async def deliver(self, **fields: Any) -> int:
        """Send one deliver_sm made by smpplib; return the deliver_sm_resp status."""
        pdu = self.make("deliver_sm", **fields)
        data = pdu.generate()
        command_id, status, _ = await self.raw(data, pdu.sequence)
        assert command_id == 0x80000005, hex(command_id)
        return status
