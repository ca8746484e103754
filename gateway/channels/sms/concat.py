"""Concatenated SMS: parts that arrive one by one (UDH reference, part, total) become one contact.

A part is acknowledged to the provider only once it is durable: each part is written to its
own file under the adapter's data folder (fsync of the file, then of the folder, after the
rename), like Intake's spool. Holding parts in memory and answering 200 would lose them on a
crash; answering 503 until every part is there would make the provider retry parts we already
have, and most providers give up (Kannel then sends the citizen an error SMS) long before the
last part comes. When every part is present the group is handed over at once; otherwise, after
``timeout``, the parts present are handed over marked incomplete. The files are deleted only
after the hand-over succeeded, so a crash or an unavailable Intake only means a later retry (the
startup reload and the sweeper both retry); the hand-over's external id is derived from the part
ids, so a retry after a crash between submit and delete is a duplicate for Intake.

In a fleet (``state``: the adapter's shared state), parts live in Redis instead, under
``parts:<group>`` (one field per part number) with an index ``open`` of the groups being
collected, so parts of one message that reach different instances join: whichever instance
stores the last part hands the message over; every instance's sweeper hands over what timed
out. Parts are removed only after the hand-over (two instances handing over the same parts
give one contact: the external id is the same), and ``done:<part id>`` remembers handed-over
parts for ``remember_s``. While Redis is away, parts go to the files as above: each process
(each worker of one data folder) in a folder of its own (see ``Assembler.load``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import glob
import hashlib
import itertools
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.server.lock import DataDirBusy, DataDirLock

if TYPE_CHECKING:
    from gateway.queueing.coordination import SharedState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Concat:
    """The concatenation element of one part: reference, total parts, part number (from 1)."""

    ref: int
    total: int
    seq: int


def parse_udh(udh: bytes) -> Concat | None:
    """Return the concatenation element of a User Data Header (IEI 0x00 or 0x08), or None."""
    if len(udh) < 2:
        return None
    length = udh[0]
    body = udh[1 : 1 + length]
    i = 0
    while i + 2 <= len(body):
        iei, iel = body[i], body[i + 1]
        value = body[i + 2 : i + 2 + iel]
        if len(value) < iel:
            return None
        if iei == 0x00 and iel == 3:
            ref, total, seq = value[0], value[1], value[2]
        elif iei == 0x08 and iel == 4:
            ref, total, seq = (value[0] << 8) | value[1], value[2], value[3]
        else:
            i += 2 + iel
            continue
        if total < 1 or not 1 <= seq <= total:
            return None
        return Concat(ref, total, seq)
    return None


@dataclass(frozen=True, slots=True)
class Part:
    """One stored part. ``data`` is the undecoded text; ``charset`` says how to decode it."""

    group: str
    """Stable key of the message the part belongs to (sender, recipient, reference, total)."""
    seq: int
    total: int
    external_id: str
    data: bytes
    charset: str
    received_at: Micros
    origin_at: Micros | None
    sender: str
    recipient: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "group": self.group,
                "seq": self.seq,
                "total": self.total,
                "external_id": self.external_id,
                "data": base64.b64encode(self.data).decode("ascii"),
                "charset": self.charset,
                "received_at": self.received_at,
                "origin_at": self.origin_at,
                "sender": self.sender,
                "recipient": self.recipient,
                "meta": self.meta,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> Part:
        d = orjson.loads(raw)
        return cls(
            group=str(d["group"]),
            seq=int(d["seq"]),
            total=int(d["total"]),
            external_id=str(d["external_id"]),
            data=base64.b64decode(d["data"]),
            charset=str(d["charset"]),
            received_at=int(d["received_at"]),
            origin_at=None if d.get("origin_at") is None else int(d["origin_at"]),
            sender=str(d["sender"]),
            recipient=str(d["recipient"]),
            meta=dict(d.get("meta") or {}),
        )


def group_key(sender: str, recipient: str, concat: Concat) -> str:
    """Return the key that identifies one concatenated message."""
    return f"{sender}|{recipient}|{concat.ref}|{concat.total}"


def assembled_id(parts: list[Part]) -> str:
    """Return the external id of an assembled message: stable for the same set of parts."""
    ids = "\n".join(sorted(p.external_id for p in parts))
    return "concat:" + hashlib.sha256(ids.encode("utf-8")).hexdigest()[:32]


Handover = Callable[[list[Part], bool], Awaitable[object]]
"""Called with the parts in order and ``complete``; raises to say "not now, retry later"."""


@dataclass(frozen=True, slots=True)
class Added:
    """What became of a part: ``stored`` (False for a duplicate) and the hand-over's result,
    when this part completed the message and the hand-over succeeded at once."""

    stored: bool
    handed_over: object | None = None


@dataclass(slots=True)
class _Group:
    parts: dict[int, Part]
    first_seen: Micros
    busy: bool = False


class Assembler:
    """Collects parts durably and hands each message over once complete or timed out."""

    def __init__(
        self,
        directory: Path,
        timeout_s: float,
        clock: Clock,
        handover: Handover,
        *,
        retry_s: float = 5.0,
        remember_s: float = 3600.0,
        state: SharedState | None = None,
    ) -> None:
        self.state = state
        self.base = directory
        self.directory = directory
        """This process's parts folder: ``directory`` or a sibling (see :meth:`load`)."""
        self._lock: DataDirLock | None = None
        self.timeout_us = int(timeout_s * MICROS_PER_SECOND)
        self.clock = clock
        self.handover = handover
        self.retry_us = int(retry_s * MICROS_PER_SECOND)
        self.remember_us = int(remember_s * MICROS_PER_SECOND)
        self._groups: dict[str, _Group] = {}
        self._done: dict[str, Micros] = {}
        """Part ids already handed over, and when: a provider's late retry is a duplicate."""
        self._next_try: dict[str, Micros] = {}
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def load(self) -> int:
        """Take a parts folder of this process's own and reload the parts left in it by an
        earlier run, and in any sibling folder no live process holds; return how many.

        The workers of ``gateway serve --workers N`` share one data folder: each locks a folder
        (``directory``, else ``directory-1``, ``-2``...; ``flock``, released when the process
        dies or the assembler stops), so a worker never reloads, hands over or deletes the
        parts another live worker holds. Part files of a folder nobody holds (a worker that
        died, a larger ``--workers`` before) are moved into this process's folder.
        """
        self._claim()
        count = 0
        for path in sorted(self.directory.glob("*.part")):
            try:
                part = Part.from_json(path.read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("unreadable SMS part %s quarantined: %s", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".bad"))
                continue
            group = self._groups.setdefault(part.group, _Group({}, part.received_at))
            held = group.parts.get(part.seq)
            if held is not None and held.external_id == part.external_id:
                continue
            if held is not None:
                self._retire(part.group)
                group = self._groups.setdefault(part.group, _Group({}, part.received_at))
            group.parts[part.seq] = part
            group.first_seen = min(group.first_seen, part.received_at)
            count += 1
        return count

    def _claim(self) -> None:
        if self._lock is not None:
            return
        base = self.base
        for k in itertools.count():
            folder = base if k == 0 else base.with_name(f"{base.name}-{k}")
            lock = DataDirLock(folder)
            try:
                lock.acquire()
            except DataDirBusy:
                continue
            self.directory, self._lock = folder, lock
            break
        for other in (base, *sorted(base.parent.glob(f"{glob.escape(base.name)}-*"))):
            if other == self.directory or not other.is_dir():
                continue
            orphan = DataDirLock(other)
            try:
                orphan.acquire()
            except DataDirBusy:
                continue  # a live worker's
            try:
                moved = self._adopt(other)
            finally:
                orphan.release()
            if moved:
                log.warning("%d SMS part file(s) of %s taken over", moved, other.name)

    def _adopt(self, other: Path) -> int:
        """Move ``other``'s part files into this process's folder; return how many."""
        moved = 0
        for path in other.glob("*.part"):
            target = self.directory / path.name
            if target.exists():  # the same part (the name is its digest): one copy is enough
                path.unlink()
            else:
                os.replace(path, target)
                moved += 1
        _fsync_dir(self.directory)
        _fsync_dir(other)
        return moved

    def _retire(self, key: str) -> str:
        """Move the group held under ``key`` to a key of its own; return that key."""
        n = 1
        while f"{key}#{n}" in self._groups:
            n += 1
        new_key = f"{key}#{n}"
        group = self._groups.pop(key, None)
        if group is not None:
            self._groups[new_key] = group
        return new_key

    async def start(self, interval_s: float = 1.0) -> None:
        """Start the sweeper that hands over expired groups (call :meth:`load` first, before
        the webhook can receive parts)."""
        if self._task is None:
            self._task = asyncio.create_task(self._sweep_forever(interval_s), name="sms-concat")

    async def stop(self) -> None:
        """Stop the sweeper; parts stay on disk for the next start (the folder is let go)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    async def _sweep_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("concatenated SMS sweep failed")

    # ------------------------------------------------------------------ parts

    @property
    def pending(self) -> int:
        """Parts held, not yet handed over."""
        return sum(len(g.parts) for g in self._groups.values())

    async def held(self) -> int:
        """Parts held, not yet handed over: in the files and (reachable) shared state."""
        count = self.pending
        if self.state is not None:
            with contextlib.suppress(Exception):
                for group in await self.state.hash_all("open"):
                    count += len(await _held_shared(self.state, group))
        return count

    def is_duplicate(self, part: Part) -> bool:
        """True when this exact part (same provider id) is held or was already handed over."""
        if part.external_id in self._done:
            return True
        group = self._groups.get(part.group)
        held = group.parts.get(part.seq) if group else None
        return held is not None and held.external_id == part.external_id

    async def add(self, part: Part) -> Added:
        """Store ``part`` durably; hand the message over if it is now complete.

        A duplicate writes nothing (``stored`` False). Raises OSError when the part could not
        be made durable: the caller must then refuse the request (503) so the provider retries.
        A failed hand-over does not raise: the part is safe and the sweeper retries.
        """
        if self.is_duplicate(part):
            return Added(stored=False)
        if self.state is not None:
            try:
                return await self._add_shared(part, self.state)
            except Exception as exc:  # Redis away: the part goes to a file instead
                log.warning("SMS part kept locally, shared state unavailable: %s", exc)
        group = self._groups.get(part.group)
        if group is not None and part.seq in group.parts:
            # Same reference, same part number, another message: the older one is over.
            await self._handover(self._retire(part.group), complete=False)
        await asyncio.to_thread(self._write, part)
        group = self._groups.setdefault(part.group, _Group({}, part.received_at))
        group.parts[part.seq] = part
        group.first_seen = min(group.first_seen, part.received_at)
        if len(group.parts) >= part.total:
            ok, result = await self._handover(part.group, complete=True)
            if ok:
                return Added(stored=True, handed_over=result)
        return Added(stored=True)

    async def _add_shared(self, part: Part, state: SharedState) -> Added:
        key, _ = await _parts_keys(state, part.group)
        done = await _done_key(state, part.external_id)
        if await state.get(done) is not None:
            return Added(stored=False)
        held = await _held_shared(state, part.group)
        same = held.get(part.seq)
        if same is not None and same.external_id == part.external_id:
            return Added(stored=False)
        if same is not None:  # same reference and part number, another message: hand it over
            await self._handover_shared(part.group, state, complete=False, parts=held)
            held = {}
        ttl_s = (self.timeout_us + self.remember_us) / MICROS_PER_SECOND
        count = await state.hash_add(key, str(part.seq), part.to_json(), ttl_s)
        if await state.get(done) is not None:
            # Read again once stored: another instance may have handed the message over (it
            # marks the parts done before it removes them) between our first read and our
            # write, and this retry, held alone, would go out again as an incomplete message.
            # Marked done after this read, its removal comes after our write and takes it.
            await state.hash_remove(key, str(part.seq))
            return Added(stored=False)
        count = max(count, len({*held, part.seq}))  # with parts under the name before
        await state.hash_add("open", part.group, b"1", ttl_s)
        if count >= part.total:
            ok, result = await self._handover_shared(part.group, state, complete=True)
            return Added(stored=True, handed_over=result if ok else None)
        return Added(stored=True)

    async def _handover_shared(
        self,
        group: str,
        state: SharedState,
        *,
        complete: bool,
        parts: dict[int, Part] | None = None,
    ) -> tuple[bool, object | None]:
        """Hand over the group's parts, then remove them (a crash in between repeats the
        hand-over, which Intake takes as a duplicate)."""
        keys = await _parts_keys(state, group)
        held = parts if parts is not None else await _held_shared(state, group)
        if not held:
            await state.hash_remove("open", group)
            return False, None
        ordered = [held[s] for s in sorted(held)]
        try:
            result = await self.handover(ordered, complete)
        except Exception as exc:
            self._next_try[group] = self.clock.now_us() + self.retry_us
            log.warning("concatenated SMS hand-over deferred (%d parts): %s", len(ordered), exc)
            return False, None
        ttl_s = self.remember_us / MICROS_PER_SECOND
        try:
            for p in ordered:
                await state.put(await _done_key(state, p.external_id), b"1", ttl_s)
            left = [await state.hash_remove(k, *(str(s) for s in held)) for k in keys]
            if sum(left) == 0:
                await state.hash_remove("open", group)
        except Exception as exc:  # handed over: a sweeper repeats it, Intake dedupes
            log.warning("concatenated SMS handed over, parts not yet removed: %s", exc)
        return True, result

    async def _sweep_shared(self, state: SharedState, now: Micros) -> int:
        handed = 0
        for group in await state.hash_all("open"):
            if now < self._next_try.get(group, 0):
                continue
            held = await _held_shared(state, group)
            if not held:
                await state.hash_remove("open", group)
                continue
            complete = len(held) >= max(p.total for p in held.values())
            first_seen = min(p.received_at for p in held.values())
            if complete or now - first_seen >= self.timeout_us:
                ok, _ = await self._handover_shared(group, state, complete=complete, parts=held)
                handed += ok
        return handed

    async def sweep(self) -> int:
        """Hand over groups past the timeout (and retry failed hand-overs); return how many went."""
        now = self.clock.now_us()
        handed = 0
        if self.state is not None:
            try:
                handed += await self._sweep_shared(self.state, now)
            except Exception as exc:
                log.warning("concatenated SMS sweep of shared parts failed: %s", exc)
        return handed + await self._sweep_local(now)

    async def _sweep_local(self, now: Micros) -> int:
        for pid, at in list(self._done.items()):
            if now - at > self.remember_us:
                del self._done[pid]
        handed = 0
        for key, group in list(self._groups.items()):
            if group.busy or now < self._next_try.get(key, 0):
                continue
            complete = len(group.parts) >= max(p.total for p in group.parts.values())
            if complete or now - group.first_seen >= self.timeout_us:
                ok, _ = await self._handover(key, complete=complete)
                handed += ok
        return handed

    async def _handover(self, key: str, *, complete: bool) -> tuple[bool, object | None]:
        group = self._groups.get(key)
        if group is None or group.busy or not group.parts:
            return False, None
        group.busy = True
        parts = [group.parts[s] for s in sorted(group.parts)]
        try:
            result = await self.handover(parts, complete)
        except Exception as exc:
            group.busy = False
            self._next_try[key] = self.clock.now_us() + self.retry_us
            log.warning("concatenated SMS hand-over deferred (%d parts): %s", len(parts), exc)
            return False, None
        except BaseException:
            group.busy = False
            raise
        now = self.clock.now_us()
        for p in parts:
            self._done[p.external_id] = now
        # The group may have been moved to another key meanwhile (a reused reference).
        for k, g in list(self._groups.items()):
            if g is group:
                del self._groups[k]
                self._next_try.pop(k, None)
        await asyncio.to_thread(self._remove, parts)
        return True, result

    # ------------------------------------------------------------------ files

    def _path(self, part: Part) -> Path:
        digest = hashlib.sha256(f"{part.group}|{part.external_id}".encode()).hexdigest()[:40]
        return self.directory / f"{digest}-{part.seq:03d}.part"

    def _write(self, part: Part) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(part.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path(part))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)

    def _remove(self, parts: list[Part]) -> None:
        for p in parts:
            with contextlib.suppress(OSError):
                self._path(p).unlink()
        with contextlib.suppress(OSError):
            _fsync_dir(self.directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _parts_keys(state: SharedState, group: str) -> tuple[str, str]:
    """The hash of a group's parts, named by the pseudonym of the group (which holds the sender's
    and recipient's numbers), and the name it had before (the group itself), still read and
    cleared so that parts held across the upgrade join (it expires with them)."""
    return f"parts:{await state.private(group)}", f"parts:{group}"


async def _held_shared(state: SharedState, group: str) -> dict[int, Part]:
    """The parts of ``group`` in shared state."""
    key, before = await _parts_keys(state, group)
    held = _parse(await state.hash_all(before))
    held.update(_parse(await state.hash_all(key)))
    return held


async def _done_key(state: SharedState, external_id: str) -> str:
    """A part already handed over, by the pseudonym of its id (CMPP's holds the number)."""
    return f"done:{await state.private(external_id)}"


def _parse(fields: dict[str, bytes]) -> dict[int, Part]:
    """Parts from a shared hash (field: part number); unreadable ones are skipped."""
    parts: dict[int, Part] = {}
    for seq, raw in fields.items():
        try:
            parts[int(seq)] = Part.from_json(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable shared SMS part skipped: %s", exc)
    return parts
