"""The adapter kit (gateway.testing) over the built-in HTTP webhook adapters. The example LINE
adapter (examples/line, its own distribution) runs the kit in its own tests (make test)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any
from urllib.parse import quote, urlencode

import orjson
import pytest

from gateway.testing import (
    ALL_CHECKS,
    KitCase,
    Request,
    WebhookCase,
    WebhookKit,
    run_case,
    run_kit_case,
)
from gateway.testing.contract import ProviderAnswer
from tests.channels.chat import payloads as wx

PHONE = "13800138000"
SMS_SECRET = "kit-agg-secret-51c2"
KANNEL_SECRET = "kit-kannel-pass-7d1e"
SENDSMS_SECRET = "kit-sendsms-pass-0b9a"
TWILIO_TOKEN = "kit-twilio-token-3e8f"
APP_KEY = "kit-app-key-9f3c2a"


def _sms_webhook(message_id: str, text: str) -> Request:
    body = orjson.dumps({"from": PHONE, "text": text, "id": message_id})
    signature = hmac.new(SMS_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return Request("/kit/sms", body, {"Content-Type": "application/json",
                                      "X-Signature": signature})


SMS_WEBHOOK = WebhookKit(
    type="sms-webhook",
    table={"path": "/kit/sms", "secret": SMS_SECRET},
    inbound=_sms_webhook,
    bad=[
        Request("/kit/sms", b'{"from": "1", "text": "x", "id": "1"}',
                {"Content-Type": "application/json", "X-Signature": "0" * 64}),
        Request("/kit/sms", b"{", {"Content-Type": "application/json",
                                   "X-Signature": hmac.new(SMS_SECRET.encode(), b"{",
                                                           hashlib.sha256).hexdigest()}),
        Request("/kit/sms", b"{}", {"Content-Type": "application/json"}),
    ],
    secrets=[SMS_SECRET],
    phone=PHONE,
    reply_config=lambda url: {"send": {"url": url + "/send"}},
)


def _twilio_signature(url: str, form: dict[str, str]) -> str:
    data = url + "".join(k + v for k, v in sorted(form.items()))
    return base64.b64encode(hmac.new(TWILIO_TOKEN.encode(), data.encode(), hashlib.sha1)
                            .digest()).decode()


def _twilio_form(message_id: str, text: str) -> dict[str, str]:
    return {"MessageSid": "SM" + hashlib.sha256(message_id.encode()).hexdigest()[:32],
            "AccountSid": "ACkit", "From": "+86" + PHONE, "To": "+14155550100", "Body": text}


def _twilio(message_id: str, text: str) -> Request:
    form = _twilio_form(message_id, text)
    return Request("/kit/twilio", urlencode(form).encode(), {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Twilio-Signature": _twilio_signature("https://gw.example/kit/twilio", form)})


TWILIO = WebhookKit(
    type="twilio",
    table={"path": "/kit/twilio", "account_sid": "ACkit", "auth_token": TWILIO_TOKEN,
           "public_url": "https://gw.example"},
    inbound=_twilio,
    bad=[
        Request("/kit/twilio", urlencode(_twilio_form("f", "x")).encode(),
                {"Content-Type": "application/x-www-form-urlencoded",
                 "X-Twilio-Signature": "AAAA"}),
        Request("/kit/twilio", urlencode(_twilio_form("n", "x")).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}),
    ],
    secrets=[TWILIO_TOKEN],
    phone=PHONE,
    reply_config=lambda url: {"api_base_url": url},
    reply_answer=ProviderAnswer(201, orjson.dumps({"sid": "SM" + "d" * 32, "status": "queued",
                                                   "num_segments": "1"})),
)

_KANNEL_AUTH = "Basic " + base64.b64encode(f"kannel:{KANNEL_SECRET}".encode()).decode()


def _kannel(message_id: str, text: str) -> Request:
    query = f"from={PHONE}&to=12345&id={quote(message_id)}&charset=UTF-8&text={quote(text)}"
    return Request(f"/kit/kannel?{query}", method="GET",
                   headers={"Authorization": _KANNEL_AUTH})


KANNEL = WebhookKit(
    type="kannel",
    table={"path": "/kit/kannel", "secret": KANNEL_SECRET, "public_url": "https://gw.example",
           "sendsms_username": "gw", "sendsms_password": SENDSMS_SECRET},
    inbound=_kannel,
    bad=[
        Request(f"/kit/kannel?from={PHONE}&id=1&text=x", method="GET",
                headers={"Authorization": "Basic " + base64.b64encode(b"kannel:guess").decode()}),
        Request(f"/kit/kannel?from={PHONE}&id=1&text=x", method="GET"),
        Request("/kit/kannel?id=1&text=x", method="GET", headers={"Authorization": _KANNEL_AUTH}),
    ],
    secrets=[KANNEL_SECRET, SENDSMS_SECRET],
    phone=PHONE,
    reply_config=lambda url: {"sendsms_url": url + "/cgi-bin/sendsms"},
    reply_answer=ProviderAnswer(202, b"0: Accepted for delivery", "text/plain"),
)


def _app(message_id: str, text: str) -> Request:
    body = orjson.dumps({"text": text, "external_id": message_id,
                         "sender": {"address": "+86" + PHONE}})
    return Request("/v1/apps/ios/contacts", body, {"Content-Type": "application/json",
                                                   "Authorization": f"Bearer {APP_KEY}"})


APP = WebhookKit(
    type="app",
    table={"apps": {"ios": {"key": APP_KEY}}},
    inbound=_app,
    bad=[
        Request("/v1/apps/ios/contacts", b'{"text": "x"}',
                {"Content-Type": "application/json", "Authorization": "Bearer guess"}),
        Request("/v1/apps/ios/contacts", b"[", {"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {APP_KEY}"}),
    ],
    secrets=[APP_KEY],
    phone=PHONE,
)


OPEN311_KEY = "kit-311-key-4e6d"


def _open311(message_id: str, text: str, key: str = OPEN311_KEY) -> Request:
    form = {"api_key": key, "service_code": "001", "description": text,
            "lat": "31.2304", "long": "121.4737", "phone": "+86" + PHONE}
    return Request("/open311/v2/requests.json", urlencode(form).encode(),
                   {"Content-Type": "application/x-www-form-urlencoded",
                    "Idempotency-Key": message_id})


OPEN311 = WebhookKit(
    type="open311",
    table={"services": {"001": {"name": "Streetlight out"}},
           "api_keys": [{"key": OPEN311_KEY, "name": "311-app"}]},
    inbound=_open311,
    bad=[
        _open311("k1", "x", key="guess"),
        Request("/open311/v2/requests.json", b"service_code=999&description=x&lat=1&long=2",
                {"Content-Type": "application/x-www-form-urlencoded"}),
        Request("/open311/v2/requests.json", urlencode({"api_key": OPEN311_KEY,
                                                         "service_code": "001"}).encode(),
                {"Content-Type": "application/x-www-form-urlencoded"}),
    ],
    secrets=[OPEN311_KEY],
    phone=PHONE,
)


def _wechat(message_id: str, text: str, token: str = wx.TOKEN) -> Request:
    """A plain-mode push as WeChat makes it: a fresh signed query each try, the same MsgId."""
    now = int(time.time())
    msg_id = int(hashlib.sha256(message_id.encode()).hexdigest()[:15], 16)
    return Request(f"/chat/wechat/kit?{wx.wechat_query(now, token=token)}",
                   wx.text(text, create_time=now, msg_id=msg_id), {"Content-Type": "text/xml"})


WECHAT = WebhookKit(
    type="wechat",
    table={"app_id": wx.APP_ID, "token": wx.TOKEN},
    inbound=_wechat,
    bad=[
        lambda: _wechat("w1", "x", token="forged"),
        lambda: Request(f"/chat/wechat/kit?{wx.wechat_query(int(time.time()))}", b"<xml><Msg",
                        {"Content-Type": "text/xml"}),
        Request("/chat/wechat/kit", wx.text("x", create_time=1, msg_id=1),
                {"Content-Type": "text/xml"}),
    ],
    secrets=[wx.TOKEN],
)


def _weibo(message_id: str, text: str, secret: str = wx.APP_SECRET) -> Request:
    """A fan service push as Weibo makes it: a fresh signed query each try, the same body."""
    query = wx.weibo_query(int(time.time()), secret=secret)
    return Request(f"/chat/weibo/kit?{query}", wx.weibo_push("text", text),
                   {"Content-Type": "application/json"})


WEIBO = WebhookKit(
    type="weibo",
    table={"app_secret": wx.APP_SECRET},
    inbound=_weibo,
    bad=[
        lambda: _weibo("b1", "x", secret="forged"),
        lambda: Request(f"/chat/weibo/kit?{wx.weibo_query(int(time.time()))}", b"{",
                        {"Content-Type": "application/json"}),
        Request("/chat/weibo/kit", wx.weibo_push("text", "x"),
                {"Content-Type": "application/json"}),
    ],
    secrets=[wx.APP_SECRET],
)


KITS = {"sms-webhook": SMS_WEBHOOK, "twilio": TWILIO, "kannel": KANNEL, "app": APP,
        "open311": OPEN311, "wechat": WECHAT, "weibo": WEIBO}
RUNS = [(kit, check) for kit in sorted(KITS) for check in sorted(ALL_CHECKS)
        if check != "replies_stamped" or KITS[kit].reply_config is not None]


@pytest.mark.parametrize(("kit", "check"), RUNS, ids=[f"{k}-{c}" for k, c in RUNS])
async def test_kit(kit: str, check: str, start_gateway: Any, own_redis: Any) -> None:
    await ALL_CHECKS[check](start_gateway, KITS[kit], own_redis)


SMS_CASES = [
    WebhookCase("signed JSON", _sms_webhook("c1", "路灯坏了"), 200,
                contact={"text": "路灯坏了", "sender.address": "+86" + PHONE,
                         "channel": "sms", "meta.provider": "sms-webhook"},
                events=["enqueued"]),
    WebhookCase("forged", SMS_WEBHOOK.bad[0], 403),
    WebhookCase("malformed", SMS_WEBHOOK.bad[1], 400),
    WebhookCase("unsigned", SMS_WEBHOOK.bad[2], 401),
]
TWILIO_CASES = [
    WebhookCase("signed form", _twilio("c1", "水管爆了"), 200,
                contact={"text": "水管爆了", "sender.address": "+86" + PHONE, "channel": "sms"},
                events=["enqueued"]),
    WebhookCase("forged", TWILIO.bad[0], 403),
]
CASES = [(SMS_WEBHOOK, c) for c in SMS_CASES] + [(TWILIO, c) for c in TWILIO_CASES]


@pytest.mark.parametrize(("kit", "case"), CASES, ids=[f"{k.type}-{c.label}" for k, c in CASES])
async def test_webhook_table(kit: WebhookKit, case: WebhookCase, start_gateway: Any) -> None:
    gw = await start_gateway(adapters=kit.adapters())
    await run_case(gw, case)


CHANNEL_OF = {"kannel": "sms", "app": "web", "open311": "web", "wechat": "chat", "weibo": "chat"}
TABLE = [(name, n) for name in sorted(CHANNEL_OF) for n in range(len(KITS[name].bad) + 1)]


@pytest.mark.parametrize(("kit", "n"), TABLE, ids=[f"{k}-{n}" for k, n in TABLE])
async def test_handler_table(kit: str, n: int, start_gateway: Any) -> None:
    """Each HTTP kit's valid request (one contact, its channel and text) and each of its bad
    requests (refused, nothing stored), through the table runner for any kit."""
    webhook = KITS[kit]
    if n == 0:
        case = KitCase("valid", lambda gw: webhook.deliver(gw, "t1", "井盖丢了"), "ok",
                       contact={"channel": CHANNEL_OF[kit], "text": "井盖丢了", "adapter": "kit"},
                       events=["enqueued"])
    else:
        case = KitCase(f"bad {n}", lambda gw: webhook.deliver_request(gw, webhook.bad[n - 1]),
                       "refused")
    await run_kit_case(await start_gateway(adapters=webhook.adapters()), case)
