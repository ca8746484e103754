"""The local spool: contacts that could not reach Redis, kept on disk until they can.

Records are appended to segment files, one line each: ``<crc32 hex> <json>``, and fsynced
before the caller's receipt. Concurrent appends share one write and one fsync. The replayer
closes the active segment, writes each closed segment's contacts to Redis (the intake script
deduplicates, so a replay that is interrupted can simply run again) and deletes it. A line
that fails its checksum or does not decode is moved to ``quarantine/``, never blocking the rest.

When a record cannot be set aside (the disk is full), the rest of its segment is still replayed
and the segment itself is moved (renamed, which needs no space) to ``quarantine/`` with the
suffix ``.unsettled``; if even that fails the segment is ``stuck``: skipped by the following
passes (retried every ``stuck_retry_s``), reported through ``stuck`` for ``/readyz``.

The spool also knows what it holds: the id of each spooled contact by (adapter, external id),
and the ids of spooled contacts, rebuilt from the segments by ``open``. So after a restart
while Redis is away, a retried contact still gets its first id, and events still wait behind
their contact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gateway.queueing.batching import Coalescer
from gateway.queueing.store import Prepared
from gateway.records import Attachment, Deadline, Event, Inbound, Sender
from gateway.server.permissions import open_private, private_dir

log = logging.getLogger(__name__)

SEGMENT_BYTES = 64 * 1024 * 1024
STUCK_RETRY_S = 10.0
"""How often a stuck segment is tried again (``Spool.stuck_retry_s``)."""


class SpoolError(Exception):
    """The spool cannot be written."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """An event written while Redis was away; ``stamp`` events are settled once per contact."""

    event: Event
    stamp: bool


def event_to_json(item: SpooledEvent) -> bytes:
    """Encode a spooled event (told apart from contacts by its ``kind``)."""
    return orjson.dumps({"kind": "event", "stamp": item.stamp, "event": item.event.to_dict()})


def record_from_json(data: bytes) -> Prepared | SpooledEvent:
    """Decode one spool line's JSON: a prepared contact or an event; raise on anything else."""
    d = orjson.loads(data)
    if isinstance(d, dict) and d.get("kind") == "event":
        return SpooledEvent(Event.from_dict(d["event"]), bool(d["stamp"]))
    return prepared_from_json(data)


def prepared_to_json(p: Prepared) -> bytes:
    """Encode a prepared contact for the spool (times as integer microseconds)."""
    i = p.inbound
    return orjson.dumps(
        {
            "id": p.id,
            "deadline": [p.deadline.kind, p.deadline.due_at, p.deadline.policy],
            "warn_at": p.warn_at,
            "channel": i.channel,
            "adapter": i.adapter,
            "external_id": i.external_id,
            "sender": [i.sender.address, i.sender.name],
            "recipient": i.recipient,
            "received_at": i.received_at,
            "text": i.text,
            "subject": i.subject,
            "language": i.language,
            "attachments": [
                [a.name, a.content_type, a.size, a.sha256, a.ref] for a in i.attachments
            ],
            "thread": i.thread,
            "origin_at": i.origin_at,
            "confidential": i.confidential,
            "meta": i.meta,
        }
    )


def prepared_from_json(data: bytes) -> Prepared:
    """Decode what :func:`prepared_to_json` wrote; raise on anything else."""
    d: dict[str, Any] = orjson.loads(data)
    kind, due_at, policy = d["deadline"]
    inbound = Inbound(
        channel=d["channel"],
        adapter=d["adapter"],
        external_id=d["external_id"],
        sender=Sender(*d["sender"]),
        recipient=d["recipient"],
        received_at=int(d["received_at"]),
        text=d["text"],
        subject=d["subject"],
        language=d["language"],
        attachments=tuple(Attachment(*a) for a in d["attachments"]),
        thread=d["thread"],
        origin_at=d["origin_at"],
        confidential=bool(d["confidential"]),
        meta=d["meta"],
    )
    return Prepared(str(d["id"]), inbound, Deadline(kind, int(due_at), policy), int(d["warn_at"]))


