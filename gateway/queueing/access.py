"""A command's way to the queue: the configured Redis, or the embedded one of the data folder
(started for the duration of the command when no ``gateway serve`` runs there)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from gateway.queueing.store import connect
from gateway.server.config import Settings
from gateway.server.lock import DataDirBusy, DataDirLock


@contextlib.asynccontextmanager
async def open_queue(settings: Settings) -> AsyncIterator[tuple[Any, Keys, str]]:
    """Connect to the configured Redis; with none, to the embedded one (started if not running)."""
    embedded: EmbeddedRedis | None = None
    lock: DataDirLock | None = None
    url = settings.redis.url
    if not url and settings.redis.sentinel is None:
        data_dir = settings.gateway.data_dir.resolve()
        candidate = EmbeddedRedis(data_dir, settings.redis.server_binary)
        url = candidate.url
        lock = DataDirLock(data_dir)
        try:
            lock.acquire()
        except DataDirBusy:  # `gateway serve` runs there: use its server, never start a second
            lock = None
        else:  # nothing runs there: start the server for the duration of the command
            embedded = candidate
            try:
                await embedded.start()
            except BaseException:
                lock.release()
                raise
    client = connect(settings.redis, url)
    try:
        yield client, Keys(settings.redis.prefix), url
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()
        if lock is not None:
            lock.release()
