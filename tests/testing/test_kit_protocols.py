"""The kit (gateway.testing) over the built-in adapters that are not plain HTTP webhooks, or
need a local provider to start: Telegram (webhook and polling, through a local Bot API server),
WeChat's encrypted (safe) mode, SMTP, FastAGI, SMPP and CMPP. And the kit's own check: an
adapter that acknowledges before it stores fails "acknowledged only once durable"."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, IntakeUnavailable, load_channel_types
from gateway.channels.sms import cmpp_pdu as C
from gateway.channels.sms import smpp_pdu as P
from gateway.records import Inbound, Sender
from gateway.server.config import Secret
from gateway.server.runtime import Gateway
from gateway.testing import (
    ALL_CHECKS,
    AgiKit,
    Delivery,
    KitCase,
    PeerKit,
    Request,
    SmtpKit,
    WebhookCase,
    WebhookKit,
    check_acknowledged_only_once_durable,
    eventually,
    run_case,
    run_kit_case,
)
from gateway.testing.agi import header_block
from tests.channels.chat import payloads as wx
from tests.channels.chat.fakes import BOT_TOKEN, FakeBotApi, message, private_chat
from tests.channels.sms.ismg import Ismg
from tests.channels.sms.smsc import Smsc

PHONE = "13800138000"
MAILBOX = "12345@hotline.example.gov.cn"
TG_SECRET = "kit-tg-secret-Token_5"

# ---------------------------------------------------------------- WeChat, safe mode


def _wechat_safe(message_id: str, text: str, *, app_id: str = wx.APP_ID,
                 forge: bool = False) -> Request:
    """A safe-mode push as WeChat makes it: the message AES-encrypted, msg_signature over it,
    a fresh nonce each try, the same MsgId."""
    now = int(time.time())
    msg_id = int(hashlib.sha256(message_id.encode()).hexdigest()[:15], 16)
    query, body = wx.safe_push(wx.text(text, create_time=now, msg_id=msg_id), now,
                               nonce=secrets.token_hex(8), app_id=app_id)
    if forge:
        query = query.replace("msg_signature=", "msg_signature=0")
    return Request(f"/chat/wechat/kit?{query}", body, {"Content-Type": "text/xml"})


WECHAT_SAFE = WebhookKit(
    type="wechat",
    table={"app_id": wx.APP_ID, "token": wx.TOKEN, "mode": "safe",
           "encoding_aes_key": wx.AES_KEY},
    inbound=_wechat_safe,
    bad=[
        lambda: _wechat_safe("s1", "x", forge=True),
        lambda: _wechat_safe("s2", "x", app_id="wx-someone-else"),  # for another account
        lambda: Request(f"/chat/wechat/kit?{wx.wechat_query(int(time.time()))}",  # plain
                        wx.text("x", create_time=int(time.time()), msg_id=3),
                        {"Content-Type": "text/xml"}),
        lambda: Request(f"/chat/wechat/kit?{wx.wechat_query(int(time.time()))}",
                        b"<xml><Encrypt", {"Content-Type": "text/xml"}),
    ],
    secrets=[wx.TOKEN, wx.AES_KEY],
)

# ---------------------------------------------------------------- Telegram


def _update(update_id: int, message_id: str, text: str) -> dict[str, Any]:
    msg = int(hashlib.sha256(message_id.encode()).hexdigest()[:8], 16)
    return {"update_id": update_id, "message": message(msg, private_chat(), text=text)}


STICKER = {"file_id": "s", "file_unique_id": "u", "width": 512, "height": 512,
           "is_animated": False, "is_video": False, "type": "regular"}


def _update_ids() -> Callable[[], int]:
    counter = iter(range(10_000, 1_000_000))
    return lambda: next(counter)


async def _tg_ready(gw: Gateway) -> None:
    await asyncio.wait_for(gw.adapters["kit"].ready.wait(), 30)  # type: ignore[attr-defined]


def telegram_webhook(api: FakeBotApi) -> WebhookKit:
    next_id = _update_ids()

    def inbound(message_id: str, text: str) -> Request:
        return Request("/chat/telegram/kit", orjson.dumps(_update(next_id(), message_id, text)),
                       {"Content-Type": "application/json",
                        "X-Telegram-Bot-Api-Secret-Token": TG_SECRET})

    good = orjson.dumps(_update(1, "b", "x"))
    # no reply_config: every Bot API method shares one base URL, so the kit's provider (one
    # answer to every request) cannot stand in for sendMessage alone (tests/channels/chat
    # covers replies)
    return WebhookKit(
        type="telegram",
        table={"token": BOT_TOKEN, "mode": "webhook", "secret_token": TG_SECRET,
               "webhook_url": "https://hotline.example.gov.cn/chat/telegram/kit",
               "api_base": api.api_base, "file_base": api.file_base},
        inbound=inbound,
        bad=[
            Request("/chat/telegram/kit", good, {"Content-Type": "application/json",
                                                 "X-Telegram-Bot-Api-Secret-Token": "guess"}),
            Request("/chat/telegram/kit", good, {"Content-Type": "application/json"}),
            Request("/chat/telegram/kit", b"{", {"Content-Type": "application/json",
                                                 "X-Telegram-Bot-Api-Secret-Token": TG_SECRET}),
        ],
        secrets=[BOT_TOKEN, TG_SECRET],
        until_ready=_tg_ready,
    )


def telegram_polling(api: FakeBotApi) -> PeerKit:
    """Polling: a delivery is an update the local Bot API serves; it is acknowledged when the
    adapter's next getUpdates confirms it (an offset past it), and answered retry-later when
    it is served again unconfirmed (the adapter asked for it anew)."""
    next_id = _update_ids()

    async def served(gw: Gateway, update: dict[str, Any]) -> Delivery:
        before = len(api.offsets)
        api.push(update)
        uid = update["update_id"]

        def confirmed() -> bool:
            return any(o is not None and o > uid for o in api.offsets[before:])

        try:
            await eventually(confirmed)
        except AssertionError:  # Telegram keeps an update until an offset past it comes
            asked = len([o for o in api.offsets[before:] if o is None or o <= uid])
            return Delivery("retry", f"not confirmed (asked for again {asked} times)")
        text = update.get("message", {}).get("text")
        stored = text is not None and text in {c.text for c in await gw.read_contacts()}
        return Delivery("ok" if stored else "refused",
                        f"confirmed, {'its contact' if stored else 'nothing'} stored")

    async def send(gw: Gateway, message_id: str, text: str) -> Delivery:
        return await served(gw, _update(next_id(), message_id, text))

    def bad(update: Callable[[int], dict[str, Any]]) -> Callable[[Gateway], Any]:
        return lambda gw: served(gw, update(next_id()))

    return PeerKit(
        type="telegram",
        table={"token": BOT_TOKEN, "mode": "polling", "poll_timeout": "1s",
               "api_base": api.api_base, "file_base": api.file_base},
        send=send,
        bad=[
            bad(lambda uid: {"update_id": uid, "message": message(7, private_chat(),
                                                                  sticker=STICKER)}),
            bad(lambda uid: {"update_id": uid, "channel_post": message(8, private_chat(),
                                                                       text="x")}),
            bad(lambda uid: {"update_id": uid,  # the library cannot build it: skipped
                             "message": message(9, private_chat(), sticker={"file_id": "s"})}),
        ],
        secrets=[BOT_TOKEN],
        until_ready=_tg_ready,
    )


# ---------------------------------------------------------------- SMTP

SMTP = SmtpKit(
    type="smtp",
    table={"listen": "127.0.0.1:0", "mailboxes": [MAILBOX], "max_message_size": 100_000},
    mailbox=MAILBOX,
    bad=[
        [b"EHLO client.kit.invalid", b"MAIL FROM:<a@example.org>",
         b"RCPT TO:<someone@elsewhere.example.com>"],  # not a relay
        [b"EHLO client.kit.invalid", b"MAIL FROM:<a@example.org> SIZE=999999999"],
        [b"EHLO client.kit.invalid", b"MAIL FROM:<a@example.org>",
         b"RCPT TO:<nobody@hotline.example.gov.cn>"],  # no such mailbox
        [b"EHLO client.kit.invalid", b"RCPT TO:<" + MAILBOX.encode() + b">"],  # no MAIL
    ],
)

# ---------------------------------------------------------------- FastAGI

AGI = AgiKit(
    type="asterisk",
    table={"agi_listen": "127.0.0.1:0", "settle": "0s", "languages": {"12345": "zh"}},
    phone=PHONE,
    bad=[
        b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n",  # not AGI at all
        b"\n".join(line for line in header_block("1.1", PHONE, "12345").split(b"\n")
                   if not line.startswith(b"agi_uniqueid")),  # a call without its id
        b"agi_network: yes\nagi_request: " + b"x" * 70_000 + b"\n\n",  # an overlong line
    ],
)

# ---------------------------------------------------------------- SMPP and CMPP


def _text(message_id: str, text: str) -> bytes:
    return f"{text} #{message_id}".encode("utf-16-be")


def smpp_kit(smsc: Smsc) -> PeerKit:
    def outcome(command_id: int, status: int) -> Delivery:
        how = ("ok" if command_id == P.DELIVER_SM | P.RESP and status == 0 else
               "retry" if status == P.ESME_RX_T_APPN else "refused" if status else "other")
        return Delivery(how, f"{command_id:#x} status {status:#x}")  # type: ignore[arg-type]

    async def send(gw: Gateway, message_id: str, text: str) -> Delivery:
        pdu = smsc.make("deliver_sm", source_addr_ton=1, source_addr_npi=1,
                        source_addr="86" + PHONE, destination_addr="12345", data_coding=8,
                        short_message=_text(message_id, text))
        command_id, status, _ = await smsc.raw(pdu.generate(), pdu.sequence)
        return outcome(command_id, status)

    async def cut(gw: Gateway) -> Delivery:  # the header says 30 octets: ends in source_addr
        full = smsc.make("deliver_sm", source_addr="86" + PHONE, destination_addr="1",
                         short_message=b"abc").generate()
        data = struct.pack(">I", 30) + full[4:12] + struct.pack(">I", 902) + full[16:30]
        return outcome(*(await smsc.raw(data, 902))[:2])

    async def unknown(gw: Gateway) -> Delivery:
        return outcome(*(await smsc.raw(struct.pack(">IIII", 16, 0x99, 0, 901), 901))[:2])

    async def no_source(gw: Gateway) -> Delivery:
        pdu = smsc.make("deliver_sm", source_addr="", destination_addr="12345",
                        data_coding=8, short_message=_text("n", "x"))
        return outcome(*(await smsc.raw(pdu.generate(), pdu.sequence))[:2])

    async def bound(gw: Gateway) -> None:
        await asyncio.wait_for(gw.adapters["kit"].bound.wait(), 20)  # type: ignore[attr-defined]

    return PeerKit(
        type="smpp",
        table={"host": "127.0.0.1", "port": smsc.port, "system_id": "hotline",
               "password": "pw123456", "system_type": "12345", "source_addr": "12345"},
        send=send, bad=[cut, unknown, no_source], secrets=["pw123456"], phone=PHONE,
        until_ready=bound,
    )


def cmpp_kit(ismg: Ismg) -> PeerKit:
    def outcome(result: int) -> Delivery:
        how = "ok" if result == 0 else "retry" if result == C.DELIVER_FLOW_CONTROL else "refused"
        return Delivery(how, f"Result {result}")  # type: ignore[arg-type]

    async def send(gw: Gateway, message_id: str, text: str) -> Delivery:
        msg_id = int(hashlib.sha256(message_id.encode()).hexdigest()[:15], 16)
        _, result = await ismg.deliver(msg_id=msg_id, dest_id="106512345",
                                       src_terminal_id=PHONE, msg_content=_text(message_id, text),
                                       msg_fmt=C.FMT_UCS2)
        return outcome(result)

    async def cut(gw: Gateway) -> Delivery:
        body = C.Deliver(msg_id=4242, dest_id="106512345", src_terminal_id=PHONE,
                         msg_content=b"x", msg_fmt=0).encode(ismg.version)[:50]
        command_id, answer = await ismg.raw(C.DELIVER, body)
        assert command_id == C.DELIVER | C.RESP
        return outcome(C.parse_msg_id_resp(answer, ismg.version)[1])

    async def connected(gw: Gateway) -> None:
        await asyncio.wait_for(gw.adapters["kit"].bound.wait(), 20)  # type: ignore[attr-defined]

    return PeerKit(
        type="cmpp",
        table={"host": "127.0.0.1", "port": ismg.port, "source_addr": "901234",
               "shared_secret": "s3cret-kit", "version": "3.0" if ismg.version == C.V30
               else "2.0", "src_id": "106512345", "service_id": "HOTLINE"},
        send=send, bad=[cut], secrets=["s3cret-kit"], phone=PHONE, until_ready=connected,
    )


# ---------------------------------------------------------------- the runs

KIT_NAMES = ["wechat-safe", "telegram-webhook", "telegram-polling", "smtp", "asterisk", "smpp",
             "cmpp-2.0", "cmpp-3.0"]


@pytest.fixture
async def peer_kit(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    name = request.param
    if name.startswith("telegram"):
        api = FakeBotApi()
        await api.start()
        yield telegram_webhook(api) if name == "telegram-webhook" else telegram_polling(api)
        await api.stop()
    elif name == "smpp":
        smsc = await Smsc().start()
        yield smpp_kit(smsc)
        await smsc.close()
    elif name.startswith("cmpp"):
        ismg = await Ismg(C.V30 if name == "cmpp-3.0" else C.V20, secret="s3cret-kit").start()
        yield cmpp_kit(ismg)
        await ismg.close()
    else:
        yield {"wechat-safe": WECHAT_SAFE, "smtp": SMTP, "asterisk": AGI}[name]


RUNS = [(kit, check) for kit in KIT_NAMES for check in sorted(ALL_CHECKS)
        if check != "replies_stamped"]


@pytest.mark.parametrize(("peer_kit", "check"), RUNS, ids=[f"{k}-{c}" for k, c in RUNS],
                         indirect=["peer_kit"])
async def test_kit(peer_kit: Any, check: str, start_gateway: Any, own_redis: Any) -> None:
    await ALL_CHECKS[check](start_gateway, peer_kit, own_redis)


# ---------------------------------------------------------------- the kit's own check


@dataclass(frozen=True, slots=True)
class EagerConfig:
    secret: Secret
    path: str = "/kit/eager"


class EagerAdapter:
    """Deliberately broken: answers 200 at once and stores the contact afterwards (a batching
    adapter that acknowledges what it has not written yet)."""

    channel = "web"

    def __init__(self, ctx: AdapterContext, config: EagerConfig) -> None:
        self.name, self.ctx = ctx.name, ctx
        self._pending: set[asyncio.Task[Any]] = set()
        ctx.router.add_post(config.path, self.receive)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for task in self._pending:
            task.cancel()

    async def receive(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        inbound = Inbound(channel="web", adapter=self.name, external_id=body["id"],
                          sender=Sender("kit@example.org"), recipient="",
                          received_at=self.ctx.clock.now_us(), text=body["text"])

        async def later() -> None:
            await asyncio.sleep(0.5)  # the next batch
            try:
                await self.ctx.intake.submit(inbound)
            except IntakeUnavailable:
                pass

        task = asyncio.create_task(later())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return web.Response(text="ok")


EAGER = ChannelType(name="kit-eager", channel="web", config=EagerConfig,
                    factory=EagerAdapter, example={"secret": "x"})


def _eager(message_id: str, text: str) -> Request:
    return Request("/kit/eager", orjson.dumps({"id": message_id, "text": text}),
                   {"Content-Type": "application/json"})


async def test_the_durability_check_fails_an_adapter_that_answers_before_storing(
    start_gateway: Any, own_redis: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(load_channel_types(), "kit-eager", EAGER)
    kit = WebhookKit(type="kit-eager", table={"secret": "kit-eager-secret"}, inbound=_eager,
                     bad=[], secrets=["kit-eager-secret"])
    with pytest.raises(AssertionError, match="acknowledged before stored"):
        await check_acknowledged_only_once_durable(start_gateway, kit, own_redis)


# ---------------------------------------------------------------- table runner


SAFE_CASES = [
    WebhookCase("encrypted text", lambda: _wechat_safe("t1", "路灯坏了"), 200,
                contact={"text": "路灯坏了", "channel": "chat"}, events=["enqueued"]),
    WebhookCase("forged msg_signature", WECHAT_SAFE.bad[0], 403),
    WebhookCase("encrypted for another account", WECHAT_SAFE.bad[1], 403),
]


@pytest.mark.parametrize("case", SAFE_CASES, ids=[c.label for c in SAFE_CASES])
async def test_table_runner_over_wechat_safe_mode(case: WebhookCase, start_gateway: Any) -> None:
    await run_case(await start_gateway(adapters=WECHAT_SAFE.adapters()), case)


# ---------------------------------------------------------------- handler tables, any kit


def _smtp_cases(kit: SmtpKit) -> list[KitCase]:
    return [
        KitCase("plain text mail", lambda gw: kit.deliver(gw, "m1", "路灯坏了"), "ok",
                contact={"channel": "email", "text": "路灯坏了", "recipient": MAILBOX,
                         "sender.address": kit.sender, "external_id": "<m1@kit.invalid>"},
                events=["enqueued"]),
        KitCase("relay attempt", lambda gw: kit.send_commands(gw, kit.bad[0]), "refused"),
        KitCase("unknown mailbox", lambda gw: kit.send_commands(gw, kit.bad[3]), "refused"),
    ]


def _agi_cases(kit: AgiKit) -> list[KitCase]:
    return [
        KitCase("a call", lambda gw: kit.deliver(gw, "1795594483.9", ""), "ok",
                contact={"channel": "voice", "sender.address": "+86" + PHONE,
                         "recipient": "12345", "external_id": "1795594483.9",
                         "language": "zh"}, events=["enqueued"]),
        KitCase("a call without its id", lambda gw: kit.play(gw, kit.bad[1], "refused"),
                "refused"),
        KitCase("not AGI at all", lambda gw: kit.play(gw, kit.bad[0], "refused"), "refused"),
    ]


def _peer_cases(kit: PeerKit, channel: str, sender: str) -> list[KitCase]:
    return [
        KitCase("a message", lambda gw: kit.deliver(gw, "p1", "停水了"), "ok",
                contact={"channel": channel, "sender.address": sender, "adapter": "kit"},
                events=["enqueued"]),
        KitCase("a bad input", kit.bad[0], "refused"),
    ]


def _telegram_webhook_cases(kit: WebhookKit) -> list[KitCase]:
    return [
        KitCase("text update", lambda gw: kit.deliver(gw, "w1", "噪音扰民"), "ok",
                contact={"channel": "chat", "text": "噪音扰民",
                         "sender.address": "telegram:777000001"},
                events=["enqueued"]),
        KitCase("wrong secret token", lambda gw: _first_refusal(kit, gw), "refused"),
    ]


async def _first_refusal(kit: Any, gw: Gateway) -> Delivery:
    return (await kit.refusals(gw))[0]


CASES_FOR: dict[str, Callable[[Any], list[KitCase]]] = {
    "smtp": _smtp_cases,
    "asterisk": _agi_cases,
    "smpp": lambda kit: _peer_cases(kit, "sms", "+86" + PHONE),
    "cmpp-3.0": lambda kit: _peer_cases(kit, "sms", "+86" + PHONE),
    "telegram-polling": lambda kit: [
        *_peer_cases(kit, "chat", "telegram:777000001")[:1],
        KitCase("a sticker: confirmed, nothing stored", kit.bad[0], "refused")],
    "telegram-webhook": _telegram_webhook_cases,
}
TABLE = [(name, n) for name in CASES_FOR for n in range(3 if name in ("smtp", "asterisk")
                                                         else 2)]


@pytest.mark.parametrize(("peer_kit", "n"), TABLE, ids=[f"{k}-{n}" for k, n in TABLE],
                         indirect=["peer_kit"])
async def test_handler_table(peer_kit: Any, n: int, start_gateway: Any) -> None:
    case = CASES_FOR[peer_kit_name(peer_kit)](peer_kit)[n]
    gw = await start_gateway(adapters=peer_kit.adapters())
    await peer_kit.ready(gw)
    await run_kit_case(gw, case)


def peer_kit_name(kit: Any) -> str:
    table = getattr(kit, "table", {})
    if kit.type == "telegram":
        return f"telegram-{table['mode']}"
    if kit.type == "cmpp":
        return "cmpp-3.0"
    return {"smtp": "smtp", "asterisk": "asterisk", "smpp": "smpp"}[kit.type]
