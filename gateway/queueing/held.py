"""Small files held in Redis until they are written to their own files (the attachment store's
``keep``): one hash per store, field the sha256, value the media type, a newline, the bytes.

An SMTP ``250`` then waits for one durable write of the raw message (this hash, under the
server's ``appendfsync always``) instead of a file and folder fsync on the gateway's disk."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.queueing.batching import Coalescer
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient


def store_name(root: Path) -> str:
    """Who holds: this host and folder, the same across restarts and for every worker of it."""
    where = f"{socket.gethostname()}:{root.resolve()}"
    return hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RedisHolder:
    """``gateway.contact.attachments.Holder`` on the gateway's Redis; the holds of concurrent
    sessions are one ``HSET``, their releases one ``HDEL``."""

    def __init__(self, redis: RedisClient, keys: Keys, root: Path) -> None:
        self.redis = redis
        self.key = keys.held_files(store_name(root))
        self._holds: Coalescer[Mapping[str, bytes], None] = Coalescer(
            self._hold_many, max_batch=64
        )
        self._releases: Coalescer[Sequence[str], None] = Coalescer(self._release_many)

    async def hold(self, files: Mapping[str, bytes]) -> None:
        await self._holds.submit(files)

    async def _hold_many(self, batch: list[Mapping[str, bytes]]) -> list[None]:
        mapping: dict[str, bytes] = {}
        for files in batch:
            mapping.update(files)
        await self.redis.hset(self.key, mapping=mapping)
        return [None] * len(batch)

    async def _release_many(self, batch: list[Sequence[str]]) -> list[None]:
        await self.redis.hdel(self.key, *{d for digests in batch for d in digests})
        return [None] * len(batch)

    async def fetch(self, digest: str) -> bytes | None:
        value = await self.redis.hget(self.key, digest)
        return None if value is None else bytes(value)

    async def release(self, digests: Sequence[str]) -> None:
        await self._releases.submit(digests)

    async def held(self) -> list[str]:
        return [bytes(k).decode("ascii", "replace") for k in await self.redis.hkeys(self.key)]