class Spool:
    """Durable, append-only local queue of prepared contacts."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.quarantine_dir = directory / "quarantine"
        self._active: Path | None = None
        self._fh: Any = None
        self._lock = asyncio.Lock()
        self._writer: Coalescer[bytes, None] = Coalescer(self._write_batch, max_inflight=1)
        self._count = 0
        self._index: dict[tuple[str, str], str] = {}
        self._held: set[str] = set()
        self._unsettled = False
        self.stuck: set[str] = set()
        """Names of segments that could neither be fully replayed nor set aside."""
        self._stuck_tried = 0.0
        self.stuck_retry_s = STUCK_RETRY_S

    def spooled_id(self, adapter: str, external_id: str) -> str | None:
        """The id of the spooled contact with this (adapter, external id), if any."""
        return self._index.get((adapter, external_id)) if external_id else None

    def holds(self, contact_id: str) -> bool:
        """True while contact ``contact_id`` waits in the spool."""
        return contact_id in self._held

    def _remember(self, prepared: Prepared) -> None:
        self._held.add(prepared.id)
        if prepared.inbound.external_id:
            self._index.setdefault(
                (prepared.inbound.adapter, prepared.inbound.external_id), prepared.id
            )

    def _forget(self, records: list[Prepared | SpooledEvent]) -> None:
        for record in records:
            if isinstance(record, Prepared):
                self._held.discard(record.id)
                key = (record.inbound.adapter, record.inbound.external_id)
                if self._index.get(key) == record.id:
                    del self._index[key]

    def check_writable(self) -> None:
        """Create the folder and prove it takes an fsynced write; raise SpoolError otherwise."""
        try:
            private_dir(self.dir)
            private_dir(self.quarantine_dir)
            probe = self.dir / ".probe"
            with open_private(probe, "wb") as fh:
                fh.write(b"ok")
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
        except OSError as exc:
            raise SpoolError(f"spool folder {self.dir} is not writable: {exc.strerror}") from exc

    def open(self) -> None:
        """Check the folder (see :meth:`check_writable`); count and index what an earlier run
        left (the contacts' ids by adapter and external id)."""
        self.check_writable()
        self._count = sum(self._scan(p) for p in self.segments(include_active=True))

    def _scan(self, path: Path) -> int:
        """Index the contacts of one segment; return its number of lines."""
        lines = 0
        try:
            with open(path, "rb") as fh:
                for line in fh:
                    lines += 1
                    with contextlib.suppress(ValueError):
                        record = _decode_line(line)
                        if isinstance(record, Prepared):
                            self._remember(record)
        except OSError as exc:
            log.error("spool: %s cannot be read: %s", path.name, exc.strerror)
        return lines

    def segments(self, include_active: bool = False) -> list[Path]:
        """Return the segment files, oldest first."""
        found = sorted(self.dir.glob("segment-*.log"))
        if not include_active and self._active is not None:
            found = [p for p in found if p != self._active]
        return found

    @property
    def depth(self) -> int:
        """Contacts waiting in the spool (approximate after a quarantine)."""
        return self._count

    def oldest_age_s(self) -> float:
        """Age of the oldest segment file in seconds (0 when empty)."""
        segments = self.segments(include_active=True)
        if not segments or self._count == 0:
            return 0.0
        try:
            return max(0.0, time.time() - segments[0].stat().st_mtime)
        except OSError:
            return 0.0

    async def append(self, prepared: Prepared) -> None:
        """Append one contact durably (fsynced) before returning."""
        line = prepared_to_json(prepared)
        await self._writer.submit(b"%08x %s\n" % (zlib.crc32(line), line))
        self._remember(prepared)

    async def append_event(self, item: SpooledEvent) -> None:
        """Append one event durably (fsynced) before returning."""
        line = event_to_json(item)
        await self._writer.submit(b"%08x %s\n" % (zlib.crc32(line), line))

    async def _write_batch(self, lines: list[bytes]) -> list[None]:
        async with self._lock:
            await asyncio.to_thread(self._write_sync, b"".join(lines))
            self._count += len(lines)
        return [None] * len(lines)

    def _write_sync(self, data: bytes) -> None:
        offset = None
        try:
            if self._fh is None or self._fh.tell() > SEGMENT_BYTES:
                self._open_new_segment()
            offset = self._fh.tell()
            self._fh.write(data)
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self._abandon_partial_write(offset)
            raise SpoolError(f"spool write failed: {exc.strerror}") from exc

    def _abandon_partial_write(self, offset: int | None) -> None:
        """Cut what a failed write left (the peer was refused) and start a fresh segment."""
        fh, self._fh, self._active = self._fh, None, None
        if fh is None:
            return
        with contextlib.suppress(OSError):
            if offset is not None:
                fh.truncate(offset)
        with contextlib.suppress(OSError):
            fh.close()

    def _open_new_segment(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"segment-{time.time_ns():020d}.log"
        self._active = self.dir / name
        self._fh = open_private(self._active)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    async def rotate(self) -> None:
        """Close the active segment so that the replayer may take it."""
        async with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
                self._active = None

    async def replay(
        self,
        write: Callable[[list[Prepared]], Awaitable[object]],
        apply: Callable[[SpooledEvent], Awaitable[object]],
        batch: int = 200,
    ) -> list[Prepared | SpooledEvent]:
        """Replay every closed segment in order: contacts in batches through ``write``, events
        one by one through ``apply`` (after the contacts before them). Delete each segment once
        replayed (or move it to quarantine, see the module docs) and return the records
        replayed.

        Raises whatever ``write`` or ``apply`` raise (Redis down again), and OSError when a
        segment cannot be read (no file descriptor left): the segment stays, and replaying it
        again is harmless (contacts dedupe, stamps are once per contact).
        """
        await self.rotate()
        replayed: list[Prepared | SpooledEvent] = []
        retry_stuck = time.monotonic() - self._stuck_tried >= self.stuck_retry_s
        if retry_stuck:
            self._stuck_tried = time.monotonic()
        for segment in self.segments():
            if segment.name in self.stuck and not retry_stuck:
                continue
            self._unsettled = False
            records = await asyncio.to_thread(self._read_segment, segment)
            pending: list[Prepared] = []
            for record in records:
                if isinstance(record, SpooledEvent):
                    if pending:
                        await write(pending)
                        pending = []
                    await apply(record)
                    continue
                pending.append(record)
                if len(pending) >= batch:
                    await write(pending)
                    pending = []
            if pending:
                await write(pending)
            replayed.extend(records)
            self._forget(records)
            if await asyncio.to_thread(self._settle, segment):
                self._count = max(0, self._count - len(records))
                log.info("spool: replayed %d records from %s", len(records), segment.name)
        return replayed

    def _settle(self, segment: Path) -> bool:
        """Delete a replayed segment, or move it whole to quarantine when some of its records
        could not be set aside; False if it has to stay (``stuck``)."""
        try:
            if not self._unsettled:
                segment.unlink()
            else:
                private_dir(self.quarantine_dir)
                target = self.quarantine_dir / f"{segment.name}.unsettled"
                os.replace(segment, target)
                log.error(
                    "spool: %s moved whole to %s: some of its records could not be set aside "
                    "(the others were replayed)",
                    segment.name,
                    target,
                )
        except OSError as exc:
            if segment.name not in self.stuck:
                log.error(
                    "spool: %s can neither be set aside nor removed (%s); the other segments "
                    "go on, it is retried every %.0f s",
                    segment.name,
                    exc.strerror,
                    self.stuck_retry_s,
                )
            self.stuck.add(segment.name)
            return False
        if segment.name in self.stuck:
            log.warning("spool: %s settled at last", segment.name)
        self.stuck.discard(segment.name)
        return True

    def _read_segment(self, segment: Path) -> list[Prepared | SpooledEvent]:
        records: list[Prepared | SpooledEvent] = []
        bad: list[bytes] = []
        with open(segment, "rb") as fh:
            for line in fh:
                try:
                    records.append(_decode_line(line))
                except ValueError:
                    bad.append(line)
        if bad:
            target = self.quarantine_dir / segment.name
            try:
                private_dir(self.quarantine_dir)
                with open_private(target) as out:
                    out.writelines(bad)
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:
                self._unsettled = True
                log.error(
                    "spool: %d corrupt records of %s cannot be quarantined: %s",
                    len(bad),
                    segment.name,
                    exc.strerror,
                )
            else:
                self._count = max(0, self._count - len(bad))
                log.error("spool: %d corrupt records quarantined to %s", len(bad), target)
        return records

    def quarantine(self, records: list[Prepared | SpooledEvent], reason: str) -> None:
        """Set aside records the server refuses for good (blocking), with the reason. When that
        fails, their segment is moved whole to quarantine once replayed (see ``replay``)."""
        target = self.quarantine_dir / f"refused-{time.time_ns():020d}.log"
        try:
            private_dir(self.quarantine_dir)
            with open_private(target) as out:
                for record in records:
                    if isinstance(record, SpooledEvent):
                        line = event_to_json(record)
                    else:
                        line = prepared_to_json(record)
                    out.write(b"%08x %s\n" % (zlib.crc32(line), line))
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            self._unsettled = True
            log.error(
                "spool: %d records refused by Redis (%s) cannot be quarantined: %s",
                len(records),
                reason,
                exc.strerror,
            )
            return
        log.error(
            "spool: %d records refused by Redis (%s) quarantined to %s",
            len(records),
            reason,
            target,
        )

    async def close(self) -> None:
        await self._writer.drain()
        await self.rotate()


def _decode_line(line: bytes) -> Prepared | SpooledEvent:
    """Decode one spool line (``<crc32 hex> <json>\\n``); raise ValueError if torn or corrupt."""
    if not line.endswith(b"\n") or line[8:9] != b" ":
        raise ValueError("torn or malformed line")
    try:
        crc, body = int(line[:8], 16), line[9:-1]
        if zlib.crc32(body) != crc:
            raise ValueError("checksum mismatch")
        return record_from_json(body)
    except (ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        raise ValueError(str(exc)) from exc
