"""Hostile bodies with valid signatures never crash a chat webhook: each gets a protocol answer
(200 ignored, 400, 413) and the listener keeps taking real pushes afterwards."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.contact.clock import FixedClock
from tests.channels.chat import payloads as p
from tests.channels.chat.fakes import BOT_TOKEN, FakeBotApi, message

NOW_S = 1_795_594_483
SECRET = "fuzz-secret"


@pytest.fixture
async def bot_api() -> AsyncIterator[FakeBotApi]:
    api = FakeBotApi()
    await api.start()
    yield api
    await api.stop()


def _mutations(seed_body: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = [b"", b"\x00" * 10, b"{}", b"<xml></xml>", b"<xml><MsgType>text</MsgType></xml>"]
    for _ in range(count):
        kind = rng.randrange(4)
        body = bytearray(seed_body)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(1, 400)))
        elif kind == 1:
            out.append(bytes(body[: rng.randrange(len(body))]))
        elif kind == 2:
            for _ in range(rng.randrange(1, 8)):
                body[rng.randrange(len(body))] = rng.randrange(256)
            out.append(bytes(body))
        else:
            cut = rng.randrange(len(body))
            out.append(bytes(body[:cut]) + rng.randbytes(rng.randrange(1, 50)) + bytes(body[cut:]))
    return out


async def test_webhooks_survive_mutated_bodies(start_gateway: Any, bot_api: FakeBotApi) -> None:
    adapters = {
        "wx": {"type": "wechat", "app_id": p.APP_ID, "token": p.TOKEN},
        "wxaes": {
            "type": "wechat",
            "app_id": p.APP_ID,
            "token": p.TOKEN,
            "mode": "safe",
            "encoding_aes_key": p.AES_KEY,
        },
        "wb": {"type": "weibo", "app_secret": p.APP_SECRET},
        "tg": {
            "type": "telegram",
            "token": BOT_TOKEN,
            "secret_token": SECRET,
            "set_webhook": False,
            "api_base": bot_api.api_base,
            "file_base": bot_api.file_base,
        },
    }
    gw = await start_gateway(adapters=adapters, clock=FixedClock(NOW_S * 1_000_000))
    await asyncio.wait_for(gw.adapters["tg"].ready.wait(), 30)
    base = f"http://127.0.0.1:{gw.http_port}"
    rng = random.Random(20261125)
    tg_headers = {"X-Telegram-Bot-Api-Secret-Token": SECRET, "Content-Type": "application/json"}
    aes_query, aes_body = p.safe_push(p.text("x", create_time=NOW_S, msg_id=1), NOW_S)
    # each push signed afresh, as the platforms do (a signed query is bound to its first body)
    cases: list[tuple[Callable[[], str], bytes, dict[str, str]]] = [
        (
            lambda: f"/chat/wechat/wx?{p.wechat_query(NOW_S)}",
            p.text("路灯坏了", create_time=NOW_S, msg_id=1),
            {},
        ),
        (
            lambda: f"/chat/weibo/wb?{p.weibo_query(NOW_S)}",
            p.weibo_push("text", "路灯坏了", {"a": [1, 2]}),
            {},
        ),
        (
            lambda: "/chat/telegram/tg",
            orjson.dumps({"update_id": 1, "message": message(1, text="路灯坏了")}),
            tg_headers,
        ),
    ]
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for signed_path, seed, headers in cases:
            for body in _mutations(seed, rng, 120):
                path = signed_path()
                async with http.post(base + path, data=body, headers=headers) as resp:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    assert resp.status in (200, 400, 413), (path, body, resp.status)
        # safe mode: mutated ciphertexts under a valid query are refused, never crashed on
        for body in _mutations(aes_body, rng, 60):
            async with http.post(f"{base}/chat/wechat/wxaes?{aes_query}", data=body) as resp:
                assert resp.status in (200, 400, 403, 413), (body, resp.status)
        before = len(await gw.read_contacts())
        for path, body, headers in [
            (
                f"/chat/wechat/wx?{p.wechat_query(NOW_S)}",
                p.text("after fuzz", create_time=NOW_S, msg_id=99999),
                {},
            ),
            (f"/chat/weibo/wb?{p.weibo_query(NOW_S)}", p.weibo_push("text", "after fuzz"), {}),
            (
                "/chat/telegram/tg",
                orjson.dumps({"update_id": 99999, "message": message(99999, text="after fuzz")}),
                tg_headers,
            ),
        ]:
            async with http.post(base + path, data=body, headers=headers) as resp:
                assert resp.status == 200
    contacts = await gw.read_contacts()
    assert [c.text for c in contacts[before:]] == ["after fuzz"] * 3
    assert statuses.get(400, 0) > 0  # the mutations did reach the parsers
