"""Weibo fan service end to end: JSON and XML pushes, passive replies, the reply API."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import aiohttp
import pytest

from gateway.adapters import SendError
from gateway.channels.chat.officialaccount import parse_xml
from gateway.contact.clock import FixedClock
from gateway.records import Reply
from tests.channels.chat import payloads as p
from tests.channels.chat.fakes import FakeWeiboApi

NOW_S = 1_795_594_483
ACCESS_TOKEN = "2.00weibo_fan_service_token"


@pytest.fixture
async def weibo_api() -> AsyncIterator[FakeWeiboApi]:
    api = FakeWeiboApi(ACCESS_TOKEN)
    await api.start()
    yield api
    await api.stop()


async def _gateway(start_gateway: Any, **extra: Any) -> Any:
    table = {"type": "weibo", "app_secret": p.APP_SECRET, **extra}
    return await start_gateway(adapters={"wb": table}, clock=FixedClock(NOW_S * 1_000_000))


async def _post(gw: Any, query: str, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{gw.http_port}/chat/weibo/wb?{query}", data=body
        ) as resp:
            return resp.status, await resp.read()


async def test_url_verification(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    url = f"http://127.0.0.1:{gw.http_port}/chat/weibo/wb"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}?{p.weibo_query(NOW_S, echostr='echo-123')}") as resp:
            assert (resp.status, await resp.text()) == (200, "echo-123")
        async with http.get(
            f"{url}?{p.weibo_query(NOW_S, secret='wrong', echostr='echo-123')}"
        ) as resp:
            assert resp.status == 403


async def test_json_pushes_become_contacts_and_retries_dedupe(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    push = p.weibo_push("text", "我家门口的井盖丢了")
    for _ in range(3):
        assert await _post(gw, p.weibo_query(NOW_S), push) == (200, b"")
    assert (
        await _post(
            gw,
            p.weibo_query(NOW_S),
            p.weibo_push(
                "position", "我在这里", {"longitude": "116.308586", "latitude": "39.982525"}
            ),
        )
    )[0] == 200
    assert (
        await _post(
            gw,
            p.weibo_query(NOW_S),
            p.weibo_push("image", "", {"vfid": 821804459, "tovfid": 821804469}),
        )
    )[0] == 200
    assert (
        await _post(gw, p.weibo_query(NOW_S), p.weibo_push("event", "", {"subtype": "follow"}))
    )[0] == 200
    assert (
        await _post(
            gw, p.weibo_query(NOW_S), p.weibo_push("event", "", {"subtype": "click", "key": "menu"})
        )
    )[0] == 200
    contacts = await gw.read_contacts()
    assert [c.meta["type"] for c in contacts] == ["text", "position", "image", "event"]
    text = contacts[0]
    assert text.sender.address == f"weibo:{p.WEIBO_USER}"
    assert text.recipient == str(p.WEIBO_ACCOUNT)
    assert (text.text, text.language, text.channel) == ("我家门口的井盖丢了", "zh", "chat")
    assert text.origin_at == 1342433360 * 1_000_000
    assert contacts[1].meta["location"] == {"lat": 39.982525, "lon": 116.308586}
    assert contacts[3].meta["event"] == "follow"


@pytest.mark.parametrize(
    ("case", "expected"),
    [("forged", 403), ("replay", 403), ("malformed", 400), ("not-object", 400), ("oversize", 413)],
)
async def test_hostile_pushes(start_gateway: Any, case: str, expected: int) -> None:
    gw = await _gateway(start_gateway)
    good = p.weibo_push("text", "x")
    query, body = {
        "forged": (p.weibo_query(NOW_S, secret="guess"), good),
        "replay": (p.weibo_query(NOW_S + 900), good),
        "malformed": (p.weibo_query(NOW_S), b'{"type": "text", "sender_id": '),
        "not-object": (p.weibo_query(NOW_S), b"[1, 2]"),
        "oversize": (p.weibo_query(NOW_S), b'{"text": "' + b"x" * (80 * 1024) + b'"}'),
    }[case]
    assert (await _post(gw, query, body))[0] == expected
    assert await gw.read_contacts() == []


async def test_unknown_type_ignored_with_log(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await _gateway(start_gateway)
    with caplog.at_level(logging.INFO):
        assert (await _post(gw, p.weibo_query(NOW_S), p.weibo_push("mention", "@hotline")))[
            0
        ] == 200
    assert "mention" in caplog.text
    assert await gw.read_contacts() == []


async def test_passive_json_auto_ack(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway, auto_ack="您的留言已收到")
    status, body = await _post(gw, p.weibo_query(NOW_S), p.weibo_push("text", "路面塌陷"))
    assert status == 200
    reply = json.loads(body)
    assert reply["result"] is True
    assert (reply["receiver_id"], reply["sender_id"], reply["type"]) == (
        str(p.WEIBO_USER),
        str(p.WEIBO_ACCOUNT),
        "text",
    )
    assert json.loads(unquote(reply["data"])) == {"text": "您的留言已收到"}
    [contact] = await gw.read_contacts()
    assert [
        e.type
        for e in await gw.read_events()
        if e.contact_id == contact.id and e.type == "acknowledged"
    ] == ["acknowledged"]


async def test_xml_format(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway, format="xml", auto_ack="ok")
    body = (
        f"<xml><ToUserName><![CDATA[{p.WEIBO_ACCOUNT}]]></ToUserName>"
        f"<FromUserName><![CDATA[{p.WEIBO_USER}]]></FromUserName>"
        f"<CreateTime>{NOW_S}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[hello there]]></Content></xml>"
    ).encode()
    status, answer = await _post(gw, p.weibo_query(NOW_S), body)
    assert status == 200
    assert parse_xml(answer)["ToUserName"] == str(p.WEIBO_USER)
    [contact] = await gw.read_contacts()
    assert (contact.text, contact.language) == ("hello there", "en")


async def test_reply_api(start_gateway: Any, weibo_api: FakeWeiboApi) -> None:
    gw = await _gateway(start_gateway, access_token=ACCESS_TOKEN, api_base=weibo_api.base)
    await _post(gw, p.weibo_query(NOW_S), p.weibo_push("text", "x"))
    [contact] = await gw.read_contacts()
    receipt = await gw.adapters["wb"].send(contact, Reply(contact.id, "已转交城管处理"))
    [sent] = weibo_api.sent
    assert (sent["receiver_id"], sent["type"]) == (str(p.WEIBO_USER), "text")
    assert json.loads(sent["data"]) == {"text": "已转交城管处理"}
    assert receipt.external_id is not None
    weibo_api.errors.append((403, 10023))
    with pytest.raises(SendError) as info:
        await gw.adapters["wb"].send(contact, Reply(contact.id, "again"))
    assert info.value.retryable
    weibo_api.errors.append((400, 20016))
    with pytest.raises(SendError) as info:
        await gw.adapters["wb"].send(contact, Reply(contact.id, "again"))
    assert not info.value.retryable


async def test_a_signed_query_replayed_with_another_body_is_refused(start_gateway: Any) -> None:
    """Weibo's signature covers the query only: a captured one must not carry another body."""
    gw = await _gateway(start_gateway)
    query = p.weibo_query(NOW_S, nonce="9f8e7d6c")
    genuine = p.weibo_push("text", "井盖丢了")
    for _ in range(3):  # Weibo's own retries: the same push
        assert await _post(gw, query, genuine) == (200, b"")
    assert (await _post(gw, query, p.weibo_push("text", "伪造")))[0] == 403
    assert [c.text for c in await gw.read_contacts()] == ["井盖丢了"]
