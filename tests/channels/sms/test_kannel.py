"""Kannel: real HTTP requests in Kannel's own get-url/post-url formats into a running gateway."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_from_bytes, urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.adapters import SendError
from gateway.contact.clock import FixedClock
from gateway.records import Event, Reply
from gateway.testing import eventually
from tests.channels.sms.fakes import Answer, FakeProvider, running

SECRET = "kannel-s3cret"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"kannel:{SECRET}".encode()).decode()}
ADAPTER = {"type": "kannel", "path": "/sms/kannel", "secret": SECRET, "region": "CN"}


def enc(data: bytes) -> str:
    """URL-encode bytes the way Kannel's octstr_url_encode does (space as +)."""
    return quote_from_bytes(data, safe="").replace("%20", "+")


def get_url(text: bytes, *, sender: str = "+8613800138000", coding: int = 0,
            charset: str = "UTF-8", msg_id: str = "1b3c5d7e-0000-4000-8000-000000000001",
            udh: bytes = b"", to: str = "12345", ts: str = "1795594480") -> str:
    """The query Kannel's get-url pattern of docs/channels/sms.md produces."""
    return (
        f"from={enc(sender.encode())}&to={to}&text={enc(text)}&time={ts}&id={msg_id}"
        f"&coding={coding}&charset={charset}&udh={enc(udh)}&smsc=cmcc"
    )


@dataclass
class Case:
    label: str
    query: str
    method: str = "GET"
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    auth: dict[str, str] | None = None
    status: int = 200
    text: str | None = None
    sender: str = "+8613800138000"
    external_id: str = "1b3c5d7e-0000-4000-8000-000000000001"
    decoded_as: str | None = None
    origin_at: int | None = None


