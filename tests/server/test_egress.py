"""Outbound HTTP through a proxy (environment or [egress] proxy) and per-adapter send rates.

The proxy is a small forward proxy in the test: it answers absolute-form requests (what an HTTP
client sends to a proxy for an http:// URL) by forwarding them and counts what it forwarded.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.adapters import SendError
from gateway.records import Reply
from gateway.server.config import ConfigError, EgressSection
from gateway.server.egress import SendLimiter, SendRate, bypassed, proxy_for
from gateway.server.runtime import Gateway
from gateway.server.workers import WorkerRole, run_dir
from gateway.testing.plugin import settings_for
from tests.channels.sms.fakes import Answer, FakeProvider, running


class ForwardProxy:
    def __init__(self) -> None:
        self.forwarded: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        target = request.url  # absolute-form: the URL the client asked the proxy for
        self.forwarded.append(str(target))
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "proxy-connection", "connection")}
        async with aiohttp.ClientSession() as http, http.request(
            request.method, target, data=body, headers=headers
        ) as resp:
            return web.Response(status=resp.status, body=await resp.read())


@asynccontextmanager
async def proxy_server() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    proxy.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        yield proxy
    finally:
        await runner.cleanup()


async def kannel_reply(start_gateway: Any, provider: FakeProvider, **sections: Any) -> None:
    """Receive one SMS through a Kannel adapter and send a reply to it through sendsms."""
    gw = await start_gateway(adapters={"kannel": {
        "type": "kannel", "allow_from": ["127.0.0.1"], "sendsms_username": "gw",
        "sendsms_password": "pw-12345", "sendsms_url": f"{provider.url}/cgi-bin/sendsms",
    }}, **sections)
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/sms/kannel?from=%2B8613800138000&to=12345&text=hi&id=k1"
    ) as resp:
        assert resp.status == 200
    (contact,) = await gw.read_contacts()
    await gw.adapters["kannel"].send(contact, Reply(contact.id, "收到", id="r1"))


async def test_provider_calls_honour_the_proxy_environment(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with proxy_server() as proxy, running(FakeProvider(Answer(202))) as kannel:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        await kannel_reply(start_gateway, kannel)
    assert len(proxy.forwarded) == 1 and "/cgi-bin/sendsms?" in proxy.forwarded[0]
    assert len(kannel.calls) == 1


async def test_configured_proxy_and_no_proxy(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    async with proxy_server() as proxy, running(FakeProvider(Answer(202))) as kannel:
        await kannel_reply(start_gateway, kannel, egress={"proxy": proxy.url, "no_proxy": []})
        assert len(proxy.forwarded) == 1 and len(kannel.calls) == 1
        await kannel_reply(start_gateway, kannel,
                           egress={"proxy": proxy.url, "no_proxy": ["127.0.0.0/8"]})
        assert len(proxy.forwarded) == 1 and len(kannel.calls) == 2  # direct this time


async def test_a_proxy_that_refuses_makes_the_send_retryable(
    start_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with running(FakeProvider(Answer(502))) as broken_proxy, running(
        FakeProvider(Answer(202))
    ) as kannel:
        with pytest.raises(SendError) as failed:
            await kannel_reply(start_gateway, kannel,
                               egress={"proxy": broken_proxy.url, "no_proxy": []})
    assert failed.value.retryable and not kannel.calls


def test_no_proxy_matching() -> None:
    entries = ("localhost", ".example.gov.cn", "10.0.0.0/8", "::1")
    assert bypassed("localhost", entries)
    assert bypassed("sms.example.gov.cn", entries) and bypassed("example.gov.cn", entries)
    assert bypassed("10.1.2.3", entries) and bypassed("[::1]", entries)
    assert not bypassed("api.weixin.qq.com", entries) and not bypassed("11.0.0.1", entries)
    egress = EgressSection(proxy="http://proxy:3128", no_proxy=entries)
    assert proxy_for(egress, "https://api.telegram.org/bot1/sendMessage") == "http://proxy:3128"
    assert proxy_for(egress, "http://10.0.0.9:13013/cgi-bin/sendsms") is None
    assert proxy_for(EgressSection(), "https://api.twilio.com") is None


async def test_send_rate_overall_and_per_recipient() -> None:
    limiter = SendLimiter(SendRate(per_second=50, burst=2, per_recipient=20))
    waits = [await limiter.wait(f"chat{i}") for i in range(4)]
    assert waits[:2] == [0.0, 0.0]  # the burst
    assert all(w > 0 for w in waits[2:])  # then one every 1/50 s
    assert await limiter.wait("chat9") > 0  # a new chat still waits for the overall rate
    same = SendLimiter(SendRate(per_recipient=20))
    assert await same.wait("a") == 0.0
    assert await same.wait("b") == 0.0  # other chats are not held up
    assert await same.wait("a") > 0


async def test_send_rate_keys_on_any_adapter_and_telegram_defaults(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={
        "kannel": {"type": "kannel", "allow_from": ["127.0.0.1"], "send_rate": 5,
                   "send_rate_per_recipient": 0.5},
        "bot": {"type": "telegram", "token": "123456:ABC-DEF", "mode": "webhook",
                "api_base": "http://127.0.0.1:9/bot", "file_base": "http://127.0.0.1:9/file/bot"},
    })
    assert gw.replies is not None
    assert gw.replies.limiters["kannel"].rate == SendRate(5, 1, 0.5)
    assert gw.replies.limiters["bot"].rate == SendRate(30, 30, 1)
    with pytest.raises(ConfigError, match="send_rate"):
        await start_gateway(adapters={"k": {"type": "kannel", "allow_from": ["127.0.0.1"],
                                            "send_rate": "fast"}})


async def test_the_workers_of_one_instance_share_its_send_rate(
    tmp_path: Any, redis_url: str, prefix: str
) -> None:
    """Every worker of ``serve --workers N`` sends replies of every adapter: with the full rate
    each, a Telegram bot sent N x 30 a second and N a second to one chat (Telegram answers 429)."""
    settings, configs = settings_for(tmp_path / "gw", redis_url, prefix, adapters={
        "bot": {"type": "telegram", "token": "123456:ABC-DEF", "mode": "webhook",
                "api_base": "http://127.0.0.1:9/bot", "file_base": "http://127.0.0.1:9/file/bot"},
    })
    run_dir(settings.gateway.data_dir.resolve()).mkdir(parents=True)
    worker = WorkerRole(slot=0, count=3, parent=os.getpid(), redis_url=redis_url)
    gw = Gateway(settings, configs, worker=worker)
    await gw.start()
    try:
        assert gw.replies is not None
        assert gw.replies.limiters["bot"].rate == SendRate(10, 10, 1 / 3)
    finally:
        await gw.stop()
    assert SendRate(5, 1, 0.5).shared(1) == SendRate(5, 1, 0.5)
    assert SendRate(5, 1, 0.5).shared(4) == SendRate(1.25, 1, 0.125)
