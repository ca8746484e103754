"""WeChat Official Account end to end: real gateway, real Redis, real HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.adapters import SendError
from gateway.channels.chat.officialaccount import parse_xml
from gateway.contact.clock import FixedClock
from gateway.records import Reply
from gateway.server.config import ConfigError
from tests.channels.chat import payloads as p
from tests.channels.chat.fakes import FakeWeChatApi
from tests.harness import answer_before_body

NOW_S = 1_795_594_483
FIXTURES = Path(__file__).parent / "fixtures"
SECRET = "wechat-app-secret"


@pytest.fixture
async def wechat_api() -> AsyncIterator[FakeWeChatApi]:
    api = FakeWeChatApi(p.APP_ID, SECRET)
    await api.start()
    yield api
    await api.stop()


async def _gateway(start_gateway: Any, api: FakeWeChatApi | None = None, **extra: Any) -> Any:
    table: dict[str, Any] = {"type": "wechat", "app_id": p.APP_ID, "token": p.TOKEN, **extra}
    if api is not None:
        table.update(app_secret=SECRET, api_base=api.base)
    return await start_gateway(adapters={"wx": table}, clock=FixedClock(NOW_S * 1_000_000))


async def _post(gw: Any, query: str, body: bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{gw.http_port}/chat/wechat/wx?{query}",
            data=body,
            headers={"Content-Type": "text/xml"},
        ) as resp:
            return resp.status, await resp.text()


async def test_url_verification_echoes_echostr_only_when_signed(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    url = f"http://127.0.0.1:{gw.http_port}/chat/wechat/wx"
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{url}?{p.wechat_query(NOW_S, echostr='4375120948345356249')}"
        ) as resp:
            assert (resp.status, await resp.text()) == (200, "4375120948345356249")
        async with http.get(f"{url}?{p.wechat_query(NOW_S, token='forged', echostr='x')}") as resp:
            assert resp.status == 403
            assert "x" not in await resp.text()


async def test_text_push_becomes_a_chat_contact(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    status, body = await _post(
        gw,
        p.wechat_query(NOW_S),
        p.text("小区路灯坏了三天了", create_time=NOW_S - 1, msg_id=6054768590064713728),
    )
    assert (status, body) == (200, "success")
    [contact] = await gw.read_contacts()
    assert contact.channel == "chat"
    assert contact.adapter == "wx"
    assert contact.external_id == "6054768590064713728"
    assert contact.sender.address == f"wechat:{p.OPENID}"
    assert contact.recipient == p.ACCOUNT
    assert contact.text == "小区路灯坏了三天了"
    assert contact.language == "zh"
    assert contact.thread == f"wechat:{p.OPENID}"
    assert contact.received_at == NOW_S * 1_000_000
    assert contact.origin_at == (NOW_S - 1) * 1_000_000
    assert contact.deadline.kind == "response"
    assert contact.deadline.due_at == contact.received_at + 180 * 1_000_000


async def test_wechat_retries_with_the_same_msgid_make_one_contact(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    body = p.text("重复", create_time=NOW_S, msg_id=42)
    for _ in range(4):  # the first try and WeChat's three retries
        assert await _post(gw, p.wechat_query(NOW_S), body) == (200, "success")
    assert [c.external_id for c in await gw.read_contacts()] == ["42"]


async def test_subscribe_and_unsubscribe_events_dedupe_on_sender_and_time(
    start_gateway: Any,
) -> None:
    gw = await _gateway(start_gateway)
    for _ in range(2):
        assert (
            await _post(gw, p.wechat_query(NOW_S), p.event("subscribe", create_time=NOW_S - 10))
        )[0] == 200
    assert (await _post(gw, p.wechat_query(NOW_S), p.event("unsubscribe", create_time=NOW_S - 5)))[
        0
    ] == 200
    assert (
        await _post(
            gw, p.wechat_query(NOW_S), p.event("CLICK", create_time=NOW_S - 4, key="MENU_1")
        )
    )[0] == 200
    contacts = await gw.read_contacts()
    assert [(c.meta["event"], c.external_id) for c in contacts] == [
        ("subscribe", f"{p.OPENID}:{NOW_S - 10}"),
        ("unsubscribe", f"{p.OPENID}:{NOW_S - 5}"),
    ]


async def test_all_message_types(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    kinds = {
        "image": {"PicUrl": "http://mmbiz.qpic.cn/x.jpg", "MediaId": "media1"},
        "voice": {"MediaId": "media2", "Format": "amr"},
        "video": {"MediaId": "media3", "ThumbMediaId": "thumb3"},
        "location": {
            "Location_X": "23.134521",
            "Location_Y": "113.358803",
            "Scale": "20",
            "Label": "广州市海珠区",
        },
        "link": {"Title": "标题", "Description": "描述", "Url": "https://example.org/a"},
    }
    for i, (kind, fields) in enumerate(kinds.items()):
        assert (
            await _post(
                gw,
                p.wechat_query(NOW_S),
                p.wechat_xml(kind, fields, create_time=NOW_S, msg_id=100 + i),
            )
        )[0] == 200
    contacts = {c.meta["type"]: c for c in await gw.read_contacts()}
    assert set(contacts) == set(kinds)
    assert contacts["location"].meta["location"]["lat"] == 23.134521
    assert contacts["image"].meta["media_id"] == "media1"
    assert contacts["link"].text.endswith("https://example.org/a")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("forged", 403),
        ("replay", 403),
        ("no-signature", 403),
        ("malformed", 400),
        ("billion-laughs", 400),
        ("external-entity", 400),
        ("oversize", 413),
    ],
)
async def test_hostile_pushes_are_refused_and_nothing_is_enqueued(
    start_gateway: Any, case: str, expected: int
) -> None:
    gw = await _gateway(start_gateway)
    good = p.text("hi", create_time=NOW_S, msg_id=1)
    query, body = {
        "forged": (p.wechat_query(NOW_S, token="not-the-token"), good),
        "replay": (p.wechat_query(NOW_S - 3600), good),
        "no-signature": (f"timestamp={NOW_S}&nonce=1", good),
        "malformed": (p.wechat_query(NOW_S), b"<xml><Content>unclosed"),
        "billion-laughs": (p.wechat_query(NOW_S), (FIXTURES / "billion_laughs.xml").read_bytes()),
        "external-entity": (p.wechat_query(NOW_S), (FIXTURES / "external_entity.xml").read_bytes()),
        "oversize": (p.wechat_query(NOW_S), b"<xml>" + b"x" * (70 * 1024) + b"</xml>"),
    }[case]
    status, _ = await _post(gw, query, body)
    assert status == expected
    assert await gw.read_contacts() == []


async def test_unknown_type_is_answered_and_logged_not_enqueued(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await _gateway(start_gateway)
    with caplog.at_level(logging.INFO):
        status, body = await _post(
            gw,
            p.wechat_query(NOW_S),
            p.wechat_xml("miniprogrampage", {"Title": "t"}, create_time=NOW_S, msg_id=5),
        )
    assert (status, body) == (200, "success")
    assert "miniprogrampage" in caplog.text
    assert await gw.read_contacts() == []


async def test_safe_mode_push_and_encrypted_passive_ack(start_gateway: Any) -> None:
    gw = await _gateway(
        start_gateway,
        mode="safe",
        encoding_aes_key=p.AES_KEY,
        auto_ack="已收到，我们会在3分钟内回复。",
    )
    query, body = p.safe_push(
        p.text("水管爆了", create_time=NOW_S, msg_id=777), NOW_S, nonce="n0nce"
    )
    status, text = await _post(gw, query, body)
    assert status == 200
    outer = parse_xml(text.encode())
    assert outer["MsgSignature"] == p.sign(p.TOKEN, str(NOW_S), "n0nce", outer["Encrypt"])
    inner, app_id = p.aes_decrypt(outer["Encrypt"])
    assert app_id == p.APP_ID.encode()
    reply = parse_xml(inner)
    assert (reply["ToUserName"], reply["FromUserName"], reply["MsgType"]) == (
        p.OPENID,
        p.ACCOUNT,
        "text",
    )
    assert reply["Content"] == "已收到，我们会在3分钟内回复。"
    [contact] = await gw.read_contacts()
    assert (contact.text, contact.external_id) == ("水管爆了", "777")
    acked = [e for e in await gw.read_events() if e.type == "acknowledged"]
    assert [e.contact_id for e in acked] == [contact.id]


async def test_safe_mode_refuses_plain_and_forged_msg_signature(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway, mode="safe", encoding_aes_key=p.AES_KEY)
    assert (await _post(gw, p.wechat_query(NOW_S), p.text("plain", create_time=NOW_S, msg_id=1)))[
        0
    ] == 403
    query, body = p.safe_push(p.text("x", create_time=NOW_S, msg_id=2), NOW_S)
    forged = query.replace("msg_signature=", "msg_signature=0")
    assert (await _post(gw, forged, body))[0] == 403
    bad_body = body.replace(b"<Encrypt><![CDATA[", b"<Encrypt><![CDATA[AAAA")
    assert (await _post(gw, query, bad_body))[0] == 403  # msg_signature covers the ciphertext
    # signed with our token but encrypted for another AppID: not ours, refused as such (was 400)
    query, body = p.safe_push(
        p.text("y", create_time=NOW_S, msg_id=3), NOW_S, app_id="wx-someone-else"
    )
    assert (await _post(gw, query, body))[0] == 403
    assert await gw.read_contacts() == []


async def test_compatible_mode_takes_both(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway, mode="compatible", encoding_aes_key=p.AES_KEY)
    assert (await _post(gw, p.wechat_query(NOW_S), p.text("plain", create_time=NOW_S, msg_id=1)))[
        0
    ] == 200
    query, body = p.safe_push(p.text("secret", create_time=NOW_S, msg_id=2), NOW_S)
    assert (await _post(gw, query, body))[0] == 200
    assert sorted(c.text for c in await gw.read_contacts()) == ["plain", "secret"]


async def test_reply_through_customer_service_api_refreshes_the_token(
    start_gateway: Any, wechat_api: FakeWeChatApi
) -> None:
    gw = await _gateway(start_gateway, wechat_api)
    await _post(gw, p.wechat_query(NOW_S), p.text("路灯坏了", create_time=NOW_S, msg_id=1))
    [contact] = await gw.read_contacts()
    adapter = gw.adapters["wx"]
    await adapter.send(contact, Reply(contact.id, "已派单维修"))
    assert wechat_api.sent == [
        {"touser": p.OPENID, "msgtype": "text", "text": {"content": "已派单维修"}}
    ]
    assert wechat_api.tokens_issued == 1
    await adapter.send(contact, Reply(contact.id, "second"))
    assert wechat_api.tokens_issued == 1  # cached
    wechat_api.expire_tokens()
    await adapter.send(contact, Reply(contact.id, "third"))
    assert wechat_api.tokens_issued == 2  # refreshed after errcode 40001, then sent
    assert [m["text"]["content"] for m in wechat_api.sent] == ["已派单维修", "second", "third"]
    # stable_token: plain fetch first, a forced refresh only after WeChat called the token invalid
    assert wechat_api.token_calls == ["stable", "stable force"]


async def test_classic_token_api(start_gateway: Any, wechat_api: FakeWeChatApi) -> None:
    gw = await _gateway(start_gateway, wechat_api, stable_token=False)
    await _post(gw, p.wechat_query(NOW_S), p.text("x", create_time=NOW_S, msg_id=1))
    [contact] = await gw.read_contacts()
    await gw.adapters["wx"].send(contact, Reply(contact.id, "r"))
    assert wechat_api.token_calls == ["classic"]
    assert len(wechat_api.sent) == 1


@pytest.mark.parametrize(
    ("errcode", "retryable"),
    [(45015, False), (43004, False), (45047, False), (-1, True), (45009, True)],
)
async def test_send_errors_say_whether_to_retry(
    start_gateway: Any, wechat_api: FakeWeChatApi, errcode: int, retryable: bool
) -> None:
    gw = await _gateway(start_gateway, wechat_api)
    await _post(gw, p.wechat_query(NOW_S), p.text("x", create_time=NOW_S, msg_id=1))
    [contact] = await gw.read_contacts()
    wechat_api.errors.append(errcode)
    with pytest.raises(SendError) as info:
        await gw.adapters["wx"].send(contact, Reply(contact.id, "r"))
    assert info.value.retryable is retryable


@pytest.mark.parametrize(
    "extra", [{"mode": "safe"}, {"mode": "compatible", "encoding_aes_key": "too-short"}]
)
async def test_safe_mode_needs_a_valid_aes_key(start_gateway: Any, extra: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        await _gateway(start_gateway, **extra)
    assert info.value.errors[0][0] == "adapters.wx.encoding_aes_key"


async def test_image_and_voice_media_are_fetched_into_the_attachment_store(
    start_gateway: Any, wechat_api: FakeWeChatApi
) -> None:
    gw = await _gateway(start_gateway, wechat_api)
    jpeg = b"\xff\xd8\xff\xe0" + b"i" * 3000
    amr = b"#!AMR\n" + b"v" * 1000
    wechat_api.media = {"img-1": ("image/jpeg", jpeg), "voice-1": ("audio/amr", amr)}
    image = p.wechat_xml(
        "image", {"PicUrl": "http://mmbiz/x.jpg", "MediaId": "img-1"}, create_time=NOW_S, msg_id=11
    )
    voice = p.wechat_xml(
        "voice", {"MediaId": "voice-1", "Format": "amr"}, create_time=NOW_S, msg_id=12
    )
    gone = p.wechat_xml(
        "image",
        {"PicUrl": "http://mmbiz/y.jpg", "MediaId": "expired"},
        create_time=NOW_S,
        msg_id=13,
    )
    video = p.wechat_xml(
        "video", {"MediaId": "img-1", "ThumbMediaId": "t"}, create_time=NOW_S, msg_id=14
    )
    for body in (image, voice, gone, video):
        assert await _post(gw, p.wechat_query(NOW_S), body) == (200, "success")
    contacts = {c.external_id: c for c in await gw.read_contacts()}
    [img] = contacts["11"].attachments
    assert (img.content_type, img.name) == ("image/jpeg", "image-img-1.jpg")
    assert gw.attachments.read(img.sha256) == jpeg
    [snd] = contacts["12"].attachments
    assert gw.attachments.read(snd.sha256) == amr
    assert contacts["13"].attachments == ()
    assert contacts["13"].meta["attachment_errors"] == [
        "expired: media/get errcode 40007, HTTP 200"
    ]
    assert contacts["14"].attachments == ()  # video is not fetched by default
    assert wechat_api.tokens_issued == 1


async def test_image_attachments_are_uploaded_and_sent_after_the_text(
    start_gateway: Any, wechat_api: FakeWeChatApi
) -> None:
    gw = await _gateway(start_gateway, wechat_api)
    await _post(gw, p.wechat_query(NOW_S), p.text("x", create_time=NOW_S, msg_id=1))
    [contact] = await gw.read_contacts()
    jpeg = b"\xff\xd8\xff\xe0" + b"m" * 1000
    photo = await gw.attachments.put(jpeg, "维修现场.jpg", "image/jpeg")
    pdf = await gw.attachments.put(b"%PDF", "回执.pdf", "application/pdf")
    wechat_api.errors = [None, -1]  # the text goes, the image meets "system busy"
    with pytest.raises(SendError) as info:
        await gw.adapters["wx"].send(contact, Reply(contact.id, "已修复", (photo, pdf), id="r-9"))
    assert info.value.retryable
    receipt = await gw.adapters["wx"].send(
        contact, Reply(contact.id, "已修复", (photo, pdf), id="r-9")
    )
    assert [m["msgtype"] for m in wechat_api.sent] == ["text", "image"]  # the text only once
    media_id = wechat_api.sent[1]["image"]["media_id"]
    assert wechat_api.uploads[media_id] == (f"{photo.sha256[:16]}.jpg", "image/jpeg", jpeg)
    assert receipt.detail == {"skipped": ["回执.pdf"]}


async def test_verification_can_be_turned_off_by_the_operator(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway, verify=False)
    assert await _post(
        gw, f"timestamp={NOW_S - 99999}&nonce=1", p.text("x", create_time=NOW_S, msg_id=8)
    ) == (200, "success")
    assert [c.external_id for c in await gw.read_contacts()] == ["8"]


# ---------------------------------------------------------------- replayed signatures


async def test_a_signed_query_replayed_with_another_body_is_refused(start_gateway: Any) -> None:
    """Plain mode signs token, timestamp and nonce, not the message: a captured query must not
    carry a forged message. WeChat's own retries (the same push again) still pass."""
    gw = await _gateway(start_gateway)
    query = p.wechat_query(NOW_S, nonce="2093847561")
    genuine = p.text("路灯坏了", create_time=NOW_S, msg_id=7001)
    forged = p.text("伪造的投诉", create_time=NOW_S, msg_id=7002)
    for _ in range(4):  # the first try and WeChat's three retries
        assert await _post(gw, query, genuine) == (200, "success")
    for _ in range(3):
        assert (await _post(gw, query, forged))[0] == 403
    assert [c.external_id for c in await gw.read_contacts()] == ["7001"]


