"""A local stand-in for a provider's HTTP API: records every call, answers as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False
    """Never answer (the client's timeout fires)."""


class FakeProvider:
    """An aiohttp server on an ephemeral port; ``answers`` are used in order, then ``default``."""

    def __init__(self, default: Answer | None = None) -> None:
        self.calls: list[Call] = []
        self.answers: list[Answer] = []
        self.default = default or Answer()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.url = ""
        self._release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        form: dict[str, str] = {}
        if request.content_type == "application/x-www-form-urlencoded":
            form = {k: str(v) for k, v in (await request.post()).items()}
        self.calls.append(
            Call(request.method, request.path, dict(request.query), form,
                 dict(request.headers), body)
        )
        if request.path in self.files:
            data, content_type = self.files[request.path]
            return web.Response(body=data, content_type=content_type)
        answer = self.answers.pop(0) if self.answers else self.default
        if answer.hang:
            await self._release.wait()
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


@asynccontextmanager
async def running(provider: FakeProvider) -> AsyncIterator[FakeProvider]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", provider._handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    provider.url = f"http://127.0.0.1:{port}"
    try:
        yield provider
    finally:
        provider._release.set()
        await runner.cleanup()


def json_body(data: Any) -> bytes:
    import orjson

    return orjson.dumps(data)
