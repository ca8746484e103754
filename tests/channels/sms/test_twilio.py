"""Twilio: signed form webhooks as Twilio posts them; the Messages API on a local server."""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import pytest

from gateway.adapters import SendError
from gateway.channels.sms.twilio import signature
from gateway.records import Reply
from tests.channels.sms.fakes import Answer, FakeProvider, json_body, running

TOKEN = "twilio-auth-token-0123456789abcdef"
SID = "AC" + "1" * 32
PUBLIC = "https://gw.example.gov.cn"


def sign(url: str, form: list[tuple[str, str]], token: str = TOKEN) -> str:
    """Twilio's documented algorithm, written out independently of the adapter."""
    data = url + "".join(k + v for k, v in sorted(set(form)))
    return base64.b64encode(hmac.new(token.encode(), data.encode(), hashlib.sha1).digest()).decode()


def test_documented_vector() -> None:
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    form = [("CallSid", "CA1234567890ABCDE"), ("Caller", "+14158675309"), ("Digits", "1234"),
            ("From", "+14158675309"), ("To", "+18005551212")]
    assert signature(url, form, "12345") == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    assert sign(url, form, "12345") == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def message(body: str = "你好", **extra: str) -> list[tuple[str, str]]:
    """An inbound SMS webhook with the fields Twilio sends."""
    fields = {
        "ToCountry": "US", "ToState": "CA", "SmsMessageSid": "SM" + "a" * 32,
        "NumMedia": "0", "ToCity": "", "FromZip": "", "SmsSid": "SM" + "a" * 32,
        "FromState": "", "SmsStatus": "received", "FromCity": "", "Body": body,
        "FromCountry": "CN", "To": "+14155550100", "ToZip": "", "NumSegments": "1",
        "MessageSid": "SM" + "a" * 32, "AccountSid": SID, "From": "+8613800138000",
        "ApiVersion": "2010-04-01",
    }
    fields.update(extra)
    return [(k, v) for k, v in fields.items() if v is not None]


def adapter(**extra: Any) -> dict[str, Any]:
    return {"type": "twilio", "account_sid": SID, "auth_token": TOKEN, "public_url": PUBLIC,
            "path": "/sms/twilio", **extra}


@dataclass
class Case:
    label: str
    form: list[tuple[str, str]]
    status: int = 200
    text: str | None = None
    signed_url: str = PUBLIC + "/sms/twilio"
    signature: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None


CASES = [
    Case("Chinese text", message("您好，小区停水三天了"), text="您好，小区停水三天了"),
    Case("emoji", message("👍 thanks"), text="👍 thanks"),
    Case("empty body", message(""), text=""),
    Case("signed with the default port", message("hi"), text="hi",
         signed_url="https://gw.example.gov.cn:443/sms/twilio"),
    Case("missing MessageSid",
         [kv for kv in message() if kv[0] not in ("MessageSid", "SmsSid", "SmsMessageSid")],
         status=400),
    Case("missing From", [kv for kv in message() if kv[0] != "From"], status=400),
    Case("NumMedia without MediaUrl0", message(NumMedia="1"), status=400),
    Case("forged signature", message(), status=403, signature="bm90IGEgc2lnbmF0dXJl"),
    Case("signed for another URL", message(), status=403,
         signed_url="https://evil.example.com/sms/twilio"),
    Case("no signature", message(), status=401, signature=""),
    Case("another account", message(AccountSid="AC" + "2" * 32), status=403),
    Case("oversize body", message("x" * 70000), status=413),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_inbound(case: Case, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"twilio": adapter()})
    sig = sign(case.signed_url, case.form) if case.signature is None else case.signature
    headers = {"Content-Type": "application/x-www-form-urlencoded",
               "I-Twilio-Idempotency-Token": "x", **case.headers}
    if sig:
        headers["X-Twilio-Signature"] = sig
    url = f"http://127.0.0.1:{gw.http_port}/sms/twilio"
    async with aiohttp.ClientSession() as http, http.post(
        url, data=case.raw or urlencode(case.form).encode(), headers=headers
    ) as resp:
        assert resp.status == case.status, await resp.text()
        body = await resp.read()
        content_type = resp.headers.get("Content-Type", "")
    contacts = await gw.read_contacts()
    if case.status != 200:
        assert contacts == []
        return
    assert content_type.startswith("text/xml")
    assert b"<Response></Response>" in body
    (contact,) = contacts
    assert contact.text == case.text
    assert contact.sender.address == "+8613800138000"
    assert contact.recipient == "+14155550100"
    assert contact.external_id == "SM" + "a" * 32
    assert contact.meta["provider"] == "twilio"


