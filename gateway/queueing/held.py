"""Small files held in Redis until they are written to their own files (the attachment store's
``plan`` and ``settle``): one hash per store, field the sha256, value the media type, a
newline, the bytes, set by an ``HSET`` sent before the contact's script in its own pipelined
write (``RedisQueue.write_batch``).

An SMTP ``250`` then waits for one durable write (the contact's, with its raw message, under
the server's ``appendfsync always``) instead of a file and folder fsync on the gateway's disk."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from gateway.queueing.batching import Coalescer
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient

STORE_ID = ".store-id"
"""The attachment folder's own name for its held hash, made once in the folder."""


def store_name(root: Path) -> str:
    """Who holds: the attachment folder itself, by an id kept in it (``.store-id``, made once
    and fsynced): the same across restarts and for every worker of it, whatever the host is
    called now (a container made anew is named by its new id) and wherever the folder is
    mounted, so the start after a kill writes what was left held; every host that shares the
    folder shares its held files too. Raise OSError when the folder cannot be written."""
    path = root / STORE_ID
    with contextlib.suppress(FileNotFoundError):
        return _read_id(path)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = root / f"{STORE_ID}-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(8).encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # the first of concurrent starts (workers) makes it
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    folder = os.open(root, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return _read_id(path)


def _read_id(path: Path) -> str:
    value = path.read_text("ascii").strip()
    if not re.fullmatch(r"[0-9a-f]{16}", value):
        raise OSError(f"{path}: not a store id")
    return value


class RedisHolder:
    """``gateway.contact.attachments.Holder`` on the gateway's Redis: files are set in the hash
    by the contact's own write (``RedisQueue.write_batch``); concurrent releases are one
    ``HDEL``."""

    def __init__(self, redis: RedisClient, keys: Keys, root: Path) -> None:
        self.redis = redis
        self.key = keys.held_files(store_name(root))
        self._releases: Coalescer[Sequence[str], None] = Coalescer(self._release_many)

    async def _release_many(self, batch: list[Sequence[str]]) -> list[None]:
        await self.redis.hdel(self.key, *{d for digests in batch for d in digests})
        return [None] * len(batch)

    async def fetch(self, digest: str) -> bytes | None:
        value = await self.redis.hget(self.key, digest)
        return None if value is None else bytes(value)

    async def release(self, digests: Sequence[str]) -> None:
        if digests:
            await self._releases.submit(digests)

    async def drain(self) -> None:
        """Wait for the releases sent."""
        await self._releases.drain()

    async def held(self) -> list[str]:
        return [bytes(k).decode("ascii", "replace") for k in await self.redis.hkeys(self.key)]
