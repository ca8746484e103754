"""Fixtures: one real embedded Redis (Valkey) per test session, a gateway per test (both from
gateway.testing.plugin), and the project's own extras."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
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


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (cert file, key file)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