NOISE = "你好，楼下工地夜间施工噪音很大，请处理。"
CASES = [
    Case("UCS-2 Chinese, Kannel not recoding",
         get_url(NOISE.encode("utf-16-be"), coding=2, charset="UTF-16BE"),
         text=NOISE, decoded_as="utf-16-be"),
    Case("UCS-2 without a charset escape",
         get_url(NOISE.encode("utf-16-be"), coding=2, charset=""),
         text=NOISE, decoded_as="utf-16-be"),
    Case("UTF-8 Chinese after mo-recode",
         get_url(NOISE.encode("utf-8"), coding=0, charset="UTF-8"), text=NOISE,
         decoded_as="utf-8"),
    Case("GBK in 8-bit, regional fallback",
         get_url(NOISE.encode("gbk"), coding=1, charset="8-BIT"), text=NOISE,
         decoded_as="gb18030"),
    Case("charset declared by alt-charset (GBK)",
         get_url(NOISE.encode("gbk"), coding=0, charset="GBK"), text=NOISE, decoded_as="gbk"),
    Case("8-bit data is read by the region's charset, not as UTF-8 (CN: GB18030)",
         get_url("é".encode(), coding=1, charset="8-BIT"), text="茅", decoded_as="gb18030"),
    Case("8-bit bytes no regional charset takes fall back to ISO-8859-1",
         get_url(b"\x80abc", coding=1, charset="8-BIT"), text="\x80abc",
         decoded_as="iso8859-1"),
    Case("emoji as a UCS-2 surrogate pair",
         get_url("谢谢🙂".encode("utf-16-be"), coding=2, charset="UTF-16BE"), text="谢谢🙂"),
    Case("emoji in UTF-8", get_url("ok 👍".encode(), coding=0), text="ok 👍"),
    Case("empty text", get_url(b""), text=""),
    Case("GSM text with spaces as +", get_url(b"Street light out at No. 5"),
         text="Street light out at No. 5"),
    Case("national sender normalized to E.164",
         get_url(b"hi", sender="13800138000"), text="hi"),
    Case("post-url UCS-2 body",
         "id=1b3c5d7e-0000-4000-8000-000000000001", method="POST",
         body=NOISE.encode("utf-16-be"),
         headers={"Content-Type": 'text/plain; charset="UTF-16BE"',
                  "X-Kannel-From": "+8613800138000", "X-Kannel-To": "12345",
                  "X-Kannel-Coding": "2", "X-Kannel-SMSC": "cmcc"},
         text=NOISE),
    Case("post-url with X-Kannel-Time",
         "id=1b3c5d7e-0000-4000-8000-000000000001", method="POST", body=b"hello",
         headers={"Content-Type": 'text/plain; charset="UTF-8"', "X-Kannel-From": "13800138000",
                  "X-Kannel-To": "12345", "X-Kannel-Time": "2026-11-25 08:00:00"},
         text="hello", origin_at=1795593600_000000),
    Case("post-url 8-bit GBK body",
         "id=1b3c5d7e-0000-4000-8000-000000000001", method="POST", body=NOISE.encode("gbk"),
         headers={"Content-Type": "application/octet-stream", "X-Kannel-From": "13800138000",
                  "X-Kannel-To": "12345", "X-Kannel-Coding": "1"},
         text=NOISE, decoded_as="gb18030"),
    Case("shared secret as key= instead of Basic",
         get_url(b"hello") + f"&key={SECRET}", auth={}, text="hello"),
    Case("missing sender", get_url(b"x").replace("from=%2B8613800138000&", ""), status=400),
    Case("missing message id",
         get_url(b"x").replace("id=1b3c5d7e-0000-4000-8000-000000000001&", ""), status=400),
    Case("coding not a number", get_url(b"x").replace("coding=0", "coding=x"), status=400),
    Case("time not a number", get_url(b"x").replace("time=1795594480", "time=now"),
         status=400),
    Case("no credentials", get_url(b"x"), auth={}, status=401),
    Case("wrong password", get_url(b"x"),
         auth={"Authorization": "Basic " + base64.b64encode(b"kannel:guess").decode()},
         status=403),
    Case("wrong key", get_url(b"x") + "&key=guess", auth={}, status=403),
    Case("oversize body", "id=1", method="POST", body=b"x" * (64 * 1024 + 1),
         headers={"X-Kannel-From": "+8613800138000"}, status=413),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_inbound(case: Case, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"kannel": ADAPTER})
    url = f"http://127.0.0.1:{gw.http_port}/sms/kannel?{case.query}"
    headers = {**(AUTH if case.auth is None else case.auth), **case.headers}
    async with aiohttp.ClientSession() as http, http.request(
        case.method, url, data=case.body or None, headers=headers
    ) as resp:
        assert resp.status == case.status, await resp.text()
        body = await resp.read()
    contacts = await gw.read_contacts()
    if case.status != 200:
        assert contacts == []
        return
    assert body == b""  # Kannel would send any body to the handset
    assert len(contacts) == 1
    contact = contacts[0]
    assert contact.channel == "sms"
    assert contact.adapter == "kannel"
    assert contact.text == case.text
    assert contact.sender.address == case.sender
    assert contact.external_id == case.external_id
    assert contact.recipient == "12345"
    assert contact.deadline.kind == "response"
    if case.decoded_as:
        assert contact.meta["decoded_as"] == case.decoded_as
    if "time=" in case.query:
        assert contact.origin_at == 1795594480_000000
    elif case.origin_at is not None:
        assert contact.origin_at == case.origin_at


async def kannel_get(
    gw: Any, query: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Any]:
    url = f"http://127.0.0.1:{gw.http_port}/sms/kannel?{query}"
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers or AUTH) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_duplicate_request_gives_one_contact(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"kannel": ADAPTER})
    query = get_url(NOISE.encode("utf-16-be"), coding=2, charset="UTF-16BE")
    first = await kannel_get(gw, query)
    second = await kannel_get(gw, query)
    assert first[0] == second[0] == 200
    contacts = await gw.read_contacts()
    assert len(contacts) == 1


def udh(ref: int, total: int, seq: int) -> bytes:
    return bytes([5, 0, 3, ref, total, seq])


