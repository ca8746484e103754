"""Every SMS adapter: 503 + Retry-After when nothing can be stored, and logs that never carry a
full phone number or a secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlencode

import aiohttp
import orjson
import pytest

from gateway.records import Reply
from gateway.testing import break_spool
from tests.channels.sms.fakes import Answer, FakeProvider, running

PHONE = "13800138000"
SECRETS = ("kannel-pass-XYZ", "twilio-token-XYZ", "agg-secret-XYZ", "sendsms-pass-XYZ")


def adapters(provider_url: str = "http://127.0.0.1:9") -> dict[str, Any]:
    return {
        "kannel": {"type": "kannel", "path": "/k", "secret": SECRETS[0],
                   "sendsms_url": provider_url + "/cgi-bin/sendsms",
                   "sendsms_username": "gw", "sendsms_password": SECRETS[3],
                   "public_url": "https://gw.example"},
        "twilio": {"type": "twilio", "path": "/t", "account_sid": "AC1", "auth_token": SECRETS[1],
                   "public_url": "https://gw.example", "api_base_url": provider_url},
        "agg": {"type": "sms-webhook", "path": "/g", "secret": SECRETS[2],
                "send": {"url": provider_url + "/send"}},
    }


def twilio_signature(url: str, form: dict[str, str]) -> str:
    data = url + "".join(k + v for k, v in sorted(form.items()))
    digest = hmac.new(SECRETS[1].encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


async def deliver(gw: Any, which: str, text: str = "你好", msg_id: str = "m1",
                  udh: bytes = b"") -> aiohttp.ClientResponse:
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as http:
        if which == "kannel":
            auth = base64.b64encode(f"kannel:{SECRETS[0]}".encode()).decode()
            query = (f"from={PHONE}&to=12345&id={msg_id}&coding=2&charset=UTF-16BE"
                     f"&text={quote_from_bytes(text.encode('utf-16-be'))}"
                     f"&udh={quote_from_bytes(udh)}")
            req = http.get(f"{base}/k?{query}", headers={"Authorization": f"Basic {auth}"})
        elif which == "twilio":
            form = {"MessageSid": "SM" + msg_id, "AccountSid": "AC1", "From": PHONE,
                    "To": "+14155550100", "Body": text}
            req = http.post(f"{base}/t", data=urlencode(form).encode(), headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "X-Twilio-Signature": twilio_signature("https://gw.example/t", form)})
        else:
            body = orjson.dumps({"from": PHONE, "text": text, "id": msg_id})
            req = http.post(f"{base}/g", data=body, headers={
                "Content-Type": "application/json",
                "X-Signature": hmac.new(SECRETS[2].encode(), body, hashlib.sha256).hexdigest()})
        async with req as resp:
            await resp.read()
            return resp


@pytest.mark.parametrize("which", ["kannel", "twilio", "agg"])
async def test_nothing_stored_answers_503(which: str, start_gateway: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "down"
    gw = await start_gateway(adapters=adapters(), data_dir=data_dir,
                             url=f"unix://{tmp_path}/no-redis.sock")
    break_spool(data_dir)
    resp = await deliver(gw, which)
    assert resp.status == 503
    assert int(resp.headers["Retry-After"]) > 0


async def test_a_part_is_acknowledged_from_disk_while_intake_is_down(
    start_gateway: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "down"
    gw = await start_gateway(adapters=adapters(), data_dir=data_dir,
                             url=f"unix://{tmp_path}/no-redis.sock")
    break_spool(data_dir)
    resp = await deliver(gw, "kannel", "第一部分", "p1", udh=bytes([5, 0, 3, 1, 2, 1]))
    assert resp.status == 200  # the part is durable on disk
    assert gw.adapters["kannel"].assembler.pending == 1
    resp = await deliver(gw, "kannel", "第二部分", "p2", udh=bytes([5, 0, 3, 1, 2, 2]))
    assert resp.status == 200  # hand-over refused: both parts kept for the sweeper
    assert gw.adapters["kannel"].assembler.pending == 2
    assert len(list((data_dir / "sms" / "kannel" / "parts").glob("*.part"))) == 2


async def test_logs_never_carry_numbers_or_secrets(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(FakeProvider(Answer(500, b"boom"))) as provider:
        gw = await start_gateway(adapters=adapters(provider.url))
        for which in ("kannel", "twilio", "agg"):
            assert (await deliver(gw, which, msg_id=f"log-{which}")).status == 200
        for contact in await gw.read_contacts():
            with pytest.raises(Exception):  # noqa: B017 (SendError, content checked below)
                await gw.adapters[contact.adapter].send(contact, Reply(contact.id, "收到"))
        resp = await deliver(gw, "kannel", msg_id="dup")
        assert resp.status == 200
    assert PHONE in "".join(c.sender.address for c in await gw.read_contacts())
    text = caplog.text
    assert "SMS from" in text or "reply" in text  # the adapters did log
    assert PHONE not in text
    for secret in SECRETS:
        assert secret not in text