async def test_a_replay_at_another_instance_is_refused_too(start_gateway: Any) -> None:
    one = await _gateway(start_gateway)
    two = await _gateway(start_gateway)  # same Redis and prefix: a fleet of two
    query = p.wechat_query(NOW_S, nonce="5550001")
    assert await _post(one, query, p.text("真的", create_time=NOW_S, msg_id=8001)) == (
        200,
        "success",
    )
    assert (await _post(two, query, p.text("假的", create_time=NOW_S, msg_id=8002)))[0] == 403
    assert await _post(two, query, p.text("真的", create_time=NOW_S, msg_id=8001)) == (
        200,
        "success",
    )
    assert [c.external_id for c in await one.read_contacts()] == ["8001"]


async def test_a_bad_signature_is_refused_before_the_body_is_read(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    query = p.wechat_query(NOW_S, token="forged").encode()
    head = (
        b"POST /chat/wechat/wx?" + query + b" HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
        b"Content-Length: 900000\r\n\r\n"
    )
    status, _ = await answer_before_body(gw.http_port, head, b"<xml>")
    assert status == 403


async def test_a_fleet_of_two_fetches_one_token_and_both_reply(
    start_gateway: Any, wechat_api: FakeWeChatApi
) -> None:
    """Every ``cgi-bin/token`` call replaces the AppID's token: two instances fetching their
    own made each other's replies fail with 40001 (four token calls for two replies here)."""
    one = await _gateway(start_gateway, wechat_api, stable_token=False)
    two = await _gateway(start_gateway, wechat_api, stable_token=False)  # same Redis
    await _post(one, p.wechat_query(NOW_S), p.text("x", create_time=NOW_S, msg_id=1))
    [contact] = await one.read_contacts()
    await asyncio.gather(
        one.adapters["wx"].send(contact, Reply(contact.id, "from one")),
        two.adapters["wx"].send(contact, Reply(contact.id, "from two")),
    )
    assert wechat_api.token_calls == ["classic"]
    await one.adapters["wx"].send(contact, Reply(contact.id, "again"))
    await two.adapters["wx"].send(contact, Reply(contact.id, "again"))
    assert wechat_api.token_calls == ["classic"]
    assert sorted(m["text"]["content"] for m in wechat_api.sent) == [
        "again", "again", "from one", "from two"
    ]


async def test_a_token_rejected_at_one_instance_is_refreshed_once_for_the_fleet(
    start_gateway: Any, wechat_api: FakeWeChatApi
) -> None:
    one = await _gateway(start_gateway, wechat_api)
    two = await _gateway(start_gateway, wechat_api)
    await _post(one, p.wechat_query(NOW_S), p.text("x", create_time=NOW_S, msg_id=1))
    [contact] = await one.read_contacts()
    for gw in (one, two):
        await gw.adapters["wx"].send(contact, Reply(contact.id, "before"))
    wechat_api.expire_tokens()  # WeChat calls the token invalid (40001)
    for gw in (one, two):  # two still holds the old one in memory: 40001, then the new one
        await gw.adapters["wx"].send(contact, Reply(contact.id, "after"))
    assert wechat_api.token_calls == ["stable", "stable force"]
    assert wechat_api.tokens_issued == 2
    assert [m["text"]["content"] for m in wechat_api.sent] == ["before"] * 2 + ["after"] * 2


async def test_the_token_is_fetched_locally_while_redis_is_away(tmp_path: Path) -> None:
    """The shared copy is out of reach: the process fetches and caches for itself, as one
    process did before, instead of failing every reply."""
    import redis.asyncio as aioredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from gateway.channels.chat.officialaccount import AccessToken
    from gateway.queueing.coordination import SharedState
    from gateway.queueing.keys import Keys

    calls: list[bool] = []

    async def fetch(force: bool) -> tuple[str, float]:
        calls.append(force)
        return f"T{len(calls)}", 7200.0

    away = aioredis.Redis(
        unix_socket_path=str(tmp_path / "no-redis.sock"), retry=Retry(NoBackoff(), 0)
    )
    token = AccessToken(fetch, SharedState(away, Keys("away"), "wechat:wx"))
    try:
        assert await token.get() == "T1"
        assert await token.get() == "T1"
        await token.invalidate("T1")  # WeChat said 40001: a forced fetch, still local
        assert await token.get() == "T2"
        assert calls == [False, True]
    finally:
        await away.aclose()


async def test_a_process_that_claims_just_after_another_stored_reads_before_fetching(
    redis_url: str, prefix: str
) -> None:
    """Process B reads no token, then A fetches, stores and lets its claim go, then B claims:
    B must take A's token, not fetch a second one (every ``cgi-bin/token`` call replaces the
    last, so A's replies would fail). This interleaving made the fleet test flaky."""
    import redis.asyncio as aioredis

    from gateway.channels.chat.officialaccount import TOKEN_KEY, AccessToken
    from gateway.queueing.coordination import SharedState
    from gateway.queueing.keys import Keys

    a_done = asyncio.Event()
    b_read = asyncio.Event()

    class ReadsLate(SharedState):
        """B's view of the shared state: its first read of the token returns only after A has
        finished (the value read is the one from before)."""

        stalled = False

        async def get(self, key: str) -> bytes | None:
            value = await super().get(key)
            if key == TOKEN_KEY and not self.stalled:
                self.stalled = True
                b_read.set()
                await a_done.wait()
            return value

    calls: list[str] = []

    def fetcher(name: str) -> Any:
        async def fetch(force: bool) -> tuple[str, float]:
            calls.append(name)
            return f"token-{name}", 7200.0

        return fetch

    redis = aioredis.from_url(redis_url)
    keys = Keys(prefix)
    try:
        b = AccessToken(fetcher("b"), ReadsLate(redis, keys, "wechat:wx"))
        a = AccessToken(fetcher("a"), SharedState(redis, keys, "wechat:wx"))
        b_token = asyncio.create_task(b.get())
        await b_read.wait()  # B has read "no token" and waits (a sleep let A go first under load)
        assert await a.get() == "token-a"
        a_done.set()
        assert await b_token == "token-a"
        assert calls == ["a"]
    finally:
        await redis.aclose()


async def test_a_claim_expired_and_retaken_is_not_deleted_by_its_first_holder(
    redis_url: str, prefix: str
) -> None:
    """A's fetch outlives its claim (15 s), B takes the claim and fetches; A's fetch fails.
    A must not delete B's claim on its way out: C would then find neither token nor claim and
    fetch beside B (every ``cgi-bin/token`` call replaces the last, failing the other's
    replies with 40001)."""
    import redis.asyncio as aioredis

    from gateway.channels.chat.officialaccount import CLAIM_KEY, AccessToken, TokenError
    from gateway.queueing.coordination import SharedState
    from gateway.queueing.keys import Keys

    redis = aioredis.from_url(redis_url)
    keys = Keys(prefix)
    claim = keys.state("wechat:wx", CLAIM_KEY)
    a_fetching, a_fail, b_fetching, b_done = (asyncio.Event() for _ in range(4))
    calls: list[str] = []

    async def fetch_a(force: bool) -> tuple[str, float]:
        calls.append("a")
        a_fetching.set()
        await a_fail.wait()
        raise TokenError("the platform did not answer A")

    async def fetch_b(force: bool) -> tuple[str, float]:
        calls.append("b")
        b_fetching.set()
        await b_done.wait()
        return "token-b", 7200.0

    async def fetch_c(force: bool) -> tuple[str, float]:
        calls.append("c")
        return "token-c", 7200.0

    try:
        a = AccessToken(fetch_a, SharedState(redis, keys, "wechat:wx"))
        b = AccessToken(fetch_b, SharedState(redis, keys, "wechat:wx"))
        c = AccessToken(fetch_c, SharedState(redis, keys, "wechat:wx"))
        a_get = asyncio.create_task(a.get())
        await a_fetching.wait()
        a_claim = await redis.get(claim)
        assert a_claim is not None
        await redis.delete(claim)  # A's claim expired (15 s) while its fetch went on
        b_get = asyncio.create_task(b.get())
        await b_fetching.wait()
        b_claim = await redis.get(claim)
        assert b_claim not in (None, a_claim)
        a_fail.set()
        with pytest.raises(TokenError):
            await a_get
        assert await redis.get(claim) == b_claim  # B's claim stands
        c_get = asyncio.create_task(c.get())  # C waits for B's token instead of fetching
        await asyncio.sleep(0.2)
        assert calls == ["a", "b"]
        b_done.set()
        assert await b_get == "token-b"
        assert await c_get == "token-b"
        assert calls == ["a", "b"]
        assert await redis.get(claim) is None  # B let its own claim go
    finally:
        await redis.aclose()
