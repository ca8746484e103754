"""The generic SMS webhook: JSON and form bodies, HMAC and shared secret, the send template."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import pytest

from gateway.adapters import SendError
from gateway.records import Reply
from gateway.testing import eventually
from tests.channels.sms.fakes import Answer, FakeProvider, running

SECRET = "webhook-secret"


def hmac_hex(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def adapter(**extra: Any) -> dict[str, Any]:
    return {"type": "sms-webhook", "path": "/sms/agg", "secret": SECRET, "region": "CN",
            "recipient": "12345", **extra}


def payload(**extra: Any) -> dict[str, Any]:
    return {"from": "13800138000", "to": "12345", "text": "路灯坏了", "id": "agg-1",
            "timestamp": 1795594480, **extra}


@dataclass
class Case:
    label: str
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    text: str | None = None
    origin_at: int | None = 1795594480_000000


def signed(body: bytes) -> dict[str, str]:
    return {"X-Signature": hmac_hex(body)}


J = orjson.dumps
CASES = [
    Case("JSON, HMAC hex", J(payload()), text="路灯坏了"),
    Case("JSON, HMAC base64 with sha256= prefix", J(payload(text="🙂")),
         headers={"X-Signature": "sha256=" + base64.b64encode(
             hmac.new(SECRET.encode(), J(payload(text="🙂")), hashlib.sha256).digest()).decode()},
         text="🙂"),
    Case("form, shared secret", urlencode(payload(text="水管爆了")).encode(),
         content_type="application/x-www-form-urlencoded",
         headers={"X-Webhook-Secret": SECRET}, config={"auth": "shared-secret"},
         text="水管爆了"),
    Case("nested JSON with configured names",
         J({"message": {"msisdn": "+8613800138000", "body": "你好", "uuid": "u-1",
                        "sent": "2026-11-25T08:00:00Z"}}),
         config={"fields": {"sender": "message.msisdn", "text": "message.body",
                            "id": "message.uuid", "time": "message.sent"}},
         text="你好", origin_at=1795593600_000000),
    Case("empty text", J(payload(text="")), text=""),
    Case("forged signature", J(payload()), headers={"X-Signature": "0" * 64}, status=403),
    Case("signature of another body", J(payload()), headers=signed(J(payload(text="x"))),
         status=403),
    Case("no signature", J(payload()), headers={}, status=401),
    Case("wrong shared secret", urlencode(payload()).encode(),
         content_type="application/x-www-form-urlencoded",
         headers={"X-Webhook-Secret": "guess"}, config={"auth": "shared-secret"}, status=403),
    Case("malformed JSON", b'{"from": ', status=400),
    Case("JSON array", b"[1, 2]", status=400),
    Case("missing sender", J({"text": "x", "id": "1"}), status=400),
    Case("missing id", J({"from": "13800138000", "text": "x"}), status=400),
    Case("text not a string", J(payload(text=["x"])), status=400),
    Case("bad time", J(payload(timestamp="yesterday")), status=400),
    Case("invalid UTF-8 form", b"from=1380013800&text=%FF%FE&id=1",
         content_type="application/x-www-form-urlencoded", status=400),
    Case("oversize body", J(payload(text="x" * 70000)), status=413),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_inbound(case: Case, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"agg": adapter(**case.config)})
    headers = signed(case.body) if case.headers is None else case.headers
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{gw.http_port}/sms/agg", data=case.body,
        headers={"Content-Type": case.content_type, **headers},
    ) as resp:
        assert resp.status == case.status, await resp.text()
    contacts = await gw.read_contacts()
    if case.status != 200:
        assert contacts == []
        return
    (contact,) = contacts
    assert contact.text == case.text
    assert contact.sender.address == "+8613800138000"
    assert contact.recipient == "12345"
    assert contact.origin_at == case.origin_at


async def test_get_with_hmac_over_the_raw_query(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"agg": adapter()})
    query = "from=%2B8613800138000&text=%E4%BD%A0%E5%A5%BD&id=g-1"
    url = f"http://127.0.0.1:{gw.http_port}/sms/agg?{query}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"X-Signature": hmac_hex(b"x")}) as resp:
            assert resp.status == 403
        async with http.get(url, headers={"X-Signature": hmac_hex(query.encode())}) as resp:
            assert resp.status == 200
    (contact,) = await gw.read_contacts()
    assert contact.text == "你好"


async def post(gw: Any, data: dict[str, Any], path: str = "/sms/agg") -> int:
    body = orjson.dumps(data)
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{gw.http_port}{path}", data=body,
        headers={"Content-Type": "application/json", **signed(body)},
    ) as resp:
        return resp.status


async def test_parts_out_of_order_and_duplicates(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"agg": adapter(fields={
        "concat_ref": "ref", "concat_total": "total", "concat_part": "part"})})
    texts = {1: "第一段，", 2: "第二段，", 3: "第三段。"}
    for part in (3, 1, 1, 2, 3):
        assert await post(gw, payload(id=f"p{part}", text=texts[part], ref=77, total=3,
                                      part=part)) == 200
    (contact,) = await gw.read_contacts()
    assert contact.text == "第一段，第二段，第三段。"
    assert contact.meta["incomplete"] is False


async def test_duplicate_gives_one_contact(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"agg": adapter()})
    assert await post(gw, payload()) == 200
    assert await post(gw, payload()) == 200
    assert len(await gw.read_contacts()) == 1


def sender(api: FakeProvider, **extra: Any) -> dict[str, Any]:
    return {"url": api.url + "/send", "authorization": "Bearer tok", "timeout": "1s", **extra}


async def test_send_json_template_and_status(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(200, b'{"ok":true}'))) as api:
        gw = await start_gateway(adapters={"agg": adapter(send=sender(api))})
        assert await post(gw, payload()) == 200
        (contact,) = await gw.read_contacts()
        await gw.adapters["agg"].send(contact, Reply(contact.id, "已派单\"处理\"", id="r1"))
        (call,) = api.calls
        sent = orjson.loads(call.body)
        assert sent["to"] == "+8613800138000" and sent["from"] == "12345"
        assert sent["text"] == "已派单\"处理\""
        assert call.headers["Authorization"] == "Bearer tok"
        reference = sent["reference"]
        assert await post(gw, {"reference": reference, "status": "DELIVRD"},
                          path="/sms/agg/status") == 200
        forged = reference.rsplit(":", 1)[0] + ":" + "0" * 32
        assert await post(gw, {"reference": forged, "status": "failed"},
                          path="/sms/agg/status") == 403
        final = [e for e in await gw.read_events() if e.type in ("delivered", "failed")]
        assert [(e.type, e.detail["reply_id"]) for e in final] == [("delivered", "r1")]


async def test_without_a_secret_references_are_signed_with_a_kept_random_key(
    start_gateway: Any,
) -> None:
    """``auth = "none"``: the reference was signed with the adapter's name, so anyone could
    forge ``delivered`` for any contact. Now the key is random, kept in the fleet's shared state
    (as Kannel's: one implementation in sms/common.py)."""
    from gateway.channels.sms import common

    table = {k: v for k, v in adapter(auth="none").items() if k != "secret"}
    async with running(FakeProvider(Answer(200, b'{"ok":true}'))) as api:
        gw = await start_gateway(adapters={"agg": {**table, "send": sender(api)}})
        assert await post(gw, payload()) == 200
        (contact,) = await gw.read_contacts()
        await gw.adapters["agg"].send(contact, Reply(contact.id, "ok", id="r1"))
        reference = orjson.loads(api.calls[0].body)["reference"]
        guessed = f"{contact.id}:r1:{common.sign('agg', contact.id, 'r1')}"
        assert await post(gw, {"reference": guessed, "status": "DELIVRD"},
                          path="/sms/agg/status") == 403
        assert await post(gw, {"reference": reference, "status": "DELIVRD"},
                          path="/sms/agg/status") == 200
        # the fleet's random key, in shared state (a report may come back to any instance)
        key = await gw.state_for("agg").get("signing-key")
        assert key is not None and len(key) == 64
        assert reference.endswith(common.sign(key.decode(), contact.id, "r1"))
        final = [e.type for e in await gw.read_events() if e.type in ("delivered", "failed")]
        assert final == ["delivered"]


async def test_split_send_resumes_after_a_failed_part(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(200))) as api:
        api.answers = [Answer(200), Answer(503)]
        gw = await start_gateway(adapters={"agg": adapter(send=sender(
            api, split=True, format="form"))})
        assert await post(gw, payload()) == 200
        (contact,) = await gw.read_contacts()
        text = "长" * 150  # UCS-2: three parts of 67, 67, 16
        with pytest.raises(SendError) as err:
            await gw.adapters["agg"].send(contact, Reply(contact.id, text, id="long"))
        assert err.value.retryable
        await gw.adapters["agg"].send(contact, Reply(contact.id, text, id="long"))
        parts = [(c.form["text"], c.form.get("part")) for c in api.calls]
        assert [len(t) for t, _ in parts] == [67, 67, 67, 16]
        assert "".join(t for t, _ in parts[:1] + parts[2:]) == text


