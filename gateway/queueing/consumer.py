"""Consumer library for case systems: consumer groups over the gateway's streams.

consumer = ContactConsumer.from_url("redis://queue:6379/0", group="cases", name="worker-1")
await consumer.ensure_group()
for delivery in await consumer.read(count=10, block_ms=5000):
    handle(delivery.record)            # a gateway.records.Contact
    await consumer.ack(delivery.entry_id)
# entries a dead worker held longer than a minute:
for delivery in await consumer.reclaim(min_idle_ms=60_000): ...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient, decode_fields
from gateway.records import Contact, Event, Reply

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Delivery(Generic[T]):
    """One stream entry handed to this consumer; ``record`` is None when it did not decode."""

    entry_id: str
    record: T | None
    error: str | None = None


class StreamConsumer(Generic[T]):
    """A member of a consumer group on one stream, decoding each entry into ``T``."""

    def __init__(
        self,
        client: RedisClient,
        stream: str,
        group: str,
        name: str,
        decode: Callable[[dict[str, Any]], T],
        *,
        start_id: str = "0",
    ) -> None:
        self.redis = client
        self.stream = stream
        self.group = group
        self.name = name
        self._decode = decode
        self.start_id = start_id

    async def ensure_group(self) -> None:
        """Create the group (and the stream) if missing; ``start_id`` 0 reads from the beginning."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _deliveries(self, entries: list[Any]) -> list[Delivery[T]]:
        out: list[Delivery[T]] = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if fields is None:  # deleted or trimmed while pending
                out.append(Delivery(eid, None, "entry no longer in the stream"))
                continue
            try:
                out.append(Delivery(eid, self._decode(decode_fields(fields))))
            except Exception as exc:
                out.append(Delivery(eid, None, f"{type(exc).__name__}: {exc}"))
        return out

    async def read(self, count: int = 10, block_ms: int | None = 1000) -> list[Delivery[T]]:
        """Read new entries for this consumer (blocking up to ``block_ms``)."""
        reply = await self.redis.xreadgroup(
            self.group, self.name, {self.stream: ">"}, count=count, block=block_ms
        )
        if not reply:
            return []
        return self._deliveries(reply[0][1])

    async def read_own_pending(self, count: int = 100) -> list[Delivery[T]]:
        """Entries this consumer received but never acknowledged (e.g. before a restart)."""
        reply = await self.redis.xreadgroup(self.group, self.name, {self.stream: "0"}, count=count)
        if not reply:
            return []
        return self._deliveries(reply[0][1])

    async def ack(self, *entry_ids: str) -> int:
        """Acknowledge entries: they are done and leave the pending list."""
        if not entry_ids:
            return 0
        return int(await self.redis.xack(self.stream, self.group, *entry_ids))

    async def reclaim(self, min_idle_ms: int, count: int = 100) -> list[Delivery[T]]:
        """Take over entries another consumer has held longer than ``min_idle_ms`` (XAUTOCLAIM)."""
        reply = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.name,
            min_idle_time=min_idle_ms,
            start_id="0-0",
            count=count,
        )
        return self._deliveries(reply[1])

    async def pending_count(self) -> int:
        """How many entries of the group are delivered but not acknowledged."""
        info = await self.redis.xpending(self.stream, self.group)
        return int(info["pending"])


async def read_many(
    consumers: list[StreamConsumer[T]], count: int = 10, block_ms: int | None = 1000
) -> list[tuple[StreamConsumer[T], Delivery[T]]]:
    """Read new entries for several consumers (one name, one group per stream) in one blocking
    XREADGROUP: the streams must share the group and consumer name, as the reply router's do."""
    if not consumers:
        return []
    first = consumers[0]
    by_stream = {c.stream: c for c in consumers}
    reply = await first.redis.xreadgroup(
        first.group, first.name, {c.stream: ">" for c in consumers}, count=count, block=block_ms
    )
    out: list[tuple[StreamConsumer[T], Delivery[T]]] = []
    for stream, entries in reply or []:
        consumer = by_stream[stream.decode() if isinstance(stream, bytes) else str(stream)]
        out.extend((consumer, d) for d in consumer._deliveries(entries))
    return out


def _open(url: str) -> RedisClient:
    return aioredis.from_url(url)


class ContactConsumer(StreamConsumer[Contact]):
    """Reads Contact records from ``{prefix}:contacts``."""

    def __init__(
        self, client: RedisClient, group: str, name: str, *, prefix: str = "gateway"
    ) -> None:
        super().__init__(client, Keys(prefix).contacts, group, name, Contact.from_dict)

    @classmethod
    def from_url(
        cls, url: str, group: str, name: str, *, prefix: str = "gateway"
    ) -> ContactConsumer:
        return cls(_open(url), group, name, prefix=prefix)


class EventConsumer(StreamConsumer[Event]):
    """Reads Event records from ``{prefix}:events``."""

    def __init__(
        self, client: RedisClient, group: str, name: str, *, prefix: str = "gateway"
    ) -> None:
        super().__init__(client, Keys(prefix).events, group, name, Event.from_dict)

    @classmethod
    def from_url(cls, url: str, group: str, name: str, *, prefix: str = "gateway") -> EventConsumer:
        return cls(_open(url), group, name, prefix=prefix)


class ReplyConsumer(StreamConsumer[Reply]):
    """Reads Reply records from ``{prefix}:replies`` (the stream case systems write to)."""

    def __init__(
        self, client: RedisClient, group: str, name: str, *, prefix: str = "gateway"
    ) -> None:
        super().__init__(client, Keys(prefix).replies, group, name, Reply.from_dict)


async def post_reply(client: RedisClient, reply: Reply, *, prefix: str = "gateway") -> str:
    """Put a reply on ``{prefix}:replies`` for the gateway to deliver; return the entry id.

    Any gateway instance routes it to the contact's adapter; one running that adapter sends it
    (held until one runs, see ``gateway/cases/replies.py``)."""
    import orjson

    entry = await client.xadd(
        Keys(prefix).replies,
        {"reply": orjson.dumps(reply.to_dict()), "contact_id": reply.contact_id},
    )
    return entry.decode() if isinstance(entry, bytes) else str(entry)
