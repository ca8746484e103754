"""pytest fixtures for an adapter distribution's own tests (``pytest-asyncio`` in auto mode).

In the distribution's root ``conftest.py``: ``pytest_plugins = ["gateway.testing.plugin"]``.
Fixtures: ``redis_server`` (one embedded Valkey per session), ``own_redis`` (one per test, to
stop), ``start_gateway`` (gateways on the session Redis with a fresh key prefix, stopped at
teardown). The gateway project's own tests/conftest.py provides the same names.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SYSTEM_CLOCK, Clock
from gateway.config import parse_settings
from gateway.queueing.embedded import EmbeddedRedis
from gateway.runtime import Gateway
from gateway.testing.contract import StartGateway

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
async def start_gateway(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []
    prefix = f"kit{next(_prefixes)}"
    counter = itertools.count()

    async def start(
        *,
        adapters: dict[str, dict[str, Any]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        url: str | None = None,
        data_dir: Path | None = None,
        **sections: dict[str, Any],
    ) -> Gateway:
        raw: dict[str, Any] = {
            "gateway": {"data_dir": str(data_dir or tmp_path / f"gw{next(counter)}"),
                        "instance": f"test-{prefix}"},
            "redis": {"url": url or redis_server.url, "prefix": prefix, "write_timeout": "1s"},
            "http": {"listen": "127.0.0.1:0"},
            "api": {"open_to_loopback": True},
            "adapters": adapters or {},
        }
        for name, table in sections.items():
            raw[name] = {**raw.get(name, {}), **table}
        settings, configs = parse_settings(raw, "<test>")
        gateway = Gateway(settings, configs, clock=clock)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in reversed(started):
        await gateway.stop()
