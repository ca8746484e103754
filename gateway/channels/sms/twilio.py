"""Twilio Programmable Messaging: form webhooks in, the Messages API out, status callbacks.

Every request Twilio makes carries ``X-Twilio-Signature``: base64 HMAC-SHA1, keyed with the
auth token, over the URL Twilio was configured with followed by each POST parameter name and
value in sorted order. The URL is the gateway's public one (proxies change what we see), tried
with and without the default port as Twilio's own validators do. MMS media is fetched from
Twilio into the attachment store before the contact is submitted; the answer is TwiML.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit
from xml.sax.saxutils import escape

import aiohttp
import orjson
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, Receipt, SendError, SendReceipt
from gateway.channels.common import Refused
from gateway.channels.sms import common
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.phone import mask_phone
from gateway.records import Attachment, Contact, Reply, clean_text
from gateway.server.auth import secrets_equal
from gateway.server.config import AdapterSettings, ConfigError, Duration, Secret
from gateway.server.http import read_body

log = logging.getLogger(__name__)

TWIML_EMPTY = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
MAX_MEDIA = 10


@dataclass(frozen=True, slots=True)
class TwilioConfig:
    """``[adapters.NAME]`` with ``type = "twilio"``."""

    account_sid: str
    auth_token: Secret
    path: str = "/sms/twilio"
    public_url: str = ""
    """Base URL Twilio calls (``https://gw.example.gov.cn``); default ``[http] public_url``."""
    verify_signature: bool = True
    region: str = "CN"
    from_number: str = ""
    """``From`` of replies; default: the number the citizen wrote to."""
    messaging_service_sid: str = ""
    """Send through a Messaging Service instead of ``From``."""
    api_base_url: str = "https://api.twilio.com"
    """Messages API and media host (tests point it at a local server)."""
    ack_text: str = ""
    """Auto-acknowledgement returned as TwiML ``<Message>``; ``{ref}``, ``{id}`` filled."""
    max_body: int = 64 * 1024
    max_segments: int = 10
    media_timeout: Duration = Duration(10)
    """Time allowed for fetching all media of one message (Twilio waits 15 s for the answer)."""
    send_timeout: Duration = Duration(10)


def signature(url: str, params: Sequence[tuple[str, str]], token: str) -> str:
    """Return the X-Twilio-Signature Twilio computes for ``url`` and POST ``params``."""
    data = url
    for name in sorted({k for k, _ in params}):
        for value in sorted({v for k, v in params if k == name}):  # as twilio's own libraries
            data += name + value
    digest = hmac.new(token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def _url_variants(url: str) -> list[str]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    with_port = f"{host}:{parts.port or default}" if default or parts.port else host
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = userinfo + "@" if userinfo else ""
    variants = [url]
    for netloc in (prefix + host, prefix + with_port):
        candidate = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        if candidate not in variants:
            variants.append(candidate)
    return variants


def verify(url: str, params: Sequence[tuple[str, str]], token: str, given: str) -> bool:
    """Check a signature in constant time against ``url`` with and without its port."""
    ok = False
    for candidate in _url_variants(url):
        ok |= secrets_equal(signature(candidate, params, token), given)
    return ok


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """Decode an ``application/x-www-form-urlencoded`` body (UTF-8); raise ``BadRequest``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise common.BadRequest("form is not UTF-8") from exc
    try:
        return parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=200)
    except (ValueError, UnicodeDecodeError) as exc:
        raise common.BadRequest("malformed form") from exc


@dataclass(frozen=True, slots=True)
class TwilioMessage:
    """One inbound message, as Twilio posts it."""

    sid: str
    account_sid: str
    sender: str
    recipient: str
    body: str
    media: tuple[tuple[str, str], ...]
    segments: int | None
    extra: dict[str, str]


def parse_message(params: Sequence[tuple[str, str]]) -> TwilioMessage:
    """Read the fields of an inbound message webhook; raise ``BadRequest``."""
    form: dict[str, str] = {}
    for k, v in params:
        form.setdefault(k, v)
    sid = form.get("MessageSid") or form.get("SmsMessageSid") or form.get("SmsSid") or ""
    sender = form.get("From", "")
    if not sid:
        raise common.BadRequest("missing MessageSid")
    if not sender.strip():
        raise common.BadRequest("missing From")
    if len(sid) > 64 or len(sender) > 64:
        raise common.BadRequest("field too long")
    try:
        num_media = int(form.get("NumMedia") or 0)
    except ValueError as exc:
        raise common.BadRequest("NumMedia is not a number") from exc
    if not 0 <= num_media <= MAX_MEDIA:
        raise common.BadRequest("NumMedia out of range")
    media = []
    for i in range(num_media):
        url = form.get(f"MediaUrl{i}", "")
        if not url:
            raise common.BadRequest(f"missing MediaUrl{i}")
        media.append((url, form.get(f"MediaContentType{i}", "application/octet-stream")))
    segments_raw = form.get("NumSegments", "")
    extra = {
        k: form[k][:64]
        for k in ("FromCountry", "ToCountry", "MessagingServiceSid", "ApiVersion")
        if form.get(k)
    }
    return TwilioMessage(
        sid=sid,
        account_sid=form.get("AccountSid", ""),
        sender=sender.strip(),
        recipient=form.get("To", "").strip(),
        body=clean_text(form.get("Body", "")),
        media=tuple(media),
        segments=int(segments_raw) if segments_raw.isascii() and segments_raw.isdigit() else None,
        extra=extra,
    )


def twiml(message: str | None) -> bytes:
    """Return a TwiML answer, with one ``<Message>`` when ``message`` is given."""
    if not message:
        return TWIML_EMPTY
    return (
        b'<?xml version="1.0" encoding="UTF-8"?><Response><Message>'
        + escape(message).encode("utf-8")
        + b"</Message></Response>"
    )


class TwilioAdapter(common.SmsWebhook):
    """One Twilio account (or sub-account) and its numbers."""

    provider = "twilio"

    def __init__(self, ctx: AdapterContext, config: TwilioConfig) -> None:
        super().__init__(ctx, path=config.path, report_suffix="/status", region=config.region)
        self.config = config
        self.route(("POST",), self.receive, self.status_callback)

    def _session_for_use(self) -> aiohttp.ClientSession:
        # aiohttp drops this header when a media redirect leaves the API host.
        auth = aiohttp.encode_basic_auth(self.config.account_sid, self.config.auth_token.reveal())
        return self.session(self.config.api_base_url, headers={"Authorization": auth})

    @property
    def base_url(self) -> str:
        return (self.config.public_url or self.ctx.settings.http.public_url).rstrip("/")

    def _public_url(self, request: web.Request) -> str:
        query = request.rel_url.raw_query_string
        return self.base_url + request.rel_url.raw_path + (f"?{query}" if query else "")

    async def _authenticated_form(
        self, request: web.Request
    ) -> tuple[list[tuple[str, str]] | None, web.Response | None]:
        try:
            body = await read_body(request, self.config.max_body)
        except web.HTTPRequestEntityTooLarge:
            return None, web.Response(status=413, text="request body too large\n")
        if self.config.verify_signature:
            given = request.headers.get("X-Twilio-Signature", "")
            if not given:
                return None, common.unauthorized("twilio")
        try:
            params = parse_form(body)
        except common.BadRequest as exc:
            if self.config.verify_signature:
                return None, common.forbidden()  # cannot even be the signed form
            return None, common.bad_request(str(exc))
        if self.config.verify_signature and not verify(
            self._public_url(request), params, self.config.auth_token.reveal(), given
        ):
            return None, common.forbidden()
        return params, None

    async def receive(self, request: web.Request) -> web.StreamResponse:
        """Handle one inbound SMS/MMS webhook."""
        received_at = self.ctx.clock.now_us()
        params, refused = await self._authenticated_form(request)
        if refused is not None or params is None:
            return refused or common.forbidden()
        try:
            msg = parse_message(params)
            sender, recipient = self.addresses(msg.sender, msg.recipient)
        except common.BadRequest as exc:
            return common.bad_request(str(exc))
        if msg.account_sid and not secrets_equal(msg.account_sid, self.config.account_sid):
            return common.forbidden()
        attachments, media_errors = await self._fetch_media(msg.media)
        meta: dict[str, Any] = dict(msg.extra)
        if msg.segments is not None:
            meta["segments"] = msg.segments
        if media_errors:
            meta["media_errors"] = media_errors
        try:
            receipt = await self.take(
                external_id=msg.sid, sender=sender, recipient=recipient, received_at=received_at,
                text=msg.body, attachments=attachments, **meta,
            )
        except Refused as exc:
            return exc.answer()
        return await self._answer(receipt)

    async def _answer(self, receipt: Receipt) -> web.Response:
        message = None
        if self.config.ack_text:
            message = common.render_ack(self.config.ack_text, receipt.contact_id)
            await self.stamp_ack(receipt.contact_id, "twiml")
        return web.Response(status=200, body=twiml(message), content_type="text/xml")

    async def _fetch_media(
        self, media: tuple[tuple[str, str], ...]
    ) -> tuple[tuple[Attachment, ...], list[dict[str, str]]]:
        """Fetch MMS media from Twilio; failures are kept as errors, never lose the message."""
        if not media:
            return (), []
        allowed = urlsplit(self.config.api_base_url)
        results: list[Attachment] = []
        errors: list[dict[str, str]] = []
        limit = self.ctx.settings.intake.max_attachment
        session = self._session_for_use()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.config.media_timeout)  # for all media together
        for i, (url, content_type) in enumerate(media):
            target = urlsplit(url)
            if (target.scheme, target.netloc) != (allowed.scheme, allowed.netloc):
                errors.append({"url": url[:500], "error": "not a media URL of the API host"})
                continue
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining):
                    data = await self._download(session, url, limit)
                ext = mimetypes.guess_extension(content_type.split(";")[0].strip()) or ""
                results.append(
                    await self.ctx.attachments.put(data, f"media{i}{ext}", content_type)
                )
            except (TimeoutError, aiohttp.ClientError, AttachmentTooLarge, OSError) as exc:
                log.warning("MMS media %d not fetched: %s", i, type(exc).__name__)
                errors.append({"url": url[:500], "error": type(exc).__name__})
        return tuple(results), errors

    @staticmethod
    async def _download(session: aiohttp.ClientSession, url: str, limit: int) -> bytes:
        async with session.get(url) as resp:
            resp.raise_for_status()
            data = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                data += chunk
                if len(data) > limit:
                    raise AttachmentTooLarge(f"> {limit} bytes")
            return bytes(data)

    async def status_callback(self, request: web.Request) -> web.Response:
        """Handle a StatusCallback for one of our replies."""
        params, refused = await self._authenticated_form(request)
        if refused is not None or params is None:
            return refused or common.forbidden()
        form = dict(params)
        query = dict(parse_qsl(request.rel_url.query_string))
        contact_id, ref = query.get("c", ""), query.get("r", "")
        status = form.get("MessageStatus") or form.get("SmsStatus") or ""
        if not contact_id or not ref or not status:
            return common.bad_request("missing c, r or MessageStatus")
        kind: Literal["delivered", "failed"] | None = None
        if status == "delivered":
            kind = "delivered"
        elif status in ("failed", "undelivered"):
            kind = "failed"
        detail: dict[str, Any] = {"status": status}
        if form.get("MessageSid"):
            detail["sid"] = form["MessageSid"][:64]
        if form.get("ErrorCode"):
            detail["error_code"] = form["ErrorCode"][:16]
        return await self.report(contact_id, ref, kind, detail,
                                 web.Response(body=TWIML_EMPTY, content_type="text/xml"))

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Create one Message through the Messages API; Twilio splits it into segments."""
        cfg = self.config
        text, segments = common.reply_segments(reply.text, cfg.max_segments)
        ref = self.reply_ref(contact, reply)
        form = {"To": contact.sender.address, "Body": text}
        if cfg.messaging_service_sid:
            form["MessagingServiceSid"] = cfg.messaging_service_sid
        else:
            form["From"] = cfg.from_number or contact.recipient
        if self.base_url:
            form["StatusCallback"] = (
                f"{self.base_url}{self.status_path}?{urlencode({'c': contact.id, 'r': ref})}"
            )
        url = f"{cfg.api_base_url.rstrip('/')}/2010-04-01/Accounts/{cfg.account_sid}/Messages.json"
        status, headers, body = await common.call(
            self._session_for_use(), "POST", url, data=form,
            headers={"Accept": "application/json"},
            timeout_s=float(cfg.send_timeout), provider="twilio",
        )
        common.check_status(status, headers, body, "twilio")
        try:
            answer = orjson.loads(body)
            sid = str(answer["sid"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise SendError("twilio answered without a message sid", retryable=False) from exc
        log.info("reply %s to %s created as %s", ref, mask_phone(contact.sender.address), sid)
        return SendReceipt(
            external_id=sid,
            detail={"ref": ref, "segments": segments.count, "encoding": segments.encoding},
        )


def _check(config: TwilioConfig, key: str, settings: AdapterSettings) -> None:
    if not config.auth_token:
        raise ConfigError([(f"{key}.auth_token", "must not be empty")])
    if config.verify_signature and not (config.public_url or settings.http.public_url):
        raise ConfigError([(
            f"{key}.public_url",
            "required to verify X-Twilio-Signature (or set [http] public_url)",
        )])


CHANNEL: ChannelType[TwilioConfig] = ChannelType(
    name="twilio",
    channel="sms",
    config=TwilioConfig,
    factory=TwilioAdapter,
    check=_check,
    example={
        "account_sid": "AC00000000000000000000000000000000",
        "auth_token": "change-me",
        "path": "/sms/twilio",
        "public_url": "https://gateway.example.gov.cn",
    },
)