async def test_three_parts_out_of_order_with_duplicates(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"kannel": ADAPTER})
    # A surrogate pair and a CJK character straddle the part boundaries on purpose.
    text = "第一段内容🙂" + "第二段" * 5 + "🙂结尾"
    data = text.encode("utf-16-be")
    cuts = [0, 13, 29, len(data)]
    parts = [data[cuts[i]:cuts[i + 1]] for i in range(3)]
    order = [2, 0, 2, 1, 0]  # part 3, part 1, part 3 again (Kannel retry), part 2, part 1 again
    for n, i in enumerate(order):
        status, body, _ = await kannel_get(gw, get_url(
            parts[i], coding=2, charset="UTF-16BE", udh=udh(0x42, 3, i + 1),
            msg_id=f"00000000-0000-4000-8000-00000000000{i}",
        ))
        assert status == 200, n
        assert body == b""
        if n < 3:
            assert await gw.read_contacts() == []
    contacts = await gw.read_contacts()
    assert len(contacts) == 1
    assert contacts[0].text == text
    assert contacts[0].meta["incomplete"] is False
    assert contacts[0].meta["concat"]["parts"] == [1, 2, 3]
    assert await gw.adapters["kannel"].assembler.held() == 0


async def test_missing_part_times_out_as_incomplete(start_gateway: Any, tmp_path: Path) -> None:
    clock = FixedClock()
    gw = await start_gateway(adapters={"kannel": {**ADAPTER, "concat_timeout": "60s"}},
                             clock=clock)
    for seq, chunk in ((1, "前半部分，"), (3, "结尾。")):
        status, _, _ = await kannel_get(gw, get_url(
            chunk.encode("utf-16-be"), coding=2, charset="UTF-16BE", udh=udh(7, 3, seq),
            msg_id=f"00000000-0000-4000-8000-00000000010{seq}",
        ))
        assert status == 200
    adapter = gw.adapters["kannel"]
    assert await adapter.assembler.sweep() == 0
    assert await adapter.assembler.held() == 2
    clock.advance(61)
    assert await adapter.assembler.sweep() == 1
    contacts = await gw.read_contacts()
    assert len(contacts) == 1
    assert contacts[0].text == "前半部分，结尾。"
    assert contacts[0].meta["incomplete"] is True
    assert contacts[0].meta["concat"]["parts"] == [1, 3]
    assert contacts[0].received_at < clock.now_us()


async def test_parts_that_reach_two_instances_join(start_gateway: Any) -> None:
    """Behind a balancer, Kannel's parts of one long message reach different instances: they
    join into one contact, whichever instance gets the last part."""
    one = await start_gateway(adapters={"kannel": ADAPTER})
    two = await start_gateway(adapters={"kannel": ADAPTER})
    chunks = ["第一部分，", "第二部分，", "第三部分。"]
    for seq, (gw, chunk) in enumerate(zip((one, two, one), chunks, strict=True), start=1):
        status, _, _ = await kannel_get(gw, get_url(
            chunk.encode("utf-16-be"), coding=2, charset="UTF-16BE", udh=udh(0x51, 3, seq),
            msg_id=f"00000000-0000-4000-8000-00000000030{seq}",
        ))
        assert status == 200
    status, _, _ = await kannel_get(two, get_url(  # Kannel retries part 1 at the other one
        chunks[0].encode("utf-16-be"), coding=2, charset="UTF-16BE", udh=udh(0x51, 3, 1),
        msg_id="00000000-0000-4000-8000-000000000301",
    ))
    assert status == 200
    contacts = await one.read_contacts()
    assert [(c.text, c.meta["incomplete"]) for c in contacts] == [("".join(chunks), False)]
    assert await one.adapters["kannel"].assembler.held() == 0
    assert await one.adapters["kannel"].assembler.sweep() == 0


async def test_acknowledged_parts_survive_a_restart(start_gateway: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "keep"
    gw = await start_gateway(adapters={"kannel": ADAPTER}, data_dir=data_dir)
    status, _, _ = await kannel_get(gw, get_url(
        "第一部分".encode("utf-16-be"), coding=2, charset="UTF-16BE", udh=udh(9, 2, 1),
        msg_id="00000000-0000-4000-8000-000000000201",
    ))
    assert status == 200
    await gw.stop()
    gw2 = await start_gateway(adapters={"kannel": ADAPTER}, data_dir=data_dir)
    assert await gw2.adapters["kannel"].assembler.held() == 1
    status, _, _ = await kannel_get(gw2, get_url(
        "第二部分".encode("utf-16-be"), coding=2, charset="UTF-16BE", udh=udh(9, 2, 2),
        msg_id="00000000-0000-4000-8000-000000000202",
    ))
    assert status == 200
    contacts = await gw2.read_contacts()
    assert [c.text for c in contacts] == ["第一部分第二部分"]


async def test_auto_acknowledgement_in_chinese(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"kannel": {**ADAPTER, "ack_text": "已收到，编号{ref}"}})
    status, body, headers = await kannel_get(gw, get_url(b"help"))
    assert status == 200
    contact = (await gw.read_contacts())[0]
    assert headers["X-Kannel-Coding"] == "2"
    assert "charset=utf-8" in headers["Content-Type"]
    assert body.decode("utf-8") == f"已收到，编号{contact.id.replace('-', '')[-10:].upper()}"
    events = [e for e in await gw.read_events() if e.type == "acknowledged"]
    assert [e.contact_id for e in events] == [contact.id]