async def post_signed(gw: Any, form: list[tuple[str, str]], path: str = "/sms/twilio",
                      query: str = "") -> tuple[int, bytes]:
    url = PUBLIC + path + (f"?{query}" if query else "")
    headers = {"X-Twilio-Signature": sign(url, form),
               "Content-Type": "application/x-www-form-urlencoded"}
    target = f"http://127.0.0.1:{gw.http_port}{path}" + (f"?{query}" if query else "")
    async with aiohttp.ClientSession() as http, http.post(
        target, data=urlencode(form).encode(), headers=headers
    ) as resp:
        return resp.status, await resp.read()


async def test_duplicate_webhook_gives_one_contact(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"twilio": adapter()})
    assert (await post_signed(gw, message("重复")))[0] == 200
    assert (await post_signed(gw, message("重复")))[0] == 200
    assert len(await gw.read_contacts()) == 1


async def test_ack_as_twiml_message(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"twilio": adapter(ack_text="已收到 <{ref}>")})
    status, body = await post_signed(gw, message())
    assert status == 200
    contact = (await gw.read_contacts())[0]
    ref = contact.id.replace("-", "")[-10:].upper()
    assert f"<Message>已收到 &lt;{ref}&gt;</Message>".encode() in body
    assert [e.contact_id for e in await gw.read_events() if e.type == "acknowledged"] == [
        contact.id
    ]


async def test_mms_media_fetched_into_the_store(start_gateway: Any) -> None:
    async with running(FakeProvider()) as api:
        media_path = f"/2010-04-01/Accounts/{SID}/Messages/MM{'b' * 32}/Media/ME{'c' * 32}"
        jpeg = b"\xff\xd8\xff\xe0" + b"photo of the pothole" * 100
        api.files[media_path] = (jpeg, "image/jpeg")
        gw = await start_gateway(adapters={"twilio": adapter(api_base_url=api.url)})
        form = message("路面坑洞", NumMedia="2", MediaUrl0=api.url + media_path,
                       MediaContentType0="image/jpeg",
                       MediaUrl1="https://elsewhere.example.com/x.jpg",
                       MediaContentType1="image/jpeg")
        status, _ = await post_signed(gw, form)
        assert status == 200
        (contact,) = await gw.read_contacts()
        (att,) = contact.attachments
        assert att.sha256 == hashlib.sha256(jpeg).hexdigest()
        assert att.size == len(jpeg) and att.content_type == "image/jpeg"
        assert gw.attachments.read(att.sha256) == jpeg
        assert contact.meta["media_errors"][0]["url"] == "https://elsewhere.example.com/x.jpg"
        fetch = next(c for c in api.calls if c.path == media_path)
        assert fetch.headers["Authorization"].startswith("Basic ")


# ---------------------------------------------------------------------------- outbound


async def inbound(gw: Any) -> Any:
    assert (await post_signed(gw, message()))[0] == 200
    return (await gw.read_contacts())[0]


