"""When Intake cannot make a contact durable, every webhook asks its platform to retry (503).

The adapters get the real Intake of a running gateway behind a door that refuses the first
submission, and their routes on an HTTP server of the test's own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.adapters import AdapterContext
from gateway.channels.chat.telegram import TelegramAdapter, TelegramConfig
from gateway.channels.chat.wechat import WeChatAdapter, WeChatConfig
from gateway.channels.chat.weibo import WeiboAdapter, WeiboConfig
from gateway.contact.clock import FixedClock
from gateway.server.config import AdapterSettings, Secret
from tests.channels.chat import payloads as p
from tests.channels.chat.fakes import BOT_TOKEN, FakeBotApi, LocalServer, message
from tests.channels.chat.test_telegram import FlakyIntake

NOW_S = 1_795_594_483


@pytest.fixture
async def bot_api() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi()
    await api.start()
    yield api
    await api.stop()


async def _serve(
    gw: Any, build: Callable[[AdapterContext], Any], failures: int = 1
) -> tuple[LocalServer, Any, FlakyIntake]:
    server = LocalServer()
    flaky = FlakyIntake(gw.intake, failures=failures)
    ctx = AdapterContext(
        name="x",
        intake=flaky,
        events=gw.queue,
        contacts=gw.queue,
        router=server.app.router,
        attachments=gw.attachments,
        clock=FixedClock(NOW_S * 1_000_000),
        settings=AdapterSettings.of(gw.settings),
        leases=gw.leases,
        state=gw.state_for("x"),
    )
    adapter = build(ctx)
    await server.start()
    await adapter.start()
    if isinstance(adapter, TelegramAdapter):
        await asyncio.wait_for(adapter.ready.wait(), 30)
    return server, adapter, flaky


async def _once(url: str, body: bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body) as resp:
            return resp.status, await resp.text()


async def _twice(
    url: str, body: bytes, headers: dict[str, str] | None = None
) -> list[tuple[int, str | None]]:
    out = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with http.post(url, data=body, headers=headers or {}) as resp:
                out.append((resp.status, resp.headers.get("Retry-After")))
    return out


async def test_wechat_retries_a_passing_intake_failure_inside_the_window(
    start_gateway: Any,
) -> None:
    gw = await start_gateway()
    server, adapter, flaky = await _serve(
        gw,
        lambda ctx: WeChatAdapter(ctx, WeChatConfig(app_id=p.APP_ID, token=Secret(p.TOKEN))),
        failures=2,
    )
    try:
        url = f"{server.base}/chat/wechat/x?{p.wechat_query(NOW_S)}"
        assert await _once(url, p.text("t", create_time=NOW_S, msg_id=5)) == (200, "success")
    finally:
        await adapter.stop()
        await server.stop()
    assert flaky.refused == ["5", "5"]
    assert [c.external_id for c in await gw.read_contacts()] == ["5"]


async def test_wechat_is_left_to_time_out_when_intake_stays_down(start_gateway: Any) -> None:
    """WeChat retries a push it got no answer to within 5 s; the answer comes after that."""
    gw = await start_gateway()
    server, adapter, flaky = await _serve(
        gw,
        lambda ctx: WeChatAdapter(ctx, WeChatConfig(app_id=p.APP_ID, token=Secret(p.TOKEN))),
        failures=10**6,
    )
    try:
        url = f"{server.base}/chat/wechat/x?{p.wechat_query(NOW_S)}"
        assert await _once(url, p.text("t", create_time=NOW_S, msg_id=6)) == (503, "retry later")
    finally:
        await adapter.stop()
        await server.stop()
    assert len(flaky.refused) > 2  # kept trying inside the window
    assert await gw.read_contacts() == []


async def test_weibo_retries_a_passing_intake_failure(start_gateway: Any) -> None:
    gw = await start_gateway()
    server, adapter, flaky = await _serve(
        gw,
        lambda ctx: WeiboAdapter(ctx, WeiboConfig(app_secret=Secret(p.APP_SECRET))),
        failures=1,
    )
    try:
        url = f"{server.base}/chat/weibo/x?{p.weibo_query(NOW_S)}"
        assert await _once(url, p.weibo_push("text", "t")) == (200, "")
    finally:
        await adapter.stop()
        await server.stop()
    assert len(flaky.refused) == 1
    assert len(await gw.read_contacts()) == 1


async def test_telegram_webhook_503_then_taken(start_gateway: Any, bot_api: FakeBotApi) -> None:
    gw = await start_gateway()
    config = TelegramConfig(
        token=Secret(BOT_TOKEN),
        secret_token=Secret("k"),
        api_base=bot_api.api_base,
        file_base=bot_api.file_base,
    )
    server, adapter, flaky = await _serve(gw, lambda ctx: TelegramAdapter(ctx, config))
    try:
        body = orjson.dumps({"update_id": 1, "message": message(1, text="t")})
        headers = {"X-Telegram-Bot-Api-Secret-Token": "k", "Content-Type": "application/json"}
        assert await _twice(f"{server.base}/chat/telegram/x", body, headers) == [
            (503, "5"),
            (200, None),
        ]
    finally:
        await adapter.stop()
        await server.stop()
    assert [c.external_id for c in await gw.read_contacts()] == ["777000001:1"]
    assert flaky.refused == ["777000001:1"]
