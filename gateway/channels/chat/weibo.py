"""Weibo fan service private messages (微博粉丝服务平台): channel type ``weibo``.

The same shape as WeChat: URL verification by GET (``signature`` = sha1 of the sorted app
secret, timestamp and nonce; ``echostr`` back), then pushes by POST signed the same way, JSON by
default or WeChat-style XML when the account chose it. Text, image, voice, position and event
messages become contacts; other types are ignored with a log line. Replies go back as a passive
response (auto-ack) or through the customer-service message API with the account's token.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import quote

import orjson
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.chat import SENDER_CONTACTS
from gateway.channels.chat.officialaccount import (
    Decoded,
    PayloadError,
    PushAdapter,
    PushConfig,
    PushMessage,
    call_json,
    parse_xml,
    text_reply_xml,
)
from gateway.contact import safejson
from gateway.contact.clock import from_datetime
from gateway.records import Contact, Reply
from gateway.server.config import Secret

log = logging.getLogger(__name__)

KINDS: Final = frozenset({"text", "image", "voice", "position", "event"})
_RETRYABLE: Final = frozenset({10001, 10009, 10022, 10023, 10024})
"""System error, task too busy, IP/user/app request rate limits: try later."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WeiboConfig(PushConfig):
    """``[adapters.NAME]`` with ``type = "weibo"`` (and ``PushConfig``'s keys)."""

    app_secret: Secret
    """The App Secret that signs URL verification and every push."""
    access_token: Secret | None = None
    """The fan service access token of the account (for the customer-service message API)."""
    format: Literal["json", "xml"] = "json"
    api_base: str = "https://m.api.weibo.com"


