"""Small files held in Redis until they are written to their own files (the attachment store's
``keep``): one hash per store, field the sha256, value the media type, a newline, the bytes.

An SMTP ``250`` then waits for one durable write of the raw message (this hash, under the
server's ``appendfsync always``) instead of a file and folder fsync on the gateway's disk."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient


def store_name(root: Path) -> str:
    """Who holds: this host and folder, the same across restarts and for every worker of it."""
    where = f"{socket.gethostname()}:{root.resolve()}"
    return hashlib.sha256(where.encode("utf-8", "surrogatepass")).hexdigest()[:16]


class RedisHolder:
    """``gateway.contact.attachments.Holder`` on the gateway's Redis."""

    def __init__(self, redis: RedisClient, keys: Keys, root: Path) -> None:
        self.redis = redis
        self.key = keys.held_files(store_name(root))

    async def hold(self, files: Mapping[str, bytes]) -> None:
        await self.redis.hset(self.key, mapping=dict(files))

    async def fetch(self, digest: str) -> bytes | None:
        value = await self.redis.hget(self.key, digest)
        return None if value is None else bytes(value)

    async def release(self, digests: Sequence[str]) -> None:
        await self.redis.hdel(self.key, *digests)

    async def held(self) -> list[str]:
        return [bytes(k).decode("ascii", "replace") for k in await self.redis.hkeys(self.key)]
