"""``POST /v1/intake``: the happy path, API keys, and bad input that writes nothing."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from tests.harness import settings_for  # noqa: F401  (documents where settings come from)


async def post(session, gw, body: bytes, headers=None):
    async with session.post(
        f"http://127.0.0.1:{gw.http_port}/v1/intake", data=body, headers=headers or {}
    ) as resp:
        return resp.status, await resp.read()


async def test_accepts_a_contact_and_answers_202_with_id_and_deadline(
    start_gateway, aiohttp_client_session
):
    gw = await start_gateway()
    body = {
        "sender": {"address": "+8613800138000", "name": "李四"},
        "text": "噪音扰民",
        "external_id": "f1",
    }
    status, raw = await post(aiohttp_client_session, gw, orjson.dumps(body))
    assert status == 202
    answer = orjson.loads(raw)
    assert answer["status"] == "enqueued"
    assert answer["deadline"]["policy"] == "web_response"
    status, raw = await post(aiohttp_client_session, gw, orjson.dumps(body))
    assert status == 202 and orjson.loads(raw)["id"] == answer["id"]
    (contact,) = await gw.read_contacts()
    assert contact.id == answer["id"] and contact.text == "噪音扰民" and contact.adapter == "api"
    assert contact.language == "zh"  # a hint for every text contact, from its script


@pytest.mark.parametrize(
    ("label", "body", "status"),
    [
        ("malformed JSON", b'{"text": ', 400),
        ("not an object", b"[1, 2]", 400),
        ("invalid UTF-8", b'{"text": "\xff\xfe"}', 400),
        ("wrong type", b'{"text": 42}', 400),
        ("unknown channel", b'{"channel": "fax"}', 400),
        ("unknown field", b'{"txt": "typo"}', 400),
        ("confidential not bool", b'{"confidential": "yes"}', 400),
        ("meta not object", b'{"meta": []}', 400),
        ("bad origin time", b'{"origin_at": "yesterday"}', 400),
        ("huge body", b'{"text": "' + b"x" * (2 << 20) + b'"}', 413),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    start_gateway, aiohttp_client_session, label, body, status
):
    gw = await start_gateway()
    got, raw = await post(aiohttp_client_session, gw, body, {"Content-Type": "application/json"})
    assert got == status, (label, raw)
    if got != 413:
        problem = orjson.loads(raw)
        assert problem["status"] == status and problem["detail"]
    assert await gw.redis.xlen(gw.keys.contacts) == 0


async def test_api_keys_are_required_when_configured(
    start_gateway, aiohttp_client_session, monkeypatch
):
    monkeypatch.setenv("TEST_APP_KEY", "s3cret-key-of-the-app")
    keys = [
        {"name": "app", "key_env": "TEST_APP_KEY"},
        {"name": "reader", "key": "reader-only-key", "scopes": ["read"]},
    ]
    gw = await start_gateway(api={"open_to_loopback": False, "keys": keys})
    body = orjson.dumps({"text": "hi"})
    assert (await post(aiohttp_client_session, gw, body))[0] == 401
    status, raw = await post(aiohttp_client_session, gw, body, {"Authorization": "Bearer wrong"})
    assert status == 401 and orjson.loads(raw)["detail"] == "unknown API key"
    status, raw = await post(aiohttp_client_session, gw, body, {"X-API-Key": "reader-only-key"})
    assert status == 403 and "intake" in orjson.loads(raw)["detail"]
    status, _raw = await post(
        aiohttp_client_session, gw, body, {"Authorization": "Bearer s3cret-key-of-the-app"}
    )
    assert status == 202
    status, _ = await post(aiohttp_client_session, gw, body, {"X-API-Key": "s3cret-key-of-the-app"})
    assert status == 202
    contacts = await gw.read_contacts()
    assert len(contacts) == 2 and {c.adapter for c in contacts} == {"api:app"}


async def test_health_ready_and_metrics(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    await post(aiohttp_client_session, gw, orjson.dumps({"channel": "sms", "text": "x"}))
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp_client_session.get(base + "/healthz") as resp:
        assert resp.status == 200
    async with aiohttp_client_session.get(base + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["redis"] is True
    async with aiohttp_client_session.get(base + "/metrics") as resp:
        text = await resp.text()
    assert 'gateway_contacts_enqueued_total{adapter="api",channel="sms"} 1.0' in text
    assert 'gateway_edge_to_enqueue_seconds_count{adapter="api",channel="sms"} 1.0' in text
    assert "gateway_stream_length 1.0" in text
    assert "gateway_spool_depth 0.0" in text


async def test_a_body_arriving_in_many_pieces_is_read_whole(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    body = orjson.dumps({"text": "长" * 10_000, "external_id": "chunked"})

    async def pieces():
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]
            await asyncio.sleep(0)

    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    async with aiohttp_client_session.post(url, data=pieces()) as resp:
        assert resp.status == 202, await resp.text()
    (contact,) = await gw.read_contacts()
    assert contact.text == "长" * 10_000


async def test_phone_senders_of_sms_and_voice_become_e164(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    for channel, sender in (("sms", "138 0013 8000"), ("web", "138 0013 8000")):
        body = orjson.dumps({"channel": channel, "sender": sender, "text": "x"})
        assert (await post(aiohttp_client_session, gw, body))[0] == 202
    sms, web = await gw.read_contacts()
    assert sms.sender.address == "+8613800138000"
    assert web.sender.address == "138 0013 8000"  # a web sender is whatever the form said
