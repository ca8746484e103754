"""WeChat Official Account (微信公众号) server: channel type ``wechat``.

URL verification by GET, message push by POST (XML, plain or safe mode with AES and
``msg_signature``), answered within WeChat's 5 s with ``success`` or a passive auto-ack;
replies through the customer-service message API with a cached access token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiohttp
import orjson
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.chat import SENDER_CONTACTS
from gateway.channels.chat.officialaccount import (
    AccessToken,
    Decoded,
    MessageCrypto,
    PayloadError,
    PushAdapter,
    PushConfig,
    PushMessage,
    SignatureError,
    TokenError,
    call_json,
    parse_xml,
    signature_matches,
    text_reply_xml,
    timestamp_within,
)
from gateway.channels.common import SentParts
from gateway.contact.attachments import AttachmentTooLarge
from gateway.records import Attachment, Contact, Reply
from gateway.server.config import AdapterSettings, ConfigError, Duration, Secret
from gateway.server.http import read_capped

log = logging.getLogger(__name__)

_TOKEN_EXPIRED: Final = frozenset({40001, 40014, 42001})
_RETRYABLE: Final = frozenset({-1, 45009})
"""System busy, daily API quota reached: try later. Not 45047 (the 5 replies per citizen
message are used up) nor 45015 (48 h since the citizen's last message): only the citizen
writing again helps."""


_MEDIA_BUDGET: Final = Duration(2.0)
_EXTENSIONS: Final = {
    "image/jpeg": ".jpg",
    "image/png": ".png",
    "image/gif": ".gif",
    "audio/amr": ".amr",
    "audio/speex": ".speex",
    "video/mp4": ".mp4",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WeChatConfig(PushConfig):
    """``[adapters.NAME]`` with ``type = "wechat"`` (and ``PushConfig``'s keys)."""

    app_id: str
    token: Secret
    """The Token set in the Official Account's server configuration (signs every push)."""
    app_secret: Secret | None = None
    """AppSecret: needed to send replies through the customer-service message API."""
    encoding_aes_key: Secret | None = None
    """EncodingAESKey (43 characters): needed in compatible and safe mode."""
    mode: Literal["plain", "compatible", "safe"] = "plain"
    api_base: str = "https://api.weixin.qq.com"
    stable_token: bool = True
    """Fetch tokens from /cgi-bin/stable_token, which does not invalidate the token held by other
    systems sharing the AppSecret; false: /cgi-bin/token (each fetch invalidates the last)."""
    fetch_media: tuple[str, ...] = ("image", "voice")
    """Message types whose media is downloaded (temporary media API) before WeChat is answered."""
    media_budget: Duration = _MEDIA_BUDGET
    """How long a media download may take out of WeChat's 5 s; past it, only media_id is kept."""


def decode_message(fields: Mapping[str, Any]) -> PushMessage | None:
    """Decode one WeChat push (already parsed XML); None for types we do not take.

    Raises PayloadError when a field every message has is missing.
    """
    kind = _text(fields, "MsgType").lower()
    sender = _text(fields, "FromUserName")
    recipient = _text(fields, "ToUserName")
    if not kind or not sender:
        raise PayloadError("MsgType or FromUserName missing")
    created = _int(_text(fields, "CreateTime"))
    msg_id = _text(fields, "MsgId")
    meta: dict[str, Any] = {}
    text = ""
    event: str | None = None
    if kind == "text":
        text = _text(fields, "Content")
    elif kind == "image":
        meta = {"pic_url": _text(fields, "PicUrl"), "media_id": _text(fields, "MediaId")}
    elif kind == "voice":
        meta = {"media_id": _text(fields, "MediaId"), "format": _text(fields, "Format")}
        text = _text(fields, "Recognition")
    elif kind in ("video", "shortvideo"):
        meta = {
            "media_id": _text(fields, "MediaId"),
            "thumb_media_id": _text(fields, "ThumbMediaId"),
        }
    elif kind == "location":
        meta = {
            "location": {
                "lat": _float(_text(fields, "Location_X")),
                "lon": _float(_text(fields, "Location_Y")),
                "scale": _int(_text(fields, "Scale")),
                "label": _text(fields, "Label"),
            }
        }
        text = _text(fields, "Label")
    elif kind == "link":
        title, description, url = (_text(fields, k) for k in ("Title", "Description", "Url"))
        meta = {"link": {"title": title, "description": description, "url": url}}
        text = "\n".join(p for p in (title, description, url) if p)
    elif kind == "event":
        event = _text(fields, "Event").lower()
        key = _text(fields, "EventKey")
        if key:
            meta = {"event_key": key}
    else:
        log.info("wechat: ignoring message type %r", kind[:32])
        return None
    if msg_id:
        external_id = msg_id
    else:  # events carry no MsgId: WeChat says dedupe them on FromUserName + CreateTime
        external_id = f"{sender}:{_text(fields, 'CreateTime')}"
    return PushMessage(
        kind=kind,
        sender=sender,
        recipient=recipient,
        external_id=external_id,
        created_at=created,
        text=text,
        event=event,
        meta=meta,
    )


def _text(fields: Mapping[str, Any], key: str) -> str:
    value = fields.get(key, "")
    return value if isinstance(value, str) else ""


def _int(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None


def _float(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number == number and abs(number) != float("inf") else None


class WeChatAdapter(PushAdapter):
    """One Official Account."""

    scheme = "wechat"
    events = frozenset({"subscribe", "unsubscribe"})

    def __init__(self, ctx: AdapterContext, config: WeChatConfig) -> None:
        self.config = config
        self.crypto: MessageCrypto | None = None
        if config.mode != "plain" and config.encoding_aes_key:  # checked by _check
            self.crypto = MessageCrypto(
                config.token.reveal(), config.encoding_aes_key.reveal(), config.app_id
            )
        super().__init__(ctx, config, secret=config.token.reveal())
        self.access_token = AccessToken(
            self._fetch_token, ctx.state.scoped(f"wechat:{config.app_id}")
        )
        self._progress = SentParts()
        """Reply id -> parts already sent, for a retried multi-part reply."""

    def signs_query_only(self, query: Mapping[str, str]) -> bool:
        """Plain pushes: ``signature`` covers token, timestamp and nonce, not the message.
        Encrypted ones carry ``msg_signature`` over the ciphertext as well."""
        return query.get("encrypt_type", "raw").lower() != "aes"

    def decode(self, query: Mapping[str, str], body: bytes) -> Decoded:
        encrypted = query.get("encrypt_type", "raw").lower() == "aes"
        if self.config.mode == "safe" and not encrypted:
            raise SignatureError("safe mode: unencrypted push refused")
        fields = parse_xml(body)
        if encrypted:
            if self.crypto is None:
                raise PayloadError("encrypted push but no encoding_aes_key configured")
            cipher_text = fields.get("Encrypt")
            if not isinstance(cipher_text, str) or not cipher_text:
                raise PayloadError("Encrypt missing")
            timestamp = query.get("timestamp", "")
            nonce = query.get("nonce", "")
            if self.verify:
                if not signature_matches(
                    query.get("msg_signature", ""), self.secret, timestamp, nonce, cipher_text
                ):
                    raise SignatureError("msg_signature mismatch")
                if not timestamp_within(timestamp, self.ctx.clock.now_us(), self.window_s):
                    raise SignatureError("timestamp outside the window")
            fields = parse_xml(self.crypto.decrypt(cipher_text))
        else:
            self.check(query)
        msg = decode_message(fields)
        return Decoded(msg, self._passive(msg, query, encrypted))

    def _passive(self, msg: PushMessage | None, query: Mapping[str, str], encrypted: bool) -> Any:
        def reply(text: str) -> web.Response:
            if msg is None:
                return self.success()
            now_s = self.ctx.clock.now_us() // 1_000_000
            xml = text_reply_xml(msg.sender, msg.recipient, now_s, text)
            if encrypted and self.crypto is not None:
                xml = self.crypto.encrypted_reply(
                    xml, query.get("timestamp", ""), query.get("nonce", "")
                )
            return web.Response(text=xml, content_type="application/xml")

        return reply

    async def fetch_attachments(self, msg: PushMessage) -> tuple[Attachment, ...]:
        """Download image and voice media within the budget; keep media_id when that fails."""
        media_id = msg.meta.get("media_id")
        if (
            msg.kind not in self.config.fetch_media
            or not isinstance(media_id, str)
            or not media_id
            or not self.config.app_secret
        ):
            return ()
        try:
            async with asyncio.timeout(float(self.config.media_budget)):
                return (await self._download(msg.kind, media_id),)
        except (TimeoutError, SendError, TokenError, AttachmentTooLarge) as exc:
            reason = type(exc).__name__ if not isinstance(exc, SendError) else str(exc)
            log.warning("%s: media not fetched: %s", self.name, reason)
            msg.meta["attachment_errors"] = [f"{media_id[:64]}: {reason}"]
        return ()

    async def _download(self, kind: str, media_id: str) -> Attachment:
        token = await self.access_token.get()
        limit = self.ctx.attachments.max_size
        try:
            async with self.session.get(
                f"{self.config.api_base}/cgi-bin/media/get",
                params={"access_token": token, "media_id": media_id},
            ) as resp:
                ctype = resp.content_type
                if resp.status != 200 or ctype in ("application/json", "text/plain"):
                    body = await read_capped(resp.content, 4096) or b""
                    try:
                        code = orjson.loads(body).get("errcode")
                    except (orjson.JSONDecodeError, AttributeError):
                        code = None
                    if code in _TOKEN_EXPIRED:
                        await self.access_token.invalidate(token)
                    raise SendError(f"media/get errcode {code}, HTTP {resp.status}", retryable=True)
                data = await read_capped(resp.content, limit)
                if data is None:
                    raise AttachmentTooLarge(f"more than {limit} bytes")
        except aiohttp.ClientError as exc:
            raise SendError(f"media/get: {type(exc).__name__}", retryable=True) from None
        name = f"{kind}-{media_id[:32]}{_EXTENSIONS.get(ctype, '')}"
        return await self.ctx.attachments.put(data, name, ctype)

    async def _fetch_token(self, force: bool) -> tuple[str, float]:
        if not self.config.app_secret:
            raise TokenError("app_secret is not configured")
        credentials = {
            "grant_type": "client_credential",
            "appid": self.config.app_id,
            "secret": self.config.app_secret.reveal(),
        }
        if self.config.stable_token:
            result = await call_json(
                self.session,
                "POST",
                f"{self.config.api_base}/cgi-bin/stable_token",
                json={**credentials, "force_refresh": force},
            )
        else:
            result = await call_json(
                self.session, "GET", f"{self.config.api_base}/cgi-bin/token", params=credentials
            )
        token = result.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError(f"errcode {result.get('errcode')}")
        expires = result.get("expires_in", 7200)
        return token, float(expires) if isinstance(expires, (int, float)) else 7200.0

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Send the reply through the customer-service message API: the text, then each image
        attachment (uploaded as temporary media). Other attachments cannot go to WeChat and are
        listed in the receipt. A retried reply resumes after the parts already sent.
        """
        openid = contact.sender.address.removeprefix("wechat:")
        images = [a for a in reply.attachments if a.content_type in _IMAGE_TYPES]
        skipped = [a.name for a in reply.attachments if a.content_type not in _IMAGE_TYPES]
        parts: list[str | Attachment] = [reply.text] if reply.text else []
        parts += images
        key = reply.id or f"{contact.id}:{hash(reply.text)}"
        first: str | None = None
        for index in range(self._progress.resume(key), len(parts)):
            part = parts[index]
            try:
                if isinstance(part, str):
                    payload = {"touser": openid, "msgtype": "text", "text": {"content": part}}
                else:
                    media_id = await self._upload_image(part)
                    payload = {
                        "touser": openid,
                        "msgtype": "image",
                        "image": {"media_id": media_id},
                    }
                result = await self._api_post("/cgi-bin/message/custom/send", payload)
            except SendError:
                self._progress.keep(key, index, len(parts))
                raise
            msgid = result.get("msgid")
            first = first or (None if msgid is None else str(msgid))
        return SendReceipt(external_id=first, detail={"skipped": skipped} if skipped else None)

    async def _api_post(self, path: str, payload: Any) -> dict[str, Any]:
        """POST JSON to the API with the access token; refresh it once if WeChat rejects it."""
        for attempt in (1, 2):
            try:
                token = await self.access_token.get()
            except TokenError as exc:
                raise SendError(f"access token: {exc}", retryable=True) from None
            result = await call_json(
                self.session,
                "POST",
                f"{self.config.api_base}{path}",
                params={"access_token": token},
                json=payload,
            )
            code = result.get("errcode", 0)
            if code == 0:
                return result
            if code in _TOKEN_EXPIRED and attempt == 1:
                await self.access_token.invalidate(token)
                continue
            retryable = code in _RETRYABLE or code in _TOKEN_EXPIRED
            raise SendError(f"errcode {code}", retryable=retryable)
        raise SendError("access token rejected twice", retryable=True)  # pragma: no cover

    async def _upload_image(self, attachment: Attachment) -> str:
        """Upload an image as temporary media (kept 3 days by WeChat); return its media_id."""
        try:
            data = await asyncio.to_thread(self.ctx.attachments.read, attachment.sha256)
        except (FileNotFoundError, ValueError):
            raise SendError(
                f"{attachment.name}: not in the attachment store", retryable=False
            ) from None
        for attempt in (1, 2):
            try:
                token = await self.access_token.get()
            except TokenError as exc:
                raise SendError(f"access token: {exc}", retryable=True) from None
            form = aiohttp.FormData()
            # an ASCII name: WeChat reads the type from it, the citizen never sees it
            name = f"{attachment.sha256[:16]}{_IMAGE_TYPES[attachment.content_type]}"
            form.add_field("media", data, filename=name, content_type=attachment.content_type)
            try:
                async with self.session.post(
                    f"{self.config.api_base}/cgi-bin/media/upload",
                    params={"access_token": token, "type": "image"},
                    data=form,
                    timeout=aiohttp.ClientTimeout(total=30),
                ) as resp:
                    raw = await read_capped(resp.content, 1 << 16)
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise SendError(f"media/upload: {type(exc).__name__}", retryable=True) from None
            try:
                result = orjson.loads(raw or b"")
            except orjson.JSONDecodeError:
                raise SendError(f"media/upload: HTTP {status}", retryable=status >= 500) from None
            media_id = result.get("media_id") if isinstance(result, dict) else None
            if isinstance(media_id, str) and media_id:
                return media_id
            code = result.get("errcode") if isinstance(result, dict) else None
            if code in _TOKEN_EXPIRED and attempt == 1:
                await self.access_token.invalidate(token)
                continue
            raise SendError(f"media/upload errcode {code}", retryable=code in _RETRYABLE)
        raise SendError("access token rejected twice", retryable=True)  # pragma: no cover


_IMAGE_TYPES: Final = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif"}


def _check(config: WeChatConfig, key: str, settings: AdapterSettings) -> None:
    if config.mode == "plain":
        return
    where = f"{key}.encoding_aes_key"
    if not config.encoding_aes_key:
        raise ConfigError([(where, f"required in {config.mode} mode")])
    try:
        MessageCrypto(config.token.reveal(), config.encoding_aes_key.reveal(), config.app_id)
    except ValueError as exc:
        raise ConfigError([(where, str(exc))]) from None


CHANNEL: ChannelType[WeChatConfig] = ChannelType(
    name="wechat",
    channel="chat",
    config=WeChatConfig,
    factory=WeChatAdapter,
    check=_check,
    example={"app_id": "wx0123456789abcdef", "token": "change-me"},
    sender_contacts=SENDER_CONTACTS,
)