async def test_auto_acknowledgement_in_latin_is_gsm(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"kannel": {**ADAPTER, "ack_text": "Received, ref {ref}"}})
    status, body, headers = await kannel_get(gw, get_url(b"help"))
    assert status == 200
    assert headers["X-Kannel-Coding"] == "0"
    assert body.startswith(b"Received, ref ")


async def test_intake_unavailable_answers_503(start_gateway: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "down"
    gw = await start_gateway(adapters={"kannel": ADAPTER}, data_dir=data_dir,
                             url=f"unix://{tmp_path}/no-redis.sock")
    spool = data_dir / "spool"
    for child in spool.rglob("*"):
        if child.is_file():
            child.unlink()
    for child in sorted(spool.rglob("*"), reverse=True):
        child.rmdir()
    spool.rmdir()
    spool.write_bytes(b"not a folder")  # the spool cannot take anything now
    status, _, headers = await kannel_get(gw, get_url(b"hello"))
    assert status == 503
    assert int(headers["Retry-After"]) > 0


# ---------------------------------------------------------------------------- outbound


def outbound(provider: FakeProvider, **extra: Any) -> dict[str, Any]:
    return {
        **ADAPTER,
        "sendsms_url": provider.url + "/cgi-bin/sendsms",
        "sendsms_username": "gw",
        "sendsms_password": "sendpass",
        "public_url": "https://gw.example.gov.cn",
        "send_timeout": "1s",
        **extra,
    }


async def inbound_contact(gw: Any) -> Any:
    status, _, _ = await kannel_get(gw, get_url(NOISE.encode("utf-16-be"), coding=2,
                                                charset="UTF-16BE"))
    assert status == 200
    return (await gw.read_contacts())[0]


async def test_send_chinese_reply_as_ucs2_with_dlr(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(202, b"0: Accepted for delivery"))) as kannel:
        gw = await start_gateway(adapters={"kannel": outbound(kannel)})
        contact = await inbound_contact(gw)
        adapter = gw.adapters["kannel"]
        reply = Reply(contact.id, "您好，已转交城管部门处理。", id="r-1")
        receipt = await adapter.send(contact, reply)
        assert receipt.detail["encoding"] == "ucs2"
        (call,) = kannel.calls
        assert call.path == "/cgi-bin/sendsms"
        q = call.query
        assert (q["username"], q["password"]) == ("gw", "sendpass")
        assert (q["coding"], q["charset"]) == ("2", "UTF-8")
        assert q["text"] == "您好，已转交城管部门处理。"
        assert q["to"] == "+8613800138000"
        assert q["from"] == "12345"
        assert q["dlr-mask"] == "27"
        dlr = urlsplit(q["dlr-url"])
        assert dlr.netloc == "gw.example.gov.cn"
        params = dict(parse_qsl(dlr.query))
        assert params["c"] == contact.id and params["r"] == "r-1"
        assert params["status"] == "%d"

        # Kannel fills %d and calls the dlr-url back: 8 (SMSC ack) then 1 (delivered).
        base = f"http://127.0.0.1:{gw.http_port}{dlr.path}"
        async with aiohttp.ClientSession() as http:
            for code in (8, 1, 1):
                query = dlr.query.replace("%d", str(code)).replace("%A", "ok").replace("%T", "0")
                async with http.get(f"{base}?{query}") as resp:
                    assert resp.status == 200
            forged = dlr.query.replace(params["s"], "0" * 32).replace("%d", "2")
            async with http.get(f"{base}?{forged}") as resp:
                assert resp.status == 403
        await adapter.send(contact, Reply(contact.id, "第二条", id="r-2"))
        dlr2 = urlsplit(kannel.calls[1].query["dlr-url"])
        async with aiohttp.ClientSession() as http:
            query = dlr2.query.replace("%d", "16").replace("%A", "NACK/0x0000000b").replace(
                "%T", "0")
            async with http.get(f"{base}?{query}") as resp:
                assert resp.status == 200
        final = [e for e in await gw.read_events() if e.type in ("delivered", "failed")]
        assert [(e.type, e.detail["reply_id"]) for e in final] == [
            ("delivered", "r-1"), ("failed", "r-2")]
        assert final[1].detail["answer"] == "NACK/0x0000000b"


