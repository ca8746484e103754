"""The streams' keeper: trims them to their cap but never past what a consumer group has not
read, and watches the backlog (what the slowest group has not read yet) against its bounds.

The scripts that append to the streams carry no ``MAXLEN``: a blind cap dropped contacts a case
system had not read yet. Instead every instance runs ``check`` every ``[redis] trim_interval``:
``trim.lua`` keeps, atomically per stream, the newest ``[redis] stream_maxlen`` entries (history
for ``gateway report`` and other XRANGE readers) and beyond them only what some consumer group
has not read and acknowledged; with ``[redis] stream_retention``, entries older than the
operator's chosen retention go whether read or not. The backlog is what the slowest group has
still to read or acknowledge. Past ``backlog_warning`` it is reported (metric, WARNING log,
``/readyz``); past ``backlog_limit``, or with Redis using ``memory_limit`` of its
``maxmemory``, Intake refuses new contacts (``IntakeUnavailable``: SMTP 451, HTTP 503 with
Retry-After...) until the backlog is read. It also says how late the wallboard is: the age of
the oldest event its reader (group ``gateway-aggregate``, which the reader moves after each
batch) has not read, ``gateway_dashboard_behind_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from redis.exceptions import ResponseError

from gateway.queueing.intake import Intake
from gateway.queueing.store import RedisQueue
from gateway.server.config import RedisSection
from gateway.server.metrics import Metrics
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

REPEAT_WARNING_S = 300.0
WALLBOARD_GROUP = "gateway-aggregate"
"""The wallboard's reader's group on the events stream (gateway/cases/dashboard)."""
OWN_GROUPS = ("gateway-replies", WALLBOARD_GROUP, "gateway-push.")
"""The gateway's consumer groups (a name, or a prefix ending in "."); case systems' are not
touched."""
CONSUMER_IDLE_S = 86400.0
"""A consumer of an own group idle this long with nothing pending is forgotten: consumer names
carry the instance (and, by default, its pid), so every restart of N workers adds N to each
group. A live consumer reads every few seconds; one deleted anyway is made again by its next
read."""
CONSUMERS_EVERY_S = 3600.0
TRIM_CALLS = 100
"""Calls of trim.lua per stream and check (each looks at up to 1,000 entries for the cap)."""

State = Literal["ok", "warning", "refusing"]


@dataclass(frozen=True, slots=True)
class Backlog:
    """The outcome of one check."""

    state: State = "ok"
    entries: int = 0
    """Entries kept for the slowest consumer group of the contacts or events stream."""
    streams: dict[str, int] = field(default_factory=dict)
    reason: str | None = None
    slowest: dict[str, str] = field(default_factory=dict)
    """The slowest consumer group of each stream with a backlog."""

    def detail(self) -> dict[str, object]:
        out: dict[str, object] = {"state": self.state, "entries": self.entries}
        if self.reason:
            out["reason"] = self.reason
        if self.state != "ok" and self.slowest:
            out["slowest"] = dict(self.slowest)
        return out


class StreamKeeper:
    """Runs ``check`` every ``trim_interval`` (every instance: the trim is idempotent)."""

    def __init__(
        self, queue: RedisQueue, intake: Intake, metrics: Metrics, section: RedisSection
    ) -> None:
        self.queue = queue
        self.intake = intake
        self.metrics = metrics
        self.section = section
        self.last = Backlog()
        self._warned_at = 0.0
        self._supervisor: Supervisor | None = None
        self._stopping = asyncio.Event()
        self._checking = asyncio.Lock()  # one check at a time (the loop's, or a caller's)
        self.consumer_idle_s = CONSUMER_IDLE_S
        self.consumers_every_s = CONSUMERS_EVERY_S
        self._consumers_at = -math.inf

    def start(self, supervisor: Supervisor) -> None:
        """Run the loop as the supervised loop ``stream-keeper``."""
        self._supervisor = supervisor
        self._stopping.clear()
        supervisor.spawn("stream-keeper", self._run, required=False)

    async def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            await self._supervisor.stop("stream-keeper")

    async def _run(self) -> None:
        # The loop ends on the flag too: a cancellation that meets a client timeout can come
        # out as a TimeoutError, which must not keep the loop alive after stop.
        backoff = Backoff(1.0, 30.0)
        while not self._stopping.is_set():
            try:
                await self.check()
                backoff.reset()
                pause = float(self.section.trim_interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the last state stands until it answers
                pause = backoff.next()
                log.debug("backlog: check failed (%s), again in %.0f s", exc, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):  # not wait_for: it can lose a cancel (3.11)
                    await self._stopping.wait()

    async def check(self) -> Backlog:
        """Trim every stream of the gateway, measure the backlog, refuse or accept contacts."""
        async with self._checking:
            return await self._check()

    async def _check(self) -> Backlog:
        k = self.queue.keys
        floor_ms = 0
        if self.section.stream_retention > 0:
            floor_ms = int((time.time() - float(self.section.stream_retention)) * 1000)
        adapters = sorted(_text(a) for a in await self.queue.redis.smembers(k.reply_adapters))
        streams = {
            "contacts": k.contacts,
            "events": k.events,
            "replies": k.replies,
            **{f"replies:{a}": k.replies_to(a) for a in adapters},
        }
        kept: dict[str, int] = {}
        slowest: dict[str, str] = {}
        for name, key in streams.items():
            for _ in range(TRIM_CALLS):
                result = await self.queue.trim(key, floor_ms)
                if not result.more:
                    break
            kept[name] = result.backlog
            if result.slowest:
                slowest[name] = result.slowest
            if name in ("contacts", "events"):
                self.metrics.stream_backlog.labels(name).set(kept[name])
        try:
            self.metrics.dashboard_behind.set(await self.wallboard_behind())
        except Exception as exc:  # a figure for the wallboard: never in the way of the bounds
            log.debug("wallboard behind: not measured (%s)", exc)
        if time.monotonic() - self._consumers_at >= self.consumers_every_s:
            self._consumers_at = time.monotonic()
            try:
                await self.forget_consumers(streams.values())
            except Exception as exc:  # housekeeping: never in the way of the trim and bounds
                log.debug("consumer groups: idle consumers not forgotten (%s)", exc)
        entries = max(kept["contacts"], kept["events"])
        backlog = self._judge(entries, kept, await self._memory())
        backlog = dataclasses.replace(backlog, slowest=slowest)
        self._report(backlog)
        self.last = backlog
        return backlog

    async def wallboard_behind(self) -> float:
        """How late the wallboard's figures and surge warnings are, in seconds: the age (by
        Redis's clock) of the oldest event its reader has not read, 0 when none waits. Read
        from the group, not from the reader: it grows while no instance reads (a reader that
        keeps failing, a lease between holders) as while one cannot keep up."""
        redis = self.queue.redis
        events = self.queue.keys.events
        try:
            groups = await redis.xinfo_groups(events)
        except ResponseError:  # no events stream yet
            return 0.0
        last = next(
            (g.get("last-delivered-id") for g in groups if _text(g["name"]) == WALLBOARD_GROUP),
            None,
        )
        if last is None:
            return 0.0
        waiting = await redis.xrange(events, min=f"({_text(last)}", max="+", count=1)
        if not waiting:
            return 0.0
        seconds, micros = await redis.time()
        ms = int(_text(waiting[0][0]).partition("-")[0])
        return max(0.0, int(seconds) + int(micros) / 1e6 - ms / 1000)

    async def forget_consumers(self, streams: Iterable[str]) -> int:
        """Delete the consumers of the gateway's own groups that have nothing pending and
        have been idle ``consumer_idle_s``; return how many."""
        redis = self.queue.redis
        idle_ms = self.consumer_idle_s * 1000
        forgotten = 0
        for stream in streams:
            try:
                groups = await redis.xinfo_groups(stream)
            except ResponseError:  # no such stream yet
                continue
            for group in groups:
                name = _text(group["name"])
                if not any(name == g or (g.endswith(".") and name.startswith(g))
                           for g in OWN_GROUPS):
                    continue
                for consumer in await redis.xinfo_consumers(stream, name):
                    if int(consumer["pending"]) == 0 and int(consumer["idle"]) >= idle_ms:
                        await redis.xgroup_delconsumer(stream, name, consumer["name"])
                        forgotten += 1
        if forgotten:
            log.info("consumer groups: %d idle consumers with nothing pending forgotten",
                     forgotten)
        return forgotten

    async def _memory(self) -> tuple[int, int] | None:
        """(used, maxmemory) of the server, or None when unknown (CONFIG/INFO refused)."""
        with contextlib.suppress(Exception):
            info: dict[str, Any] = await self.queue.redis.info("memory")
            if "used_memory" in info:
                return int(info["used_memory"]), int(info.get("maxmemory", 0))
        return None

    def _judge(
        self, entries: int, streams: dict[str, int], memory: tuple[int, int] | None
    ) -> Backlog:
        s = self.section
        if s.backlog_limit and entries > s.backlog_limit:
            reason = (
                f"backlog of {entries} entries past [redis] backlog_limit {s.backlog_limit}: "
                "a consumer group is not reading"
            )
            return Backlog("refusing", entries, streams, reason)
        if memory is not None and memory[1] > 0 and memory[0] >= s.memory_limit * memory[1]:
            used, most = memory
            reason = (
                f"Redis uses {used} of maxmemory {most} bytes "
                f"(past [redis] memory_limit {s.memory_limit:g})"
            )
            return Backlog("refusing", entries, streams, reason)
        if s.backlog_warning and entries > s.backlog_warning:
            reason = f"backlog of {entries} entries past [redis] backlog_warning"
            return Backlog("warning", entries, streams, reason)
        return Backlog("ok", entries, streams)

    def _report(self, backlog: Backlog) -> None:
        refusing = backlog.state == "refusing"
        self.intake.refusing = backlog.reason if refusing else None
        self.metrics.intake_refusing.set(1 if refusing else 0)
        now = time.monotonic()
        if backlog.state != "ok":
            if self.last.state != backlog.state or now - self._warned_at > REPEAT_WARNING_S:
                self._warned_at = now
                log.warning(
                    "backlog: %s%s (per stream: %s)",
                    backlog.reason,
                    "; new contacts are refused until it is read" if refusing else "",
                    ", ".join(
                        f"{name} {count} (slowest group {backlog.slowest.get(name, '?')!r})"
                        for name, count in backlog.streams.items()
                        if count
                    ),
                )
        elif self.last.state != "ok":
            log.info("backlog: back within its bounds (%d entries)", backlog.entries)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
