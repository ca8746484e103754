"""Fixtures: one real embedded Redis (Valkey) per test session, a gateway per test (both from
gateway.testing.plugin), and the project's own extras."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

# Shared, noisy machines: no per-example deadline (a slow example is not a bug).
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")

pytest_plugins = ["gateway.testing.plugin"]  # redis_server, redis_url, prefix, own_redis,
# start_gateway: the one way a test builds a gateway, shared with adapter distributions


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()

@pytest.fixture
async def aiohttp_client_session() -> AsyncIterator[Any]:
    """A plain aiohttp client session for real HTTP requests to a started gateway."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def production_logging() -> Iterator[None]:
    """The root logger as ``gateway serve`` sets it up: INFO, through the masking filter."""
    import io
    import logging

    from gateway.server.logs import MaskingFilter

    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(MaskingFilter())
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(level)
