"""Intake, the one door into the queue: id, deadline, dedupe, repeat count, then Redis or spool."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Coroutine
from typing import Any

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeout

from gateway.adapters import IntakeUnavailable, InvalidContact, RateLimited, Receipt
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.contact.ids import uuid7
from gateway.contact.language import guess_language
from gateway.contact.sla import SlaPolicy
from gateway.queueing.batching import Coalescer
from gateway.queueing.spool import Spool, SpooledEvent, SpoolError
from gateway.queueing.store import (
    Held,
    Outcome,
    Prepared,
    RedisQueue,
    ReplicationLagError,
    WriteResult,
)
from gateway.records import Event, EventType, Inbound, Repeat
from gateway.server.metrics import IntakeMetrics, Metrics
from gateway.server.supervise import Supervisor

log = logging.getLogger(__name__)

MAX_INFLIGHT = 8
"""Coalesced intake batches written and not yet answered, at most."""


class Intake:
    """Makes contacts durable: in Redis when it answers in time, else in the local spool.

    Concurrent submits are coalesced into one pipelined round trip. A write that misses
    ``write_timeout`` or fails goes to the spool; the replayer moves it to Redis later, where
    the intake script's dedupe key makes the second write a no-op if the first one landed.
    """

    def __init__(
        self,
        queue: RedisQueue,
        spool: Spool,
        sla: SlaPolicy,
        metrics: Metrics,
        clock: Clock,
        *,
        write_timeout_s: float = 1.0,
        probe_interval_s: float = 0.5,
        max_batch: int = 256,
    ) -> None:
        self.queue = queue
        self.spool = spool
        self.sla = sla
        self.metrics = metrics
        self.clock = clock
        self.write_timeout_s = write_timeout_s
        self.probe_interval_s = probe_interval_s
        self.redis_up = True
        self.refusing: str | None = None
        """Why new contacts are refused (backlog or Redis memory past its bound: set by the
        ``StreamKeeper`` in ``gateway/queueing/backlog.py``), or None."""
        self._writer: Coalescer[Prepared, Outcome] = Coalescer(
            functools.partial(queue.write_batch, limited=True),
            max_batch=max(1, max_batch),
            # Batches pipelined on the intake link (gateway/queueing/link.py): a contact waits
            # for a free slot only behind eight batches, not two (a wait for a whole round trip,
            # fsync included, at moderate rates); at the peak the batches are about as large.
            # Unbatched, every contact gets its own concurrent round trip, as in a plain handler.
            max_inflight=MAX_INFLIGHT if max_batch > 1 else 1024,
            # one deadline per batch (from its oldest contact's submit), not one per caller
            timeout=write_timeout_s,
            orphan=self._orphaned,
            # at low and moderate rates most contacts are written from the submitter's own
            # step, with no batch task (when, and the order kept: Coalescer's ``start``)
            start=functools.partial(queue.start_batch, limited=True),
        )
        self.stall_after_s = 30.0
        """A spool that Redis answers for but that has not drained for this long fails
        readiness (the ``replayer`` loop is ``degraded``)."""
        self._reachable = False
        self._stalled_since: float | None = None
        self._supervisor: Supervisor | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._finishing: set[asyncio.Task[None]] = set()
        """Writes whose callers gave up, settled in the background (``_finish``)."""

    def prepare(self, inbound: Inbound) -> Prepared:
        """Fix the contact's id, deadline and language hint; raise InvalidContact when it cannot
        be encoded."""
        if inbound.meta:  # an empty mapping encodes
            try:
                orjson.dumps(inbound.meta)
            except (orjson.JSONEncodeError, TypeError) as exc:
                raise InvalidContact(f"meta: {exc}") from exc
        if inbound.language is None and inbound.text:
            language = guess_language(inbound.text)  # every text contact gets a hint
            if language is not None:
                inbound = _with_language(inbound, language)
        if inbound.channel not in self.sla.media:
            raise InvalidContact(f"channel: no medium {inbound.channel!r} is registered")
        deadline = self.sla.deadline(inbound)
        return Prepared(
            id=uuid7(inbound.received_at // 1000),
            inbound=inbound,
            deadline=deadline,
            warn_at=self.sla.warning_at(inbound, deadline),
        )

    async def submit(self, inbound: Inbound, *, held: Held | None = None) -> Receipt:
        """Make ``inbound`` durable and return its receipt (see ``gateway.adapters.Submitter``).

        A caller that gives up (a timeout around the call) does not cut a write half done: the
        batch in flight goes on, and a contact whose write then fails is still spooled. The
        common case (a new contact written in time) runs in the caller's task, with no task,
        shield or timeout of its own: the coalescer's batch has the one deadline
        (``write_timeout``); only the slower outcomes (spool, duplicate lookup) get a task.
        Often the contact's batch is even written from this step (``Coalescer``'s ``start``
        says when; ``RedisQueue.start_batch``), in one ``write`` before the first wait, and
        its outcome comes from the link's reply callback: a caller that gives up after that
        cuts nothing, its outcome is settled as a batch task's would be.
        """
        series = self.metrics.intake(inbound.channel, inbound.adapter)
        series.received.inc()
        if self.refusing is not None:
            series.refused.inc()
            raise IntakeUnavailable(self.refusing)
        prepared = self.prepare(inbound)
        if held is not None:
            prepared = dataclasses.replace(prepared, held=held)
        first = self.spool.spooled_id(inbound.adapter, inbound.external_id)
        if first is not None:  # its first delivery still waits in the spool: keep that id
            return self._spooled_duplicate(prepared, first)
        if not self.redis_up or self._closing:
            return await self._shielded(self._spool(prepared))
        future = self._writer.submit(prepared)
        try:
            result = await future
        except asyncio.CancelledError:  # the caller gave up (our own deadline is TimeoutError)
            if not future.cancelled():  # its outcome came as it gave up: settle it
                error = future.exception()
                self._orphaned(prepared, None if error else future.result(), error)
            # else the coalescer calls _orphaned once the write has ended
            raise
        except Exception as exc:
            return await self._shielded(self._failed(prepared, exc))
        if type(result) is WriteResult and result.created:
            return self._enqueued(prepared, result, series)
        return await self._shielded(self._answered(prepared, result))

    def _orphaned(
        self,
        prepared: Prepared,
        result: Outcome | None,
        error: BaseException | None,
    ) -> None:
        """The write of a caller that gave up has ended: settle it in the background."""
        self._detach(self._finish(prepared, result, error))

    async def _finish(
        self,
        prepared: Prepared,
        result: Outcome | None,
        error: BaseException | None,
    ) -> None:
        """Settle a write whose caller gave up: counted when written, spooled when it failed."""
        if result is None:
            if isinstance(error, Exception):
                with contextlib.suppress(IntakeUnavailable, InvalidContact):
                    await self._failed(prepared, error)
            return
        with contextlib.suppress(IntakeUnavailable, InvalidContact, RateLimited):
            await self._answered(prepared, result)

    async def _failed(self, prepared: Prepared, exc: Exception) -> Receipt:
        """The write raised or missed ``write_timeout``: spool it if Redis is away."""
        if not is_outage(exc):  # not Redis being away: this batch alone failed
            log.error("intake: write failed: %r", exc)
            self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter).refused.inc()
            raise IntakeUnavailable(f"write failed: {type(exc).__name__}") from exc
        self._mark_down(exc)
        return await self._spool(prepared)

    async def _answered(self, prepared: Prepared, result: Outcome) -> Receipt:
        """What the intake script answered, other than a new contact written in time."""
        series = self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter)
        if isinstance(result, WriteResult):
            return await self._receipt(prepared, result)
        if isinstance(result, (InvalidContact, RateLimited)):
            series.refused.inc()
            raise result
        if is_transient(result):
            self._mark_down(result)
            return await self._spool(prepared)
        # this contact alone: its peer retries, everyone else goes on
        log.error("intake: Redis refused contact %s: %s", prepared.id, result,
                  extra={"adapter": prepared.inbound.adapter,
                         "contact_id": prepared.id, "event": "refused_by_redis"})
        series.refused.inc()
        raise IntakeUnavailable(f"Redis refused the contact: {result}")

    @staticmethod
    async def _shielded(work: Coroutine[Any, Any, Receipt]) -> Receipt:
        """Run ``work`` in its own task: a caller that gives up does not cut it half done."""
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_consume)
            raise

    def _detach(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    def _enqueued(
        self, prepared: Prepared, result: WriteResult, series: IntakeMetrics | None = None
    ) -> Receipt:
        if series is None:
            series = self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter)
        series.enqueued.inc()
        series.edge_to_enqueue.observe(
            max(0, result.enqueued_at - prepared.inbound.received_at) / MICROS_PER_SECOND
        )
        return Receipt(
            result.contact_id,
            "enqueued",
            prepared.deadline,
            Repeat(result.repeat_count, self.queue.repeat_window_s),
        )

    async def _receipt(self, prepared: Prepared, result: WriteResult) -> Receipt:
        if result.created:
            return self._enqueued(prepared, result)
        self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter).duplicate.inc()
        first = None
        with contextlib.suppress(Exception):
            first = await self.queue.get(result.contact_id)
        if first is not None:
            return Receipt(result.contact_id, "duplicate", first.deadline, first.repeat)
        return Receipt(
            result.contact_id,
            "duplicate",
            prepared.deadline,
            Repeat(0, self.queue.repeat_window_s),
        )

    async def _spool(self, prepared: Prepared) -> Receipt:
        inbound = prepared.inbound
        series = self.metrics.intake(inbound.channel, inbound.adapter)
        first = self.spool.spooled_id(inbound.adapter, inbound.external_id)
        if first is not None:
            return self._spooled_duplicate(prepared, first)
        try:
            await self.spool.append(prepared)
        except (TypeError, ValueError) as exc:  # not encodable (orjson), while Redis is away
            series.refused.inc()
            raise InvalidContact(f"contact not encodable: {exc}") from exc
        except (SpoolError, OSError) as exc:
            series.refused.inc()
            log.error("intake: contact refused, neither Redis nor the spool took it: %s", exc,
                      extra={"adapter": inbound.adapter, "contact_id": prepared.id,
                             "event": "refused"})
            raise IntakeUnavailable(str(exc)) from exc
        series.spooled.inc()
        self.metrics.spool_depth.set(self.spool.depth)
        self._wake.set()
        return Receipt(
            prepared.id, "spooled", prepared.deadline, Repeat(0, self.queue.repeat_window_s)
        )

    def _spooled_duplicate(self, prepared: Prepared, first: str) -> Receipt:
        self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter).duplicate.inc()
        return Receipt(first, "duplicate", prepared.deadline, Repeat(0, self.queue.repeat_window_s))

    # ------------------------------------------------------------------ events (EventSink)

    async def emit(self, event: Event) -> None:
        """Append an event; while Redis is away (or its contact is still in the spool) it waits
        in the spool behind the contact."""
        if self.redis_up and not self._closing and not self.spool.holds(event.contact_id):
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    await self.queue.emit(event)
                return
            except Exception as exc:  # the spool takes it when Redis is away
                if not is_outage(exc):
                    raise
                self._mark_down(exc)
        await self._spool_event(SpooledEvent(event, stamp=False))

    async def stamp(
        self,
        contact_id: str,
        type: EventType,
        at: Micros,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> Event | None:
        """Record a deadline event once per contact and type (see ``EventSink.stamp``).

        While Redis is away, or while the contact itself still waits in the spool, the stamp
        is spooled behind it and settled on replay; the event returned then has no elapsed
        time yet (it is computed from the contact's edge stamp when it lands).
        """
        if self.redis_up and not self._closing and not self.spool.holds(contact_id):
            try:
                async with asyncio.timeout(self.write_timeout_s):
                    stamped = await self.queue.stamp(contact_id, type, at, source, detail)
                if stamped is not None and stamped.elapsed_ms is not None:
                    self.metrics.stamps.labels(type, str(bool(stamped.met)).lower()).observe(
                        stamped.elapsed_ms / 1000
                    )
                return stamped
            except Exception as exc:  # the spool takes it when Redis is away
                if not is_outage(exc):
                    raise
                self._mark_down(exc)
        event = Event(contact_id, type, at, source, detail=detail or {})
        await self._spool_event(SpooledEvent(event, stamp=True))
        return event

    async def _spool_event(self, item: SpooledEvent) -> None:
        try:
            await self.spool.append_event(item)
        except (SpoolError, OSError) as exc:
            log.error("intake: event lost, neither Redis nor the spool took it: %s", exc)
            raise IntakeUnavailable(str(exc)) from exc
        self.metrics.spool_depth.set(self.spool.depth)
        self._wake.set()

    async def _replay_event(self, item: SpooledEvent) -> None:
        event = item.event
        try:
            async with asyncio.timeout(10 * self.write_timeout_s):
                if item.stamp:
                    await self.queue.stamp(
                        event.contact_id, event.type, event.at, event.source, event.detail
                    )
                else:
                    await self.queue.emit(event)
        except ResponseError as exc:
            if is_transient(exc):
                raise
            await asyncio.to_thread(self.spool.quarantine, [item], str(exc))

    def _mark_down(self, exc: BaseException) -> None:
        if self.redis_up:
            log.warning("intake: Redis unavailable (%s), spooling", type(exc).__name__)
        self.redis_up = False
        self.metrics.redis_up.set(0)
        self._wake.set()

    # ------------------------------------------------------------------ replay

    def start(self, supervisor: Supervisor) -> None:
        """Start the replayer (the supervised loop ``replayer``), which probes Redis and empties
        the spool."""
        self.metrics.redis_up.set(1 if self.redis_up else 0)
        self.metrics.spool_depth.set(self.spool.depth)
        self._supervisor = supervisor
        supervisor.spawn("replayer", self._replay_loop, backoff=(0.2, 10.0))
        self._wake.set()

    async def _replay_loop(self) -> None:
        """Probe Redis and replay the spool, for ever. A Redis failure (fewer replicas than
        ``redis.min_replicas`` confirming a batch included) marks Redis down and waits for the
        next probe; anything else (the spool cannot be read: no file descriptor left, an I/O
        error) is raised to the supervisor, which logs it and restarts the loop."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.probe_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            self._check_stall()
            if self.redis_up and self.spool.depth == 0 and not self.spool.segments(True):
                self._stalled_since = None
                continue
            try:
                await self.replay_once()
            except (RedisError, TimeoutError, ReplicationLagError) as exc:
                if self.redis_up or self._reachable:
                    log.warning("intake: replay deferred: %s", type(exc).__name__)
                else:
                    log.debug("intake: replay deferred: %s", exc)
                self.redis_up = False
                self.metrics.redis_up.set(0)
            self._check_stall()

    def _check_stall(self) -> None:
        """Degrade the ``replayer`` loop while the spool cannot drain although Redis answers."""
        if self._supervisor is None:
            return
        if self.spool.stuck:
            names = ", ".join(sorted(self.spool.stuck))
            self._supervisor.degrade(
                "replayer", f"spool cannot drain: {names} can neither be replayed nor set aside"
            )
            return
        waiting = self.spool.depth > 0 and self._reachable
        if not waiting:
            self._stalled_since = None
        elif self._stalled_since is None:
            self._stalled_since = time.monotonic()
        stalled = self._stalled_since is not None and (
            time.monotonic() - self._stalled_since >= self.stall_after_s
        )
        if stalled:
            self._supervisor.degrade(
                "replayer",
                f"replay stalled: {self.spool.depth} spooled records, Redis answers, "
                f"no progress for {self.stall_after_s:.0f} s",
            )
        else:
            self._supervisor.degrade("replayer", None)

    async def replay_once(self) -> int:
        """Probe Redis; if it answers, move the spool into it. Return how many were replayed."""
        self._reachable = False
        async with asyncio.timeout(self.write_timeout_s):
            await self.queue.ping()
        self._reachable = True
        if not self.redis_up:
            await self.queue.load_scripts()
        replayed = await self.spool.replay(self._replay_write, self._replay_event)
        count = len(replayed)
        if count or self.spool.depth == 0:
            self._stalled_since = None  # progress
        if not self.redis_up:
            log.info("intake: Redis is back")
        self.redis_up = True
        self.metrics.redis_up.set(1)
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_oldest.set(self.spool.oldest_age_s())
        if count:
            self.metrics.replayed.inc(count)
        return count

    async def _replay_write(self, batch: list[Prepared]) -> None:
        async with asyncio.timeout(10 * self.write_timeout_s):
            results = await self.queue.write_batch(batch)
        written: list[tuple[Prepared, WriteResult]] = []
        for prepared, result in zip(batch, results, strict=True):
            if isinstance(result, WriteResult):
                written.append((prepared, result))
            elif isinstance(result, ResponseError) and is_transient(result):
                raise result
            else:  # refused for good: set aside, never holding back the rest
                await asyncio.to_thread(self.spool.quarantine, [prepared], str(result))
        self._count_replayed(written)

    def _count_replayed(self, written: list[tuple[Prepared, WriteResult]]) -> None:
        for prepared, result in written:
            if result.created:
                series = self.metrics.intake(prepared.inbound.channel, prepared.inbound.adapter)
                series.enqueued.inc()
                series.edge_to_enqueue.observe(
                    max(0, result.enqueued_at - prepared.inbound.received_at) / MICROS_PER_SECOND
                )

    async def close(self) -> None:
        """Finish in-flight writes (spooling what cannot be written) and stop the replayer."""
        self._closing = True
        await self._writer.drain()
        if self._finishing:
            await asyncio.wait(set(self._finishing))
        if self._supervisor is not None:
            await self._supervisor.stop("replayer")
        await self.spool.close()


_TRANSIENT = (
    "LOADING",
    "BUSY",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "OOM",
    "NOREPLICAS",
    "MOVED",
    "ASK",
)


def is_outage(exc: BaseException) -> bool:
    """True when Redis itself is away or not taking writes: a connection that failed or timed
    out, or a server that is loading, busy, read-only or failing over. Anything else (a bug, a
    contact that cannot be encoded, a script error) concerns one write, not the queue."""
    if isinstance(exc, ResponseError):
        return is_transient(exc)
    return isinstance(exc, (ConnectionError, TimeoutError, RedisConnectionError, RedisTimeout))


def is_transient(exc: ResponseError) -> bool:
    """True for server errors that go away (failover, loading, memory): retry, do not discard."""
    return str(exc).upper().startswith(_TRANSIENT) or type(exc).__name__ in (
        "BusyLoadingError",
        "ReadOnlyError",
        "ClusterDownError",
        "TryAgainError",
        "MasterDownError",
        "OutOfMemoryError",
    )


_INBOUND_FIELDS = tuple(f.name for f in dataclasses.fields(Inbound))


def _with_language(inbound: Inbound, language: str) -> Inbound:
    """``dataclasses.replace(inbound, language=language)`` in about half its time (replace
    looks the fields up again on every call)."""
    values = {name: getattr(inbound, name) for name in _INBOUND_FIELDS}
    values["language"] = language
    return Inbound(**values)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
