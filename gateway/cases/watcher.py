"""Deadline watcher: ``warning`` and ``breached`` events the moment they fall due, exactly once.

Intake puts every contact in two sorted sets, ``{p}:warnings`` (scored by when its warning is
due) and ``{p}:deadlines`` (scored by its deadline); the stamp that settles a deadline removes
it from both. The watcher runs on one instance of a fleet at a time, under the lease ``watcher``
(``gateway.queueing.coordination``); another takes over within ``[fleet] lease_ttl`` when it
dies. It looks at the members whose score has passed and claims them one by one with a script
that re-checks the score, ZREMs the member and XADDs the event in one atomic step: even if two
instances overlap (a holder paused past its lease), only the one whose ZREM removed a member
writes its event. A settling stamp racing the watcher is decided the same way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from gateway.adapters import load_media
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.queueing.coordination import Fence, Leases
from gateway.queueing.outcomes import FACTS, Step
from gateway.queueing.store import RedisQueue, raise_errors
from gateway.records import Event, EventType
from gateway.server.config import WatcherSection
from gateway.server.metrics import Metrics
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

BATCH = 50
"""Members claimed per step. Each step's Python work (the events' JSON, the metrics) and its
round trip of claim scripts (Valkey runs a client's pipeline in one go) hold the gateway's
loop and Valkey in one piece: when thousands of deadlines fall due together (a surge of
unanswered calls), 200 at a time stalled the intake of new calls for several milliseconds."""
LEASE = "watcher"


class DeadlineWatcher:
    """Emits ``warning`` and ``breached`` for this gateway's key prefix."""

    def __init__(
        self, queue: RedisQueue, clock: Clock, metrics: Metrics, section: WatcherSection
    ) -> None:
        self.queue = queue
        self.clock = clock
        self.metrics = metrics
        self.interval_s = max(0.01, float(section.interval))
        self._next: float | None = None
        """The sleep until the next look, when the tick's own read found nothing due (then it
        read the earliest scores too: an idle tick is one round trip)."""
        self._supervisor: Supervisor | None = None
        self._stopping = False

    def start(self, leases: Leases, supervisor: Supervisor) -> None:
        """Run while this instance holds the ``watcher`` lease (supervised)."""
        self._supervisor = supervisor

        async def run() -> None:
            await leases.exclusive(LEASE, self._held)

        supervisor.spawn("watcher", run, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        self._stopping = True  # the loop ends even if a client call swallows the cancellation
        if self._supervisor is not None:
            await self._supervisor.stop("watcher")

    async def _held(self, fence: Fence) -> None:
        log.info("watcher: running here (lease fence %d)", fence.token)
        await self._run()

    async def _run(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while not self._stopping:
            try:
                await self.tick()
                delay = await self._until_next()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = backoff.next()
                log.warning("watcher: %r, retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)

    def _looks(self) -> list[list[Any]]:
        """The earliest warning and deadline (their scores) and the open deadlines' count."""
        k = self.queue.keys
        return [
            ["ZRANGE", k.warnings, 0, 0, "WITHSCORES"],
            ["ZRANGE", k.deadlines, 0, 0, "WITHSCORES"],
            ["ZCARD", k.deadlines],
        ]

    def _wait(self, first_warning: Any, first_deadline: Any, open_count: Any) -> float:
        """The sleep until the earliest pending score, at most ``interval`` (``_looks``'
        replies: RESP2's flat ``[member, score]`` lists or RESP3's ``[[member, score]]``
        pairs, redis-py 8's default)."""
        self.metrics.deadlines_open.set(int(open_count))
        scores = [
            float(items[0][1] if isinstance(items[0], list) else items[1])
            for items in (first_warning, first_deadline) if items
        ]
        if not scores:
            return self.interval_s
        wait = (min(scores) - self.clock.now_us()) / MICROS_PER_SECOND
        return min(self.interval_s, max(0.0, wait))

    async def _until_next(self) -> float:
        """Sleep until the earliest pending score, at most ``interval``: as the last tick read
        it when it found nothing due, else read now (over the plain commands' link)."""
        known, self._next = self._next, None
        if known is not None:
            return known
        return self._wait(*raise_errors(await self.queue.execute(self._looks(), reads=True)))

    async def tick(self) -> int:
        """Claim every due warning and deadline now; return how many events this instance wrote.
        The first page of each set and the next look are read in one round trip: a tick that
        finds nothing due costs one (it cost three, each through redis-py)."""
        now = self.clock.now_us()
        k = self.queue.keys
        warnings, deadlines, *looks = raise_errors(await self.queue.execute([
            ["ZRANGEBYSCORE", k.warnings, "-inf", now, "LIMIT", 0, BATCH],
            ["ZRANGEBYSCORE", k.deadlines, "-inf", now, "LIMIT", 0, BATCH],
            *self._looks(),
        ], reads=True))
        self._next = None if warnings or deadlines else self._wait(*looks)
        written = await self._sweep("warning", now, warnings)
        written += await self._sweep("breached", now, deadlines)
        return written

    async def _sweep(self, type: EventType, now: Micros, first: list[Any]) -> int:
        """Claim the due members of one set, ``BATCH`` at a time: ``first`` the first page,
        read by ``tick``."""
        k = self.queue.keys
        zset, other = (k.deadlines, k.warnings) if type == "breached" else (k.warnings, k.warnings)
        written = 0
        ids = first
        while True:
            if not ids:
                return written
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in ids]
            facts = raise_errors(await self.queue.execute(  # packed: a third of a pipeline's
                [["HMGET", k.contact(cid), *FACTS] for cid in ids], reads=True
            ))
            calls: list[tuple[str, bytes, str, Micros]] = []
            steps: dict[str, Step] = {}
            """A breach's dashboard step, taken with its claim (``claim.lua``)."""
            policies: dict[str, str] = {}
            media = load_media()
            for cid, (received, due, kind, channel) in zip(ids, facts, strict=True):
                if received is None:  # the contact expired: drop the member, no event
                    calls.append((cid, b"", "", 0))
                    continue
                due_us = int(due)
                if type == "warning" and due_us <= now:
                    calls.append((cid, b"", "", 0))  # the breach says it all
                    continue
                event = Event(
                    contact_id=cid,
                    type=type,
                    at=now,
                    source="watcher",
                    due_at=due_us,
                    elapsed_ms=max(0, (now - int(received)) // 1000),
                    met=False if type == "breached" else None,
                    detail={"kind": kind.decode()},
                )
                if type == "breached":
                    step = self.queue.step_for(event, (received, due, kind, channel))
                    if step is not None:
                        steps[cid] = step
                calls.append((cid, event.to_json(), channel.decode(), due_us))
                policies[cid] = media.policy(channel.decode(), kind.decode())
            results = await self._claim_all(zset, other, calls, now, type, steps)
            if 2 in results:  # written; their wallboard steps failed (Valkey's log says why)
                failed = results.count(2)
                log.warning("watcher: %d %s events written, their wallboard steps failed (see "
                            "the Redis server's log)", failed, type)
                self.metrics.dashboard_steps_failed.labels("watcher").inc(failed)
            for (cid, body, channel, due_us), claimed in zip(calls, results, strict=True):
                if claimed and body:
                    written += 1
                    self.metrics.deadline_events.labels(type, channel, policies[cid]).inc()
                    if type == "breached":
                        self.metrics.deadline_lag.observe(max(0, now - due_us) / MICROS_PER_SECOND)
                    # one line per contact: DEBUG (the counters and events say it at INFO scale)
                    log.debug("watcher: %s for contact %s", type, cid,
                              extra={"contact_id": cid, "event": type})
            if len(ids) < BATCH:
                return written
            (ids,) = raise_errors(await self.queue.execute(
                [["ZRANGEBYSCORE", zset, "-inf", now, "LIMIT", 0, BATCH]], reads=True
            ))

    async def _claim_all(
        self,
        zset: str,
        other: str,
        calls: list[tuple[str, bytes, str, Micros]],
        now: Micros,
        type: EventType,
        steps: dict[str, Step],
    ) -> list[Any]:
        """One ``claim.lua`` call for the step's members (``BATCH``), with the dashboard steps
        of their events (``steps``, by contact id); one flag a member."""
        k = self.queue.keys
        script_calls: list[tuple[list[Any], list[Any]]] = []
        for start in range(0, len(calls), BATCH):
            part = calls[start : start + BATCH]
            keys: list[Any] = [zset, k.events, other, *(k.contact(c[0]) for c in part)]
            args: list[Any] = [now, type, len(part)]
            for cid, body, _, _ in part:
                args += (cid, body)
            taken: list[Step] = []
            for cid, body, _, _ in part:
                step = steps.get(cid) if body else None
                if step is not None:
                    taken.append(step)
                args.append(len(taken) if step is not None else 0)
            for step in taken:
                keys += step.keys
                args += step.args
            script_calls.append((keys, args))
        flags: list[Any] = []
        for reply in raise_errors(await self.queue.run_scripts("claim", script_calls)):
            flags.extend(reply)
        return flags
