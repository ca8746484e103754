"""Fixtures for the case-systems tests: a gateway with API tokens, HTTP helpers, fake peers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jsonschema
import pytest
from aiohttp import web

from gateway.cases.api.openapi import document
from gateway.server.runtime import Gateway

TOKENS = {
    "reader": "tok-reader-0123456789",
    "replier": "tok-replier-0123456789",
    "admin": "tok-admin-0123456789",
    "intake": "tok-intake-0123456789",
}
SCOPES = {"reader": ["read"], "replier": ["reply"], "admin": ["admin"], "intake": ["intake"]}
API = {
    "open_to_loopback": False,
    "keys": [{"key": TOKENS[n], "name": n, "scopes": SCOPES[n]} for n in TOKENS],
}
OPENAPI: dict[str, Any] = document()


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


def check_schema(path: str, method: str, status: int, body: Any, ctype: str) -> None:
    """Validate a response body against the OpenAPI document's schema for it."""
    op = OPENAPI["paths"][path][method]
    response = op["responses"][str(status)]
    if "$ref" in response:
        response = OPENAPI["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    content = response["content"]
    if "*/*" in content and ctype not in content:
        return  # any media type: the bytes of a file
    assert ctype in content, f"{method} {path} {status}: {ctype} not documented"
    schema = dict(content[ctype]["schema"])
    schema["components"] = OPENAPI["components"]
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(body)


@dataclass
class Client:
    """Real HTTP calls to one gateway; every answer is checked against the OpenAPI document."""

    session: aiohttp.ClientSession
    base: str
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def call(
        self,
        method: str,
        path: str,
        template: str | None = None,
        *,
        token: str | None = "reader",
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        if token is not None:
            hdrs.update(auth(token))
        async with self.session.request(
            method, self.base + path, json=json_body, data=data, headers=hdrs, params=params
        ) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "").split(";")[0]
            body = json.loads(raw) if raw and "json" in ctype else raw
            if template is not None:
                check_schema(template, method.lower(), resp.status, body, ctype)
                self.calls.append((template, method.lower(), resp.status))
            if resp.status >= 400 and template is not None:
                assert ctype == "application/problem+json", (resp.status, raw)
                assert body["status"] == resp.status
            return resp.status, body


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def api_gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway(api=API)


@pytest.fixture
async def client(api_gateway: Gateway, session: aiohttp.ClientSession) -> Client:
    return Client(session, f"http://127.0.0.1:{api_gateway.http_port}")


async def submit(client: Client, text: str, *, channel: str = "web", **extra: Any) -> str:
    """Put one contact in through ``POST /v1/intake``; return its id."""
    body = {"channel": channel, "sender": {"address": "citizen@example.org"}, "text": text}
    body.update(extra)
    status, answer = await client.call("POST", "/v1/intake", token="intake", json_body=body)
    assert status == 202, answer
    return str(answer["id"])


@dataclass
class Receiver:
    """A local webhook receiver whose behaviour the test scripts (see ``plan``)."""

    port: int = 0
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    plan: list[str] = field(default_factory=list)
    """Behaviour of the next requests: ok, fail (500), busy (503 Retry-After 1), slow (answers
    after a while), hang (never answers before the pusher's timeout). Empty: ok."""
    default: str = "ok"
    hang_s: float = 5.0
    slow_s: float = 0.3
    accepted: list[bytes] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    """The most requests the receiver was answering at once (one lane delivers one by one)."""

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append((dict(request.headers), body))
        action = self.plan.pop(0) if self.plan else self.default
        if action == "fail":
            return web.Response(status=500, text="boom")
        if action == "busy":
            return web.Response(status=503, headers={"Retry-After": "1"})
        if action == "hang":  # the pusher gives up waiting; this answer is never read
            await asyncio.sleep(self.hang_s)
            return web.Response(status=504)
        if action == "slow":
            await asyncio.sleep(self.slow_s)
        self.accepted.append(body)
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/hook", r.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield r
    await runner.cleanup()
