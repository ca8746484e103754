"""Push delivery: every contact (and optionally every event) POSTed to each subscriber.

One lane per subscriber. The lane is a consumer group of its own (``gateway-push.<name>``) on
``{p}:contacts`` (and ``{p}:events``), and the fleet lease ``push:<name>``
(``gateway.queueing.coordination``) makes one gateway instance at a time its only reader, so
entries go out strictly one after the other, in stream order (contacts and events merged by
entry id, a contact before an event of the same millisecond). An entry is acknowledged after a
2xx answer, or after ``max_attempts`` failed tries, once it is parked in
``{p}:deadletter:<name>``; until then it stays in the group's pending list, so an instance that
dies mid-way (or loses the lease) leaves it to the next lease holder: at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from redis.exceptions import ResponseError

from gateway.cases.push.signing import (
    ATTEMPT_HEADER,
    DELIVERY_HEADER,
    KIND_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    sign,
)
from gateway.contact.clock import Clock
from gateway.queueing.coordination import Fence, Leases, finish
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient
from gateway.server.config import EgressSection, PushSubscriber
from gateway.server.egress import client_session
from gateway.server.metrics import Metrics
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

READ_COUNT = 100
ACK_BATCH = 50
DEADLETTER_MAXLEN = 100_000

def group_name(subscriber: str) -> str:
    return f"gateway-push.{subscriber}"


def deadletter_key(keys: Keys, subscriber: str) -> str:
    return f"{keys.tag}:deadletter:{subscriber}"


def lease_name(subscriber: str) -> str:
    """The subscriber's lease (``gateway.queueing.coordination``): one instance delivers."""
    return f"push:{subscriber}"


@dataclass(frozen=True, slots=True)
class Item:
    """One stream entry to deliver."""

    kind: str
    """``contact`` or ``event``."""
    entry_id: str
    body: bytes

    @property
    def order(self) -> tuple[int, int, int]:
        ms, _, seq = self.entry_id.partition("-")
        return int(ms), 0 if self.kind == "contact" else 1, int(seq)


def envelope(kind: str, entry_id: str, record: bytes) -> bytes:
    """The POST body: ``{"type": kind, "delivery": entry_id, "data": record}``."""
    return (
        b'{"type":"'
        + kind.encode()
        + b'","delivery":"'
        + entry_id.encode()
        + b'","data":'
        + record
        + b"}"
    )


class LeaseLost(Exception):
    """The lane is stopping: leave the entry pending for the next lease holder."""


