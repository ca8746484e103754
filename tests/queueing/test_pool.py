"""The gateway's Redis client under more concurrent commands than its connection pool holds:
they wait for a connection; none fails as if Redis were away (which sent contacts to the spool
and skipped WeChat's replay check under load)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.store import POOL_SIZE, connect
from gateway.server.config import RedisSection
from gateway.testing import eventually


async def test_commands_past_the_pool_size_wait_for_a_connection(own_redis: EmbeddedRedis) -> None:
    client = connect(RedisSection(), own_redis.url)
    admin = aioredis.from_url(own_redis.url)
    tasks: list[asyncio.Task[object]] = []
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # writes wait
        tasks = [asyncio.create_task(client.set(f"k{i}", i)) for i in range(POOL_SIZE + 50)]

        async def pool_full() -> bool:
            clients = await admin.execute_command("CLIENT", "LIST")
            return clients.count(b"cmd=set") >= POOL_SIZE
        await eventually(pool_full)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
        await admin.aclose()
    assert results == [True] * (POOL_SIZE + 50)