async def test_send_and_status_callbacks(start_gateway: Any) -> None:
    created = json_body({"sid": "SM" + "d" * 32, "status": "queued", "num_segments": "1"})
    async with running(FakeProvider(Answer(201, created))) as api:
        gw = await start_gateway(adapters={"twilio": adapter(api_base_url=api.url)})
        contact = await inbound(gw)
        receipt = await gw.adapters["twilio"].send(contact, Reply(contact.id, "已处理", id="r7"))
        assert receipt.external_id == "SM" + "d" * 32
        (call,) = api.calls
        assert call.method == "POST"
        assert call.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
        credentials = base64.b64decode(call.headers["Authorization"][6:]).decode()
        user, _, password = credentials.partition(":")
        assert (user, password) == (SID, TOKEN)
        assert call.form["To"] == "+8613800138000"
        assert call.form["From"] == "+14155550100"
        assert call.form["Body"] == "已处理"
        callback = urlsplit(call.form["StatusCallback"])
        assert f"{callback.scheme}://{callback.netloc}" == PUBLIC
        assert dict(parse_qsl(callback.query)) == {"c": contact.id, "r": "r7"}

        base = [("MessageSid", "SM" + "d" * 32), ("AccountSid", SID),
                ("From", "+14155550100"), ("To", "+8613800138000"), ("ApiVersion", "2010-04-01")]
        for status in ("queued", "sent", "undelivered"):
            extra = [("ErrorCode", "30003")] if status == "undelivered" else []
            code, _ = await post_signed(gw, [*base, ("MessageStatus", status), *extra],
                                        path=callback.path, query=callback.query)
            assert code == 200
        forged = [*base, ("MessageStatus", "delivered")]
        url = f"http://127.0.0.1:{gw.http_port}{callback.path}?{callback.query}"
        async with aiohttp.ClientSession() as http, http.post(
            url, data=urlencode(forged).encode(),
            headers={"X-Twilio-Signature": sign(PUBLIC + "/other", forged),
                     "Content-Type": "application/x-www-form-urlencoded"},
        ) as resp:
            assert resp.status == 403
        final = [e for e in await gw.read_events() if e.type in ("delivered", "failed")]
        assert [(e.type, e.detail["error_code"]) for e in final] == [("failed", "30003")]


@pytest.mark.parametrize(
    ("answer", "retryable", "retry_after"),
    [
        (Answer(429, json_body({"code": 20429, "message": "Too Many Requests"}),
                {"Retry-After": "3"}), True, 3.0),
        (Answer(500, b"{}"), True, None),
        (Answer(503, b"{}"), True, None),
        (Answer(400, json_body({"code": 21211, "message": "Invalid 'To' Phone Number"})),
         False, None),
        (Answer(401, json_body({"code": 20003, "message": "Authenticate"})), False, None),
        (Answer(201, b"not json"), False, None),
        (Answer(hang=True), True, None),
    ],
    ids=["429", "500", "503", "400 invalid number", "401", "201 without sid", "timeout"],
)
async def test_send_errors(start_gateway: Any, answer: Answer, retryable: bool,
                           retry_after: float | None) -> None:
    async with running(FakeProvider(answer)) as api:
        gw = await start_gateway(adapters={"twilio": adapter(api_base_url=api.url,
                                                             send_timeout="1s")})
        contact = await inbound(gw)
        with pytest.raises(SendError) as err:
            await gw.adapters["twilio"].send(contact, Reply(contact.id, "ok"))
        assert err.value.retryable is retryable
        assert err.value.retry_after_s == retry_after
        assert TOKEN not in str(err.value)


async def test_media_that_never_comes_does_not_lose_the_message(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(hang=True))) as api:
        gw = await start_gateway(adapters={"twilio": adapter(api_base_url=api.url,
                                                             media_timeout="200ms")})
        form = message("照片", NumMedia="1", MediaUrl0=api.url + "/slow/Media/ME1",
                       MediaContentType0="image/png")
        status, _ = await post_signed(gw, form)
        assert status == 200
        (contact,) = await gw.read_contacts()
        assert contact.text == "照片"
        assert contact.attachments == ()
        assert contact.meta["media_errors"] == [
            {"url": api.url + "/slow/Media/ME1", "error": "TimeoutError"}
        ]
