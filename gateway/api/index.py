"""Per-contact event index: ``{p}:contact-events:<id>``, a hash of stream entry id -> event JSON.

Why an index and not a scan: a contact's events are spread over its whole life (a mailbox
contact is answered up to a day later), so finding them by scanning ``{p}:events`` costs every
event written since the contact arrived, per request. The index costs one HSET per event,
written by one consumer group (``gateway-index``) shared by every gateway instance, and a read
is one HGETALL of just that contact's events. It lags the stream by one read (milliseconds);
HSET keyed by entry id makes a redelivered entry harmless. It expires with the contact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from gateway.api.tasks import cancel_and_wait
from gateway.queueing.consumer import StreamConsumer
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient

log = logging.getLogger(__name__)

GROUP = "gateway-index"
RECLAIM_IDLE_MS = 60_000


def index_key(keys: Keys, contact_id: str) -> str:
    return f"{keys.tag}:contact-events:{contact_id}"


def entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def contact_events(client: RedisClient, keys: Keys, contact_id: str) -> list[bytes]:
    """The indexed events of one contact as raw JSON, in stream order."""
    raw: dict[bytes, bytes] = await client.hgetall(index_key(keys, contact_id))
    ordered = sorted(raw.items(), key=lambda kv: entry_order(kv[0].decode()))
    return [value for _, value in ordered]


class EventIndexer:
    """Keeps the per-contact index of ``{p}:events`` as a member of ``gateway-index``."""

    def __init__(self, client: RedisClient, keys: Keys, consumer: str, retention_s: float) -> None:
        self.redis = client
        self.keys = keys
        self.ttl = max(1, int(retention_s))
        self.consumer: StreamConsumer[Any] = StreamConsumer(
            client, keys.events, GROUP, consumer, lambda d: d
        )
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        try:
            await self.consumer.ensure_group()
        except Exception as exc:  # Redis down: the loop creates the group once it is back
            log.warning("index: cannot create group yet (%s)", type(exc).__name__)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopping = True  # the loop ends even if a client call swallows the cancellation
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = 0.5
        last_reclaim = 0.0
        own_pending = True
        while not self._stopping:
            try:
                if own_pending:
                    await self._index(await self._raw_read("0", None))
                    own_pending = False
                if loop.time() - last_reclaim > RECLAIM_IDLE_MS / 1000:
                    last_reclaim = loop.time()
                    reply = await self.redis.xautoclaim(
                        self.keys.events, GROUP, self.consumer.name, RECLAIM_IDLE_MS, "0-0", 500
                    )
                    await self._index(reply[1])
                await self._index(await self._raw_read(">", 1000))
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("index: %r, retrying in %.1f s", exc, backoff)
                own_pending = True
                with contextlib.suppress(Exception):
                    await self.consumer.ensure_group()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _raw_read(self, start: str, block_ms: int | None) -> list[Any]:
        reply = await self.redis.xreadgroup(
            GROUP, self.consumer.name, {self.keys.events: start}, count=500, block=block_ms
        )
        return list(reply[0][1]) if reply else []

    async def _index(self, entries: list[Any]) -> None:
        if not entries:
            return
        pipe = self.redis.pipeline(transaction=False)
        ids = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if not fields or b"contact_id" not in fields or b"event" not in fields:
                continue
            key = index_key(self.keys, fields[b"contact_id"].decode())
            pipe.hset(key, entry_id, fields[b"event"])
            pipe.expire(key, self.ttl)
        pipe.xack(self.keys.events, GROUP, *ids)
        await pipe.execute()