def _created_at(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < 10**11 else None
    if not isinstance(value, str):
        return None
    if value.isdigit():
        return int(value) if len(value) < 12 else None
    return _weibo_date(value)


_MONTHS: Final = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


def _weibo_date(value: str) -> int | None:
    """Parse ``Mon Jul 16 18:09:20 +0800 2012`` (how the Weibo API writes dates) to Unix seconds."""
    parts = value.split()
    if len(parts) != 6:
        return None
    _, month, day, hms, zone, year = parts
    clock = hms.split(":")
    if (
        month not in _MONTHS
        or len(clock) != 3
        or len(zone) != 5
        or zone[0] not in "+-"
        or not all(x.isascii() and x.isdigit() for x in (day, year, zone[1:], *clock))
    ):
        return None
    try:
        hour, minute, second = (int(x) for x in clock)
        moment = datetime(int(year), _MONTHS[month], int(day), hour, minute, second, tzinfo=UTC)
    except (ValueError, OverflowError):  # a day or second of 30 digits
        return None
    offset = (int(zone[1:3]) * 3600 + int(zone[3:5]) * 60) * (1 if zone[0] == "+" else -1)
    return from_datetime(moment) // 1_000_000 - offset


def _id(value: Any) -> str:
    if isinstance(value, bool):
        return ""
    if isinstance(value, (int, str)):
        return str(value).strip()[:64]
    return ""


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def decode_json(body: bytes) -> PushMessage | None:
    """Decode a JSON push; None for types we do not take; PayloadError when malformed."""
    try:
        doc = safejson.loads(body)
    except safejson.BadJson as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError("not a JSON object")
    data = doc.get("data")
    if not isinstance(data, dict):
        data = {}
    return _decode(
        kind=_str(doc.get("type")).lower(),
        sender=_id(doc.get("sender_id")),
        recipient=_id(doc.get("receiver_id")),
        created_raw=doc.get("created_at"),
        text=_str(doc.get("text")),
        data=data,
    )


def decode_xml(body: bytes) -> PushMessage | None:
    """Decode an XML push (WeChat-style fields); None for types we do not take."""
    fields = parse_xml(body)
    data: dict[str, Any] = {}
    for ours, theirs in (
        ("longitude", ("Longitude", "Location_Y")),
        ("latitude", ("Latitude", "Location_X")),
        ("subtype", ("Event",)),
        ("key", ("EventKey",)),
        ("vfid", ("MediaId", "Vfid")),
        ("tovfid", ("ToVfid",)),
    ):
        for key in theirs:
            if isinstance(fields.get(key), str) and fields[key]:
                data[ours] = fields[key]
                break
    return _decode(
        kind=_str(fields.get("MsgType")).lower(),
        sender=_str(fields.get("FromUserName")),
        recipient=_str(fields.get("ToUserName")),
        created_raw=_str(fields.get("CreateTime")),
        text=_str(fields.get("Content")),
        data=data,
    )


def _decode(
    *, kind: str, sender: str, recipient: str, created_raw: Any, text: str, data: dict[str, Any]
) -> PushMessage | None:
    if not kind or not sender:
        raise PayloadError("type or sender_id missing")
    if kind not in KINDS:
        log.info("weibo: ignoring message type %r", kind[:32])
        return None
    meta: dict[str, Any] = {}
    event: str | None = None
    if kind in ("image", "voice"):
        meta = {"vfid": _id(data.get("vfid")), "tovfid": _id(data.get("tovfid"))}
    elif kind == "position":
        meta = {
            "location": {
                "lat": _coordinate(data.get("latitude")),
                "lon": _coordinate(data.get("longitude")),
            }
        }
    elif kind == "event":
        event = _str(data.get("subtype")).lower() or "unknown"
        key = _str(data.get("key"))
        if key:
            meta = {"event_key": key[:256]}
    created = _created_at(created_raw)
    # Pushes carry no message id: a retry repeats the same sender, time, type and content.
    digest = hashlib.sha256(
        orjson.dumps([kind, text, data], option=orjson.OPT_SORT_KEYS, default=str)
    ).hexdigest()[:16]
    stamp = created if created is not None else _str(created_raw)[:40]
    return PushMessage(
        kind=kind,
        sender=sender,
        recipient=recipient,
        external_id=f"{sender}:{stamp}:{digest}",
        created_at=created,
        text=text,
        event=event,
        meta=meta,
    )


def _coordinate(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if -180.0 <= number <= 180.0 else None


class WeiboAdapter(PushAdapter):
    """One Weibo account's fan service."""

    scheme = "weibo"
    events = frozenset({"follow", "unfollow", "subscribe", "unsubscribe"})

    def __init__(self, ctx: AdapterContext, config: WeiboConfig) -> None:
        self.config = config
        super().__init__(ctx, config, secret=config.app_secret.reveal())

    def decode(self, query: Mapping[str, str], body: bytes) -> Decoded:
        self.check(query)
        msg = decode_xml(body) if self.config.format == "xml" else decode_json(body)
        return Decoded(msg, lambda text: self._passive(msg, text))

    def success(self) -> web.Response:
        return web.Response(text="")

    def _passive(self, msg: PushMessage | None, text: str) -> web.Response:
        if msg is None:
            return self.success()
        if self.config.format == "xml":
            now_s = self.ctx.clock.now_us() // 1_000_000
            xml = text_reply_xml(msg.sender, msg.recipient, now_s, text)
            return web.Response(text=xml, content_type="application/xml")
        body = {
            "result": True,
            "receiver_id": msg.sender,
            "sender_id": msg.recipient,
            "type": "text",
            "data": quote(orjson.dumps({"text": text}).decode("utf-8"), safe=""),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Send a text private message through the customer-service message API."""
        if not self.config.access_token:
            raise SendError("access_token is not configured", retryable=False)
        result = await call_json(
            self.session,
            "POST",
            f"{self.config.api_base}/2/messages/reply.json",
            data={
                "access_token": self.config.access_token.reveal(),
                "type": "text",
                "data": orjson.dumps({"text": reply.text}).decode("utf-8"),
                "receiver_id": contact.sender.address.removeprefix("weibo:"),
                "save_sender_box": "0",
            },
        )
        code = result.get("error_code")
        if code is None:
            ident = result.get("id") or result.get("idstr")
            return SendReceipt(external_id=None if ident is None else str(ident))
        raise SendError(f"error_code {code}", retryable=code in _RETRYABLE)


CHANNEL: ChannelType[WeiboConfig] = ChannelType(
    name="weibo",
    channel="chat",
    config=WeiboConfig,
    factory=WeiboAdapter,
    example={"app_secret": "change-me"},
    sender_contacts=SENDER_CONTACTS,
)