async def test_a_report_claimed_by_an_instance_that_died_writing_is_recorded_by_a_repeat(
    start_gateway: Any,
) -> None:
    """Instance one claims a delivery report and dies before its event is written; Kannel
    repeats the report to instance two, which found the claim and answered "recorded": the
    outcome was lost for good. The claim holds the event: two writes it, once, and a third
    repeat writes nothing more. One's write never ends (then it is cancelled, as the process
    dies); both instances on one Redis."""
    from gateway.channels.sms.common import DeliveryReports

    first = await start_gateway(adapters={"kannel": ADAPTER})
    second = await start_gateway(adapters={"kannel": ADAPTER})  # same Redis and adapter state
    contact = await inbound_contact(first)
    ctx = first.adapters["kannel"].ctx
    writing = asyncio.Event()

    class DiesWriting:
        """One's event sink: the claim is made, the event's write never comes back."""

        async def emit(self, event: Event) -> None:
            writing.set()
            await asyncio.Event().wait()

        async def stamp(self, *args: Any, **kwargs: Any) -> Event | None:
            return await ctx.events.stamp(*args, **kwargs)

    one = DeliveryReports(dataclasses.replace(ctx, events=DiesWriting()))
    detail = {"answer": "NACK/0x0000000b"}
    dying = asyncio.create_task(one.record(contact.id, "r-1", "failed", detail))
    await writing.wait()
    dying.cancel()
    two = second.adapters["kannel"].reports
    assert await two.record(contact.id, "r-1", "failed", detail)
    assert await two.record(contact.id, "r-1", "failed", detail)

    failed = [e for e in await first.read_events() if e.type == "failed"]
    assert [(e.contact_id, e.detail) for e in failed] == [
        (contact.id, {"reply_id": "r-1", **detail})
    ]


async def test_send_latin_reply_as_gsm(start_gateway: Any) -> None:
    async with running(FakeProvider(Answer(202, b"0: Accepted for delivery"))) as kannel:
        gw = await start_gateway(adapters={"kannel": outbound(kannel, number_format="digits")})
        contact = await inbound_contact(gw)
        await gw.adapters["kannel"].send(contact, Reply(contact.id, "We’re on it – ref 12 {ok}"))
        q = kannel.calls[0].query
        assert q["coding"] == "0"
        assert q["text"] == "We're on it - ref 12 {ok}"
        assert q["to"] == "8613800138000"


@pytest.mark.parametrize(
    ("answer", "retryable", "retry_after"),
    [
        (Answer(503, b"Temporal failure, try again later."), True, None),
        (Answer(500, b"internal"), True, None),
        (Answer(429, b"slow down", {"Retry-After": "7"}), True, 7.0),
        (Answer(403, b"Authorization failed for sendsms"), False, None),
        (Answer(400, b"Missing receiver number"), False, None),
        (Answer(hang=True), True, None),
    ],
    ids=["503", "500", "429 Retry-After", "403 permanent", "400 permanent", "timeout"],
)
async def test_send_errors(start_gateway: Any, answer: Answer, retryable: bool,
                           retry_after: float | None) -> None:
    async with running(FakeProvider(answer)) as kannel:
        gw = await start_gateway(adapters={"kannel": outbound(kannel)})
        contact = await inbound_contact(gw)
        with pytest.raises(SendError) as err:
            await gw.adapters["kannel"].send(contact, Reply(contact.id, "ok"))
        assert err.value.retryable is retryable
        assert err.value.retry_after_s == retry_after
        assert "sendpass" not in str(err.value)


