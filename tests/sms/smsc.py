"""A local SMSC over TCP whose PDUs are encoded and decoded by smpplib (an independent SMPP 3.4
codec, not ours): binds, answers enquire_link and submit_sm, delivers deliver_sm and records
every answer. ``raw`` sends arbitrary bytes for the fault cases."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from dataclasses import dataclass, field
from typing import Any

from smpplib import smpp


class _Seq:
    """smpplib's PDU asks its client for sequence numbers."""

    def __init__(self) -> None:
        self.counter = itertools.count(1)
        self.sequence = 0

    def next_sequence(self) -> int:
        self.sequence = next(self.counter)
        return self.sequence


@dataclass
class Smsc:
    accept_bind: bool = True
    binds: list[Any] = field(default_factory=list)
    submits: list[Any] = field(default_factory=list)
    answers: list[tuple[int, int, int]] = field(default_factory=list)
    """(command_id, status, sequence) of every response the ESME sent."""
    port: int = 0
    message_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(0xA000))

    def __post_init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._seq = _Seq()
        self._waiting: dict[int, asyncio.Future[tuple[int, int, int]]] = {}
        self.bound = asyncio.Event()
        self.enquire_links = 0
        self.submit_delay = 0.0
        """Answer submit_sm only after this long (to see the ESME's window fill)."""
        self.in_flight = 0
        self.max_in_flight = 0

    async def start(self) -> Smsc:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop(self) -> None:
        """Cut every bind (as a carrier's restart does)."""
        self.bound.clear()
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readexactly(16)
                length = struct.unpack(">I", head[:4])[0]
                data = head + await reader.readexactly(length - 16)
                command_id, status, seq = struct.unpack(">III", data[4:16])
                if command_id & 0x80000000:
                    self.answers.append((command_id, status, seq))
                    future = self._waiting.pop(seq, None)
                    if future is not None and not future.done():
                        future.set_result((command_id, status, seq))
                    continue
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
                        continue
                else:
                    resp = smpp.make_pdu("generic_nack", client=self._seq, status=3)
                resp.sequence = seq
                writer.write(resp.generate())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._writers.remove(writer)
            writer.close()

    def _answer_late(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        self.in_flight -= 1
        if not writer.is_closing():
            writer.write(data)

    async def raw(self, data: bytes, seq: int) -> tuple[int, int, int]:
        """Send bytes on the bind; wait for the ESME's answer carrying ``seq``."""
        future: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        writer = self._writers[-1]
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(future, 10)

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