@pytest.mark.parametrize(
    ("answer", "retryable", "retry_after"),
    [(Answer(429, headers={"Retry-After": "2"}), True, 2.0), (Answer(500), True, None),
     (Answer(400, b"bad number"), False, None), (Answer(hang=True), True, None)],
    ids=["429", "500", "400", "timeout"],
)
async def test_send_errors(start_gateway: Any, answer: Answer, retryable: bool,
                           retry_after: float | None) -> None:
    async with running(FakeProvider(answer)) as api:
        gw = await start_gateway(adapters={"agg": adapter(send=sender(api))})
        assert await post(gw, payload()) == 200
        (contact,) = await gw.read_contacts()
        with pytest.raises(SendError) as err:
            await gw.adapters["agg"].send(contact, Reply(contact.id, "ok"))
        assert (err.value.retryable, err.value.retry_after_s) == (retryable, retry_after)


async def test_auto_acknowledgement_by_sms(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(200))) as api:
        gw = await start_gateway(adapters={"agg": adapter(send=sender(api),
                                                          ack_text="已收到，编号{ref}")})
        assert await post(gw, payload()) == 200
        (contact,) = await gw.read_contacts()
        async def acknowledged() -> list[Any]:
            return [e for e in await gw.read_events() if e.type == "acknowledged"]

        acks = await eventually(acknowledged)
        assert [e.contact_id for e in acks] == [contact.id]
        (call,) = api.calls
        assert orjson.loads(call.body)["text"] == (
            "已收到，编号" + contact.id.replace("-", "")[-10:].upper()
        )


async def test_incomplete_long_message_is_acknowledged_at_the_timeout(start_gateway: Any) -> None:
    from gateway.contact.clock import FixedClock

    clock = FixedClock()
    async with running(FakeProvider(Answer(200))) as api:
        gw = await start_gateway(clock=clock, adapters={"agg": adapter(
            send=sender(api), ack_text="收到{ref}", concat_timeout="30s",
            fields={"concat_ref": "ref", "concat_total": "total", "concat_part": "part"})})
        assert await post(gw, payload(id="q1", text="上半", ref=9, total=2, part=1)) == 200
        assert await gw.read_contacts() == []
        clock.advance(31)
        assert await gw.adapters["agg"].assembler.sweep() == 1
        (contact,) = await gw.read_contacts()
        assert contact.text == "上半" and contact.meta["incomplete"] is True
        await eventually(lambda: api.calls)
        assert orjson.loads(api.calls[0].body)["text"].startswith("收到")
