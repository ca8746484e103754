"""Reply routing: replies written by case systems go out through the contact's own adapter."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Mapping

from gateway.adapters import Adapter, EventSink, SendError
from gateway.clock import Clock
from gateway.config import RepliesSection
from gateway.egress import SendLimiter
from gateway.metrics import Metrics
from gateway.queueing.consumer import Delivery, ReplyConsumer
from gateway.queueing.store import RedisQueue
from gateway.records import Event, Reply
from gateway.supervise import Supervisor

log = logging.getLogger(__name__)

GROUP = "gateway-replies"
RECLAIM_IDLE_MS = 60_000
HOLD_S = 20.0


class ReplyRouter:
    """Consumes ``{gateway}:replies`` as a member of one group shared by all gateway instances.

    Each reply is handed to ``adapters[contact.adapter].send``. The first success stamps
    ``responded`` (elapsed and met against the contact's deadline); a permanent failure, or a
    retryable one that outlives ``max_attempts``, emits ``failed``. The entry is acknowledged
    after either outcome; entries held by a dead instance are reclaimed after a minute.
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
        """Each adapter's send rate (gateway/egress.py), waited for before every send."""
        self.queue = queue
        self.events = events
        self.adapters = adapters
        self._inflight: set[str] = set()
        self.clock = clock
        self.metrics = metrics
        self.section = section
        self.consumer = ReplyConsumer(queue.redis, GROUP, consumer_name, prefix=queue.keys.prefix)
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._supervisor: Supervisor | None = None
        self._stopping = False

    def start(self, supervisor: Supervisor) -> None:
        """Run the reading loop as the supervised loop ``replies``."""
        self._supervisor = supervisor
        supervisor.spawn("replies", self._run, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        """Stop reading; let replies being sent finish (a bounded wait), the rest stay pending."""
        self._stopping = True
        if self._supervisor is not None:
            await self._supervisor.stop("replies")
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=5)
            for task in pending:
                task.cancel()

    async def _run(self) -> None:
        backoff = 0.5
        ready = False
        last_reclaim = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if not ready:
                    await self.consumer.ensure_group()
                    for delivery in await self.consumer.read_own_pending():
                        await self._dispatch(delivery)
                    ready = True
                if loop.time() - last_reclaim > RECLAIM_IDLE_MS / 1000:
                    last_reclaim = loop.time()
                    for delivery in await self.consumer.reclaim(RECLAIM_IDLE_MS):
                        await self._dispatch(delivery)
                for delivery in await self.consumer.read(count=50, block_ms=1000):
                    await self._dispatch(delivery)
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "replies: reading failed (%s), retrying in %.1f s", type(exc).__name__, backoff
                )
                ready = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _dispatch(self, delivery: Delivery[Reply]) -> None:
        if delivery.entry_id in self._inflight:  # reclaimed from ourselves while still sending
            return
        self._inflight.add(delivery.entry_id)
        await self._slots.acquire()
        task = asyncio.get_running_loop().create_task(self._handle(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, delivery: Delivery[Reply]) -> None:
        try:
            await self._deliver(delivery)
            await self.consumer.ack(delivery.entry_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # left pending, reclaimed and retried later
            log.exception("replies: entry %s left pending", delivery.entry_id)
        finally:
            self._inflight.discard(delivery.entry_id)

    async def _wait_holding(self, entry_id: str, seconds: float) -> None:
        """Wait before a retry while keeping the entry ours: its idle time is reset every
        ``HOLD_S``, so other instances' reclaim (idle past a minute) never sends it twice."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(left, HOLD_S))
            with contextlib.suppress(Exception):
                await self.queue.redis.xclaim(
                    self.consumer.stream, GROUP, self.consumer.name, 0, [entry_id], justid=True
                )

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

    async def _deliver(self, delivery: Delivery[Reply]) -> None:
        reply = delivery.record
        if reply is None:
            log.error(
                "replies: undecodable entry %s dropped: %s", delivery.entry_id, delivery.error
            )
            return
        if not reply.id:  # the id events carry, and the adapter's own reference
            reply = dataclasses.replace(reply, id=delivery.entry_id)
        reply_id = reply.id
        contact = await self.queue.get(reply.contact_id)
        if contact is None:
            await self._fail(reply.contact_id, "gateway", "unknown contact", reply_id)
            self.metrics.replies.labels("unknown", "unknown", "failed").inc()
            return
        adapter = self.adapters.get(contact.adapter)
        if adapter is None:
            await self._fail(
                contact.id, "gateway", f"no adapter {contact.adapter!r} to send through", reply_id
            )
            self.metrics.replies.labels(contact.channel, contact.adapter, "failed").inc()
            return
        attempt = 0
        while True:
            attempt += 1
            limiter = self.limiters.get(adapter.name)
            if limiter is not None:
                waited = await limiter.wait(contact.sender.address)
                self.metrics.outbound_wait.labels(adapter.name).observe(waited)
            try:
                receipt = await adapter.send(contact, reply)
            except SendError as exc:
                if not exc.retryable or attempt >= self.section.max_attempts:
                    await self._fail(contact.id, adapter.name, str(exc), reply_id)
                    self.metrics.replies.labels(contact.channel, adapter.name, "failed").inc()
                    return
                delay = exc.retry_after_s
                if delay is None:
                    delay = (
                        float(self.section.backoff) * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                    )
                self.metrics.replies.labels(contact.channel, adapter.name, "retried").inc()
                log.info("replies: retrying reply %s in %.1f s: %s", reply_id, delay, exc,
                         extra={"adapter": adapter.name, "contact_id": contact.id,
                                "event": "reply_retry"})
                await self._wait_holding(delivery.entry_id, min(delay, 300.0))
                continue
            detail: dict[str, object] = {"reply_id": reply_id}
            if receipt.external_id:
                detail["external_id"] = receipt.external_id
            # Only the first reply settles the deadline; later ones leave no deadline event.
            await self.events.stamp(
                contact.id, "responded", self.clock.now_us(), adapter.name, detail
            )
            self.metrics.replies.labels(contact.channel, adapter.name, "sent").inc()
            return