class DeliveryFailed(Exception):
    """One attempt failed; ``retry_after_s`` when the receiver said how long to wait."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


async def post_once(
    session: aiohttp.ClientSession, sub: PushSubscriber, item: Item, attempt: int
) -> None:
    """POST one signed item; raise DeliveryFailed unless the receiver answers 2xx."""
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(sub.secret.reveal(), timestamp, item.body),
        DELIVERY_HEADER: item.entry_id,
        KIND_HEADER: item.kind,
        ATTEMPT_HEADER: str(attempt),
    }
    try:
        async with session.post(
            sub.url,
            data=item.body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=float(sub.timeout)),
            allow_redirects=False,
        ) as response:
            await response.read()
            if 200 <= response.status < 300:
                return
            retry_after = response.headers.get("Retry-After", "")
            raise DeliveryFailed(
                f"HTTP {response.status}",
                float(retry_after) if retry_after.isdigit() else None,
            )
    except TimeoutError as exc:
        raise DeliveryFailed("timed out") from exc
    except aiohttp.ClientError as exc:
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from exc


def _entry_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class Lane:
    """Delivers to one subscriber, in order, while this instance holds the subscriber's lease."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        sub: PushSubscriber,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Clock,
        instance: str,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.sub = sub
        self.session = session
        self.metrics = metrics
        self.clock = clock
        self.instance = instance
        self.group = group_name(sub.name)
        self.streams = {keys.contacts: "contact"}
        if sub.events:
            self.streams[keys.events] = "event"
        self._buffer: list[Item] = []
        self._horizon: tuple[int, int, int] | None = None
        self._acks: dict[str, list[str]] = {}
        self._supervisor: Supervisor | None = None
        self._stopping = False
        self.loop_name = f"push-{sub.name}"

    async def ensure_groups(self) -> None:
        """Create the subscriber's groups at the streams' current end (only new entries)."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def start(self, leases: Leases, supervisor: Supervisor) -> None:
        """Deliver whenever this instance holds the subscriber's lease (supervised)."""
        self._supervisor = supervisor

        async def run() -> None:
            await leases.exclusive(lease_name(self.sub.name), self._hold)

        supervisor.spawn(self.loop_name, run, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        """Stop delivering and release the lease (the next holder takes the pending entries)."""
        self._stopping = True
        if self._supervisor is not None:
            await self._supervisor.stop(self.loop_name)

    async def _hold(self, fence: Fence) -> None:
        """Deliver while the lease is ours: first what earlier holders left pending, then new.

        Losing the lease cancels this; what was delivered but not yet acknowledged goes out
        again from the next holder (at least once)."""
        log.info("push %s: delivering (lease fence %d)", self.sub.name, fence.token)
        self._buffer.clear()
        self._acks.clear()
        await self.ensure_groups()
        try:
            self._buffer = await self._take_over_pending()
            self._buffer.sort(key=lambda i: i.order)
            while not self._stopping:
                await self._deliver_ready()
                await self._flush_acks()
                await self._read_new()
        finally:
            with contextlib.suppress(Exception):  # through a repeated cancellation too
                await finish(self._flush_acks())

    async def _take_over_pending(self) -> list[Item]:
        items: list[Item] = []
        for stream, kind in self.streams.items():
            cursor = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream, self.group, self.instance, 0, cursor, 1000
                )
                cursor = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
                items.extend(self._items(kind, reply[1]))
                if cursor == "0-0":
                    break
            start = "0"
            while True:
                reply = await self.redis.xreadgroup(
                    self.group, self.instance, {stream: start}, count=1000
                )
                entries = reply[0][1] if reply else []
                if not entries:
                    break
                items.extend(self._items(kind, entries))
                last = entries[-1][0]
                start = last.decode() if isinstance(last, bytes) else str(last)
        unique = {(i.kind, i.entry_id): i for i in items}
        return list(unique.values())

    def _items(self, kind: str, entries: Sequence[Any]) -> list[Item]:
        field = b"contact" if kind == "contact" else b"event"
        stream = self.keys.contacts if kind == "contact" else self.keys.events
        out = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            record = fields.get(field) if fields else None
            if not record:  # trimmed from the stream while pending: nothing left to send
                self._acks.setdefault(stream, []).append(eid)
                continue
            out.append(Item(kind, eid, envelope(kind, eid, record)))
        return out

    async def _read_new(self) -> None:
        reply = await self.redis.xreadgroup(
            self.group,
            self.instance,
            {stream: ">" for stream in self.streams},
            count=READ_COUNT,
            block=1000,
        )
        horizon: tuple[int, int, int] | None = None
        for stream_name, entries in reply or []:
            name = stream_name.decode() if isinstance(stream_name, bytes) else str(stream_name)
            kind = self.streams[name]
            self._buffer.extend(self._items(kind, entries))
            if len(entries) >= READ_COUNT and len(self.streams) > 1:
                # this stream may hold more, earlier than what the other one returned: wait
                last = Item(kind, _entry_id(entries[-1][0]), b"").order
                horizon = last if horizon is None or last < horizon else horizon
                log.debug(
                    "push %s: holding entries after %s until %s is read",
                    self.sub.name,
                    _entry_id(entries[-1][0]),
                    name,
                )
        self._buffer.sort(key=lambda i: i.order)
        self._horizon = horizon

    async def _deliver_ready(self) -> None:
        horizon = self._horizon
        while self._buffer:
            item = self._buffer[0]
            if horizon is not None and item.order > horizon:
                return
            await self._deliver(item)
            self._buffer.pop(0)
        self._horizon = None

    async def _deliver(self, item: Item) -> None:
        sub = self.sub
        stream = self.keys.contacts if item.kind == "contact" else self.keys.events
        attempt = 0
        while True:
            attempt += 1
            if self._stopping:
                raise LeaseLost(sub.name)
            try:
                await post_once(self.session, sub, item, attempt)
            except DeliveryFailed as exc:
                self.metrics.push_deliveries.labels(sub.name, "failed").inc()
                if attempt >= sub.max_attempts:
                    await self._park(stream, item, attempt, str(exc))
                    return
                delay = Backoff(float(sub.backoff), float(sub.max_backoff)).nth(attempt)
                delay = delay / 2 + random.uniform(0, delay / 2)  # equal jitter
                if exc.retry_after_s is not None:
                    delay = min(float(sub.max_backoff), max(delay, exc.retry_after_s))
                log.info(
                    "push %s: %s %s failed (%s), try %d in %.2f s",
                    sub.name,
                    item.kind,
                    item.entry_id,
                    exc,
                    attempt + 1,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._acks.setdefault(stream, []).append(item.entry_id)
            if sum(len(ids) for ids in self._acks.values()) >= ACK_BATCH:
                await self._flush_acks()
            self.metrics.push_deliveries.labels(sub.name, "delivered").inc()
            entry_ms = int(item.entry_id.partition("-")[0])
            self.metrics.push_latency.labels(sub.name).observe(
                max(0.0, (self.clock.now_us() // 1000 - entry_ms) / 1000)
            )
            return

    async def _flush_acks(self) -> None:
        """Acknowledge delivered entries in one round trip (a crash before it redelivers them)."""
        acks, self._acks = self._acks, {}
        if not acks:
            return
        pipe = self.redis.pipeline(transaction=False)
        for stream, ids in acks.items():
            pipe.xack(stream, self.group, *ids)
        await pipe.execute()

    async def _park(self, stream: str, item: Item, attempts: int, reason: str) -> None:
        log.warning(
            "push %s: %s %s parked after %d tries: %s",
            self.sub.name,
            item.kind,
            item.entry_id,
            attempts,
            reason,
        )
        await self._flush_acks()
        key = deadletter_key(self.keys, self.sub.name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            key,
            {
                "kind": item.kind,
                "entry_id": item.entry_id,
                "body": item.body,
                "attempts": attempts,
                "error": reason[:500],
                "parked_at": self.clock.now_us(),
            },
            maxlen=DEADLETTER_MAXLEN,
            approximate=True,
        )
        pipe.xack(stream, self.group, item.entry_id)
        pipe.xlen(key)
        depth = (await pipe.execute())[-1]
        self.metrics.push_deliveries.labels(self.sub.name, "parked").inc()
        self.metrics.push_deadletter.labels(self.sub.name).set(int(depth))


class Pusher:
    """All subscriber lanes of this gateway instance, sharing one HTTP client session."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        subscribers: Sequence[PushSubscriber],
        metrics: Metrics,
        clock: Clock,
        instance: str,
        leases: Leases,
        supervisor: Supervisor,
        egress: EgressSection | None = None,
    ) -> None:
        self.egress = egress or EgressSection()
        self.leases = leases
        self.supervisor = supervisor
        self.redis = client
        self.keys = keys
        self.subscribers = tuple(subscribers)
        self.metrics = metrics
        self.clock = clock
        self.instance = instance
        self.session: aiohttp.ClientSession | None = None
        self.lanes: list[Lane] = []

    async def start(self) -> None:
        if not self.subscribers:
            return
        self.session = client_session(  # many hosts: the environment's proxy variables apply
            self.egress,
            connector=aiohttp.TCPConnector(limit_per_host=4),
            headers={"User-Agent": "gateway-push"},
        )
        for sub in self.subscribers:
            lane = Lane(
                self.redis, self.keys, sub, self.session, self.metrics, self.clock, self.instance
            )
            try:
                await lane.ensure_groups()
                self.metrics.push_deadletter.labels(sub.name).set(
                    int(await self.redis.xlen(deadletter_key(self.keys, sub.name)))
                )
            except Exception as exc:  # Redis down: the lane creates its groups once it is back
                log.warning("push %s: not ready yet (%s)", sub.name, type(exc).__name__)
            self.lanes.append(lane)
            lane.start(self.leases, self.supervisor)

    async def stop(self) -> None:
        for lane in self.lanes:
            await lane.stop()
        self.lanes.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None
