"""Reply routing: replies written by case systems go out through the contact's own adapter, on
an instance that runs it.

Case systems write replies to ``{p}:replies``. Every instance reads it in the group
``gateway-replies`` and *routes* each reply: it looks up the contact and moves the reply to
``{p}:replies:<adapter>`` (``route.lua``: the XACK and the XADD in one step, so a reply is
routed exactly once even when two instances race for it after a reclaim). Each instance then
*sends* from the streams of the adapters it runs, in the group ``gateway-replies`` of each: an
instance never takes a reply it cannot send. A reply for an adapter no instance runs waits in
its stream, reported as held (``gateway_replies_held``, a WARNING log, ``gateway info``), and is
sent by the first instance that starts with that adapter.

A reply being sent is kept from other instances' reclaim (``hold.lua`` resets its idle time
while this instance owns it); one held by an instance that died is taken over after
``[replies] reclaim_after`` by another instance with the same adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.adapters import Adapter, EventSink, SendError
from gateway.contact.clock import Clock
from gateway.queueing.consumer import Delivery, StreamConsumer, read_many
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient, RedisQueue
from gateway.records import Event, Reply
from gateway.server.config import RepliesSection
from gateway.server.egress import SendLimiter
from gateway.server.metrics import Metrics
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

GROUP = "gateway-replies"
HEARTBEAT_S = 5.0
SENDER_TTL_S = 20.0
"""An instance counts as running an adapter this long after its last heartbeat."""
REPEAT_WARNING_S = 300.0


def sendable(adapter: str) -> bool:
    """False for contacts that came in through ``/v1/intake`` (source ``api`` or
    ``api:<key>``, see ``gateway.server.auth.source_of``): no adapter can answer those."""
    return adapter != "api" and not adapter.startswith("api:")


@dataclass(frozen=True, slots=True)
class ReplyQueue:
    """Replies routed to one adapter and not sent yet, fleet-wide."""

    adapter: str
    waiting: int
    """Not handed to any instance yet."""
    pending: int
    """Handed to an instance and not finished (being sent, or held by one that died)."""
    senders: tuple[str, ...]
    """Live instances running the adapter."""

    @property
    def held(self) -> int:
        """Replies no live instance can send."""
        return 0 if self.senders else self.waiting + self.pending

    def to_dict(self) -> dict[str, Any]:
        return {
            "waiting": self.waiting,
            "pending": self.pending,
            "senders": list(self.senders),
            "held": self.held,
        }


async def reply_queues(client: RedisClient, keys: Keys) -> list[ReplyQueue]:
    """The reply stream of every adapter replies were routed to (``gateway info``, metrics)."""
    now_ms = int(time.time() * 1000)
    out: list[ReplyQueue] = []
    for raw in sorted(await client.smembers(keys.reply_adapters)):
        adapter = _text(raw)
        stream = keys.replies_to(adapter)
        waiting = pending = 0
        with contextlib.suppress(Exception):  # no group yet: nothing routed is left
            for group in await client.xinfo_groups(stream):
                if _text(group["name"]) != GROUP:
                    continue
                pending = int(group["pending"])
                lag = group.get("lag")
                if lag is None:  # unknown after deletions: count what follows the last read
                    last = _text(group["last-delivered-id"])
                    lag = len(await client.xrange(stream, min=f"({last}", count=100_000))
                waiting = int(lag)
        senders = await client.zrangebyscore(keys.reply_senders(adapter), now_ms, "+inf")
        out.append(ReplyQueue(adapter, waiting, pending, tuple(sorted(map(_text, senders)))))
    return out


class _Lost(Exception):
    """Another instance took the entry over (this one stalled past ``reclaim_after``)."""


class ReplyRouter:
    """Routes ``{p}:replies`` by adapter and sends the replies of this instance's adapters.

    The first successful send stamps ``responded`` (elapsed and met against the contact's
    deadline); a permanent failure, or a retryable one that outlives ``max_attempts``, emits
    ``failed``. An entry is acknowledged after either outcome.
    """

    def __init__(
        self,
        queue: RedisQueue,
        events: EventSink,
        adapters: Mapping[str, Adapter],
        clock: Clock,
        metrics: Metrics,
        section: RepliesSection,
        consumer_name: str,
        *,
        concurrency: int = 32,
        limiters: Mapping[str, SendLimiter] | None = None,
    ) -> None:
        self.limiters = dict(limiters or {})
        """Each adapter's send rate (gateway/server/egress.py), waited for before every send."""
        self.queue = queue
        self.events = events
        self.adapters = adapters
        self.clock = clock
        self.metrics = metrics
        self.section = section
        self.name = consumer_name
        keys = queue.keys
        redis = queue.redis
        self.inbox = StreamConsumer(redis, keys.replies, GROUP, consumer_name, Reply.from_dict)
        self.outboxes = {
            name: StreamConsumer(redis, keys.replies_to(name), GROUP, self.name, Reply.from_dict)
            for name in adapters
        }
        self._consumers = [self.inbox, *self.outboxes.values()]
        self._adapter_of = {c.stream: name for name, c in self.outboxes.items()}
        self._inflight: set[tuple[str, str]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: Supervisor | None = None
        self._stopping = False
        self.held: dict[str, int] = {}
        """Replies held per adapter no live instance runs, fleet-wide, as last reported."""
        self._warned_at = 0.0

    @property
    def reclaim_after_s(self) -> float:
        return float(self.section.reclaim_after)

    def start(self, supervisor: Supervisor) -> None:
        """Run the reading loop as the supervised loop ``replies``."""
        self._supervisor = supervisor
        supervisor.spawn("replies", self._run, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        """Stop reading; let replies being sent finish (a bounded wait), the rest stay pending
        (another instance with the adapter reclaims them); leave the senders' registry."""
        self._stopping = True
        if self._supervisor is not None:
            await self._supervisor.stop("replies")
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5)
            for task in pending:
                task.cancel()
        with contextlib.suppress(Exception):
            for name in self.outboxes:
                await self.queue.redis.zrem(self.queue.keys.reply_senders(name), self.name)

    async def _run(self) -> None:
        backoff = Backoff(0.5, 10.0)
        ready = False
        loop = asyncio.get_running_loop()
        last_beat = last_reclaim = -1e9
        while not self._stopping:
            try:
                if not ready:
                    for consumer in self._consumers:
                        await consumer.ensure_group()
                    await self._heartbeat()
                    last_beat = loop.time()
                    for consumer in self._consumers:
                        for delivery in await consumer.read_own_pending():
                            await self._dispatch(consumer, delivery)
                    ready = True
                if loop.time() - last_beat > HEARTBEAT_S:
                    last_beat = loop.time()
                    await self._heartbeat()
                    await self.report()
                if loop.time() - last_reclaim > self.reclaim_after_s / 2:
                    last_reclaim = loop.time()
                    for consumer in self._consumers:
                        for delivery in await consumer.reclaim(int(self.reclaim_after_s * 1000)):
                            await self._dispatch(consumer, delivery)
                block_ms = int(min(1.0, self.reclaim_after_s / 4) * 1000)
                for consumer, delivery in await read_many(self._consumers, 50, block_ms):
                    await self._dispatch(consumer, delivery)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ready = False
                pause = backoff.next()
                log.warning(
                    "replies: reading failed (%s), retrying in %.1f s", type(exc).__name__, pause
                )
                await asyncio.sleep(pause)

    async def _heartbeat(self) -> None:
        """Say which adapters this instance sends through (read by ``reply_queues``)."""
        now_ms = int(time.time() * 1000)
        for name in self.outboxes:
            key = self.queue.keys.reply_senders(name)
            await self.queue.redis.zadd(key, {self.name: now_ms + int(SENDER_TTL_S * 1000)})
            await self.queue.redis.zremrangebyscore(key, "-inf", now_ms)

    async def report(self) -> list[ReplyQueue]:
        """Set the reply gauges; log a WARNING while replies wait for an adapter no instance
        runs (on a change, then every few minutes)."""
        queues = await reply_queues(self.queue.redis, self.queue.keys)
        held: dict[str, int] = {}
        for q in queues:
            self.metrics.replies_waiting.labels(q.adapter).set(q.waiting + q.pending)
            self.metrics.replies_held.labels(q.adapter).set(q.held)
            if q.held:
                held[q.adapter] = q.held
        now = time.monotonic()
        if held and (held != self.held or now - self._warned_at > REPEAT_WARNING_S):
            self._warned_at = now
            log.warning(
                "replies: held, no running instance has the adapter: %s; they are sent when "
                "an instance with it starts",
                ", ".join(f"{count} for {name!r}" for name, count in sorted(held.items())),
            )
        self.held = held
        return queues

    async def _dispatch(self, consumer: StreamConsumer[Reply], delivery: Delivery[Reply]) -> None:
        if consumer is self.inbox:
            await self._route(delivery)
            return
        key = (consumer.stream, delivery.entry_id)
        if key in self._inflight:  # reclaimed from ourselves while still sending
            return
        self._inflight.add(key)
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._handle(consumer, delivery))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _route(self, delivery: Delivery[Reply]) -> None:
        """Move one reply from ``{p}:replies`` to its adapter's stream (or fail it)."""
        reply = delivery.record
        if reply is None:
            log.error(
                "replies: undecodable entry %s dropped: %s", delivery.entry_id, delivery.error
            )
            await self.inbox.ack(delivery.entry_id)
            return
        if not reply.id:  # the id events carry, and the adapter's own reference
            reply = dataclasses.replace(reply, id=delivery.entry_id)
        contact = await self.queue.get(reply.contact_id)
        if contact is None:
            await self._fail(reply.contact_id, "gateway", "unknown contact", reply.id)
            self.metrics.replies.labels("unknown", "unknown", "failed").inc()
            await self.inbox.ack(delivery.entry_id)
            return
        if not sendable(contact.adapter):
            reason = f"no adapter {contact.adapter!r} to send through"
            await self._fail(contact.id, "gateway", reason, reply.id)
            self.metrics.replies.labels(contact.channel, contact.adapter, "failed").inc()
            await self.inbox.ack(delivery.entry_id)
            return
        if await self.queue.route_reply(GROUP, delivery.entry_id, reply, contact.adapter):
            log.debug("replies: reply %s routed to %s", reply.id, contact.adapter)

    async def _handle(self, consumer: StreamConsumer[Reply], delivery: Delivery[Reply]) -> None:
        hold = asyncio.get_running_loop().create_task(self._hold(consumer, delivery.entry_id))
        try:
            await self._deliver(self._adapter_of[consumer.stream], delivery, hold)
            await consumer.ack(delivery.entry_id)
        except asyncio.CancelledError:
            raise
        except _Lost:
            log.warning("replies: entry %s was taken over by another instance", delivery.entry_id)
        except Exception:  # left pending, reclaimed and retried later
            log.exception("replies: entry %s left pending", delivery.entry_id)
        finally:
            hold.cancel()
            self._inflight.discard((consumer.stream, delivery.entry_id))

    async def _hold(self, consumer: StreamConsumer[Reply], entry_id: str) -> None:
        """While the reply is being sent (or waits for a retry), keep it from other instances'
        reclaim; return once another instance owns it (this one stalled)."""
        while True:
            await asyncio.sleep(self.reclaim_after_s / 3)
            try:
                if not await self.queue.hold(consumer.stream, GROUP, entry_id, self.name):
                    return
            except Exception:  # Redis away: the next beat tries again
                log.debug("replies: could not hold %s", entry_id, exc_info=True)

    async def _fail(self, contact_id: str, source: str, reason: str, reply_id: str) -> None:
        log.warning("replies: reply %s to contact %s failed: %s", reply_id, contact_id, reason,
                    extra={"adapter": source, "contact_id": contact_id, "event": "reply_failed"})
        await self.events.emit(
            Event(
                contact_id,
                "failed",
                self.clock.now_us(),
                source,
                detail={"reason": reason, "reply_id": reply_id},
            )
        )

    async def _deliver(
        self, adapter_name: str, delivery: Delivery[Reply], hold: asyncio.Task[None]
    ) -> None:
        reply = delivery.record
        if reply is None:
            log.error(
                "replies: undecodable entry %s dropped: %s", delivery.entry_id, delivery.error
            )
            return
        contact = await self.queue.get(reply.contact_id)
        if contact is None:  # expired between routing and sending
            await self._fail(reply.contact_id, "gateway", "unknown contact", reply.id)
            self.metrics.replies.labels("unknown", "unknown", "failed").inc()
            return
        adapter = self.adapters[adapter_name]
        attempt = 0
        limiter = self.limiters.get(adapter.name)
        while True:
            attempt += 1
            if limiter is not None:
                waited = await limiter.wait(contact.sender.address)
                self.metrics.outbound_wait.labels(adapter.name).observe(waited)
            if hold.done():
                raise _Lost
            try:
                receipt = await adapter.send(contact, reply)
            except SendError as exc:
                if not exc.retryable or attempt >= self.section.max_attempts:
                    await self._fail(contact.id, adapter.name, str(exc), reply.id)
                    self.metrics.replies.labels(contact.channel, adapter.name, "failed").inc()
                    return
                delay = exc.retry_after_s
                if delay is None:
                    delay = Backoff(float(self.section.backoff), float("inf")).nth(
                        attempt
                    ) * random.uniform(0.8, 1.2)
                self.metrics.replies.labels(contact.channel, adapter.name, "retried").inc()
                log.info("replies: retrying reply %s in %.1f s: %s", reply.id, delay, exc,
                         extra={"adapter": adapter.name, "contact_id": contact.id,
                                "event": "reply_retry"})
                await asyncio.wait({hold}, timeout=min(delay, 300.0))
                continue
            detail: dict[str, object] = {"reply_id": reply.id}
            if receipt.external_id:
                detail["external_id"] = receipt.external_id
            # Only the first reply settles the deadline; later ones leave no deadline event.
            await self.events.stamp(
                contact.id, "responded", self.clock.now_us(), adapter.name, detail
            )
            self.metrics.replies.labels(contact.channel, adapter.name, "sent").inc()
            return


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
