"""Asterisk's ``queue_log``: the calls that entered a queue while no gateway followed AMI.

Asterisk writes one line per queue step whoever listens (``apps/app_queue.c``,
``ast_queue_log``): ``time|callid|queue|agent|event|data1|data2|...``, ``time`` in whole epoch
seconds, ``callid`` the caller channel's uniqueid. The lines read here:

=================  ==============================================  ==========================
event              data                                            outcome
=================  ==============================================  ==========================
ENTERQUEUE         url, caller id, position                        (the call is queued)
CONNECT            hold time, member's uniqueid, ring time         answered (at the line)
ABANDON            position, original position, hold time          abandoned
EXITWITHTIMEOUT    position, original position, hold time          closed, ``queue timeout``
EXITEMPTY          position, original position, hold time          closed, ``queue empty``
EXITWITHKEY        key, position, original position, hold time     closed, ``key pressed``
=================  ==============================================  ==========================

The follower keeps a mark (the file's inode and a byte offset) in Redis, moved on while AMI
is followed, and reads the lines after it when AMI is (re)connected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.queueing.coordination import Fence, SharedState

log = logging.getLogger(__name__)

_EXITS = {
    "ABANDON": ("abandoned", "abandon"),
    "EXITWITHTIMEOUT": ("closed", "queue timeout"),
    "EXITEMPTY": ("closed", "queue empty"),
    "EXITWITHKEY": ("closed", "key pressed"),
}
MARK_TTL_S = 30 * 86400.0
"""The mark outlives a fleet stopped this long; after that the next start reads nothing."""
MAX_READ = 64 * 1024 * 1024
"""Lines read per recovery at most (a mark far behind a huge file: the rest next time)."""


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


@dataclass(slots=True)
class LoggedCall:
    """One caller's way through the queues, as ``queue_log`` tells it."""

    uniqueid: str
    queue: str
    entered_at: Micros
    caller: str = ""
    outcome: str | None = None
    """``answered``, ``abandoned`` or ``closed``; None while the caller is still queued."""
    at: Micros = 0
    detail: dict[str, Any] = field(default_factory=dict)


def parse(lines: list[str]) -> dict[str, LoggedCall]:
    """The calls of these lines by uniqueid, in the order they entered a queue. Lines that are
    not queue_log lines (a torn last line, another format) are skipped."""
    calls: dict[str, LoggedCall] = {}
    for line in lines:
        parts = line.rstrip("\r\n").split("|")
        if len(parts) < 5 or not parts[1] or parts[1] == "NONE":
            continue
        stamp = _int(parts[0])
        if stamp is None:
            continue
        at = stamp * MICROS_PER_SECOND
        uniqueid, queue, agent, event, data = parts[1], parts[2], parts[3], parts[4], parts[5:]
        data += [""] * (4 - len(data))
        call = calls.get(uniqueid)
        if event == "ENTERQUEUE":
            if call is None or call.outcome is not None:  # first queue, or the next one
                caller = data[1] if data[1] not in ("", "unknown") else ""
                known = call.caller if call is not None else ""
                calls[uniqueid] = LoggedCall(uniqueid, queue, at, caller or known)
            continue
        if event == "CONNECT":
            hold = _int(data[0])
            if call is None:  # entered before the lines read: its wait says when
                call = calls[uniqueid] = LoggedCall(
                    uniqueid, queue, at - (hold or 0) * MICROS_PER_SECOND)
            call.outcome, call.at, call.queue = "answered", at, queue
            call.detail = {"via": "queue_log", "exact": False, "queue": queue,
                           "member": agent, "hold_s": hold, "ring_s": _int(data[2])}
        elif event in _EXITS:
            outcome, reason = _EXITS[event]
            numbers = data[1:4] if event == "EXITWITHKEY" else data[:3]
            hold = _int(numbers[2])
            if call is None:
                call = calls[uniqueid] = LoggedCall(
                    uniqueid, queue, at - (hold or 0) * MICROS_PER_SECOND)
            if call.outcome == "answered":
                continue
            call.outcome, call.at, call.queue = outcome, at, queue
            call.detail = {"reason": reason, "queue": queue, "position": _int(numbers[0]),
                           "original_position": _int(numbers[1]), "hold_s": hold,
                           "via": "queue_log"}
    return calls


class QueueLog:
    """Reads ``queue_log`` after the fleet's mark and moves the mark on while AMI is followed.

    The mark lags ``lag`` seconds behind the file: a link that died silently is noticed only
    when a ``Ping`` goes unanswered, and the lines of that time must be read again. Reading a
    line twice is harmless: contacts are deduplicated on the uniqueid and outcomes are stamped
    once.
    """

    def __init__(self, path: str, state: SharedState, key: str, *, lag: float) -> None:
        self.path = path
        self.state = state
        self.key = key
        self.lag = lag
        self.fence: Fence | None = None
        self._samples: deque[tuple[float, int, int]] = deque()
        self._stored: tuple[int, int] | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.warning("queue_log %s not readable: %s", self.path, exc.strerror)
            return None
        return st.st_ino, st.st_size

    async def _load(self) -> tuple[int, int] | None:
        raw = await self.state.get(self.key)
        if raw is None:
            return None
        try:
            inode, offset = orjson.loads(raw)
            return int(inode), int(offset)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None

    async def _store(self, inode: int, offset: int) -> None:
        if self._stored == (inode, offset):
            return
        if await self.state.put(self.key, orjson.dumps([inode, offset]), MARK_TTL_S,
                                fence=self.fence):
            self._stored = (inode, offset)

    async def read(self) -> list[str]:
        """The whole lines after the mark. Without a mark (the first start) nothing: the file's
        history was never the gateway's to report; the mark is set at its end."""
        self._samples.clear()
        self._stored = None
        now = self._stat()
        if now is None:
            return []
        inode, size = now
        mark = await self._load()
        if mark is None:
            await self._store(inode, size)
            return []
        offset = mark[1] if mark[0] == inode and mark[1] <= size else 0  # rotated: from 0
        data = await asyncio.to_thread(self._read_from, offset)
        end = data.rfind(b"\n") + 1
        return data[:end].decode("utf-8", "replace").splitlines()

    def _read_from(self, offset: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(MAX_READ)

    async def advance(self) -> None:
        """Called while AMI is followed: move the mark to where the file was ``lag`` ago."""
        now = self._stat()
        if now is None:
            return
        clock = time.monotonic()
        self._samples.append((clock, *now))
        ready = None
        while self._samples and clock - self._samples[0][0] >= self.lag:
            ready = self._samples.popleft()
        if ready is not None:
            await self._store(ready[1], ready[2])