async def test_reply_stream_end_to_end_with_retry(start_gateway: Any, redis_client: Any,
                                                  prefix: str) -> None:
    async with running(FakeProvider(Answer(202, b"0: Accepted for delivery"))) as kannel:
        kannel.answers = [Answer(500, b"oops")]
        gw = await start_gateway(adapters={"kannel": outbound(kannel)},
                                 replies={"backoff": "10ms"})
        contact = await inbound_contact(gw)
        await redis_client.xadd(f"{{{prefix}}}:replies", {
            "reply": orjson.dumps({"contact_id": contact.id, "text": "收到", "id": "rep-9"})
        })
        async def responded_events() -> list[Any]:
            return [e for e in await gw.read_events() if e.type == "responded"]

        responded = await eventually(responded_events)
        assert len(responded) == 1 and responded[0].contact_id == contact.id
        assert len(kannel.calls) == 2
        assert kannel.calls[1].query["text"] == "收到"


async def test_delivered_never_comes_before_responded(
    start_gateway: Any, redis_client: Any, prefix: str
) -> None:
    """Kannel may call the dlr-url before its sendsms answer reaches the gateway (a fast SMSC):
    this one calls it, and waits for the gateway's answer, before answering sendsms. The
    events stream said ``delivered`` before ``responded``; ``responded`` comes first now."""
    gateway: list[Any] = []
    dlr_answers: list[int] = []

    async def sendsms(request: web.Request) -> web.Response:
        dlr = urlsplit(request.query["dlr-url"])
        query = dlr.query.replace("%d", "1").replace("%A", "ok").replace("%T", "0")
        url = f"http://127.0.0.1:{gateway[0].http_port}{dlr.path}?{query}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            dlr_answers.append(resp.status)
        return web.Response(status=202, text="0: Accepted for delivery")

    app = web.Application()
    app.router.add_get("/cgi-bin/sendsms", sendsms)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        fake = FakeProvider()
        fake.url = f"http://127.0.0.1:{port}"
        gateway.append(await start_gateway(adapters={"kannel": outbound(fake)}))
        gw = gateway[0]
        contact = await inbound_contact(gw)
        for n in range(2):  # the first reply settles the deadline, the second only delivers
            await redis_client.xadd(f"{{{prefix}}}:replies", {
                "reply": orjson.dumps({"contact_id": contact.id, "text": f"收到 {n}",
                                       "id": f"rep-{n}"})
            })
            async def settled(n: int = n) -> bool:
                types = [e.type for e in await gw.read_events()]
                return types.count("delivered") == n + 1 and "responded" in types

            await eventually(settled)
        events = [e for e in await gw.read_events() if e.type in ("responded", "delivered")]
        assert [(e.type, e.detail["reply_id"]) for e in events] == [
            ("responded", "rep-0"),
            ("delivered", "rep-0"),
            ("delivered", "rep-1"),
        ]
        assert dlr_answers == [200, 200]
    finally:
        await runner.cleanup()


async def test_timed_out_long_message_is_acknowledged_by_sendsms(start_gateway: Any) -> None:
    clock = FixedClock()
    async with running(FakeProvider(Answer(202, b"0: Accepted for delivery"))) as kannel:
        gw = await start_gateway(clock=clock, adapters={"kannel": outbound(
            kannel, ack_text="已收到，编号{ref}", concat_timeout="30s")})
        status, body, _ = await kannel_get(gw, get_url(
            "只有第一部分".encode("utf-16-be"), coding=2, charset="UTF-16BE",
            udh=udh(3, 2, 1), msg_id="00000000-0000-4000-8000-000000000301"))
        assert (status, body) == (200, b"")  # no ack for a part: the message is not there yet
        clock.advance(31)
        assert await gw.adapters["kannel"].assembler.sweep() == 1
        (contact,) = await gw.read_contacts()
        async def acknowledged() -> list[Any]:
            return [e for e in await gw.read_events() if e.type == "acknowledged"]

        acks = await eventually(acknowledged)
        assert [(e.contact_id, e.detail["via"]) for e in acks] == [(contact.id, "sendsms")]
        (call,) = kannel.calls
        assert call.query["text"].startswith("已收到，编号")
        assert call.query["coding"] == "2"


def test_delivery_reference_key_without_secrets_is_random_and_kept(tmp_path) -> None:
    from gateway.channels.sms import common

    first = common.local_key(tmp_path / "sms" / "k")
    again = common.local_key(tmp_path / "sms" / "k")
    other = common.local_key(tmp_path / "sms" / "other")
    assert first == again and len(first) == 64 and first != other
    assert oct((tmp_path / "sms" / "k" / "signing.key").stat().st_mode & 0o777) == "0o600"


def test_the_reference_key_is_never_read_empty_or_different_by_workers_of_one_folder(
    tmp_path,
) -> None:
    """The file was created (O_EXCL), then written: a worker reading it in between got the
    key "" (references signed with an empty key accepted), one that lost the race raised
    FileExistsError. An empty file (what that window leaves after a crash) is replaced."""
    from concurrent.futures import ThreadPoolExecutor

    from gateway.channels.sms import common

    folder = tmp_path / "sms" / "k"
    folder.mkdir(parents=True)
    (folder / "signing.key").write_text("")
    key = common.local_key(folder)
    assert len(key) == 64 and common.local_key(folder) == key
    with ThreadPoolExecutor(8) as pool:  # eight workers making the key of a fresh folder
        keys = set(pool.map(lambda _: common.local_key(tmp_path / "sms" / "new"), range(64)))
    assert len(keys) == 1 and len(keys.pop()) == 64
    assert sorted(p.name for p in (tmp_path / "sms" / "new").iterdir()) == ["signing.key"]


@pytest.mark.parametrize("configured_secret", [True, False])
async def test_a_repeated_delivery_report_at_another_instance_is_recorded_once(
    start_gateway: Any, configured_secret: bool
) -> None:
    """Kannel repeats a dlr-url callback, and behind a balancer the repeat may reach another
    instance: the fleet records one ``delivered`` event. Without any secret configured the
    reference is signed with the fleet's shared random key, so every instance can check it."""
    async with running(FakeProvider(Answer(202, b"0: Accepted for delivery"))) as kannel:
        table = outbound(kannel)
        if not configured_secret:
            del table["secret"], table["sendsms_password"]
            table["allow_from"] = ["127.0.0.1"]
        one = await start_gateway(adapters={"kannel": table})
        two = await start_gateway(adapters={"kannel": table})
        contact = await inbound_contact(one)
        await one.adapters["kannel"].send(contact, Reply(contact.id, "您好", id="r-9"))
        dlr = urlsplit(kannel.calls[0].query["dlr-url"])
        query = dlr.query.replace("%d", "1").replace("%A", "ok").replace("%T", "0")
        async with aiohttp.ClientSession() as http:
            for gw in (one, two, one):
                url = f"http://127.0.0.1:{gw.http_port}{dlr.path}?{query}"
                async with http.get(url) as resp:
                    assert resp.status == 200
        delivered = [e for e in await one.read_events() if e.type == "delivered"]
        assert [e.detail["reply_id"] for e in delivered] == ["r-9"]


async def test_a_sender_over_its_rate_is_answered_429_in_kannels_format(
    start_gateway: Any,
) -> None:
    # The HTTP adapters share one submit path (gateway/channels/common.py): a sender over its
    # rate gets 429 + Retry-After in the adapter's own format. Kannel's answered this through
    # the core's error middleware, as an application/problem+json document.
    gw = await start_gateway(adapters={"kannel": ADAPTER},
                             limits={"sender_contacts": 1, "sender_window": "1h"})
    answers = []
    async with aiohttp.ClientSession() as http:
        for n in (1, 2):
            query = get_url(b"street light", msg_id=f"1b3c5d7e-0000-4000-8000-00000000000{n}")
            async with http.get(f"http://127.0.0.1:{gw.http_port}/sms/kannel?{query}",
                                headers=AUTH) as resp:
                answers.append((resp.status, resp.content_type, resp.headers.get("Retry-After"),
                                await resp.text()))
    assert answers[0][0] == 200
    status, content_type, retry_after, text = answers[1]
    assert status == 429 and int(retry_after or 0) >= 1
    assert content_type == "text/plain" and "slow down" in text
    assert len(await gw.read_contacts()) == 1
