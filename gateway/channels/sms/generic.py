"""A generic SMS webhook for any other aggregator: JSON or form, field names from the config.

Authentication is an HMAC-SHA256 of the raw body in a header (hex or base64, with or without a
``sha256=`` prefix) or a shared secret in a header; the operator may turn it off. Replies go
out through an HTTP template (JSON, form or query) whose values are filled per message, so the
text is always encoded by the serializer and never spliced into a string. Delivery reports
come back on ``<path>/status`` carrying the signed reference we put in ``{ref}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

import aiohttp
import orjson
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, Receipt, SendError, SendReceipt
from gateway.channels.common import Refused, SentParts
from gateway.channels.sms import common
from gateway.channels.sms.concat import Concat, Part, group_key
from gateway.contact import safejson
from gateway.contact.clock import MICROS_PER_SECOND, Micros, from_datetime
from gateway.contact.phone import mask_phone
from gateway.records import Contact, Reply, clean_text
from gateway.server.auth import secrets_equal
from gateway.server.config import AdapterSettings, ConfigError, Duration, Secret
from gateway.server.http import read_body

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FieldNames:
    """Where the aggregator puts each fact (dotted paths reach into JSON objects)."""

    sender: str = "from"
    recipient: str = "to"
    text: str = "text"
    id: str = "id"
    """Empty: the aggregator sends no id; a hash of the content is used for deduplication."""
    time: str = "timestamp"
    """Unix seconds (or milliseconds) or RFC 3339."""
    concat_ref: str = ""
    concat_total: str = ""
    concat_part: str = ""


@dataclass(frozen=True, slots=True)
class StatusFields:
    """How the aggregator reports delivery on ``<path>/status``."""

    reference: str = "reference"
    status: str = "status"
    delivered: tuple[str, ...] = ("delivered", "DELIVRD")
    failed: tuple[str, ...] = (
        "failed", "undelivered", "rejected", "expired", "UNDELIV", "REJECTD", "EXPIRED",
    )


@dataclass(frozen=True, slots=True)
class SendTemplate:
    """One HTTP request per reply (or per segment with ``split``)."""

    url: str = ""
    method: Literal["POST", "GET"] = "POST"
    format: Literal["json", "form"] = "json"
    fields: dict[str, str] = field(
        default_factory=lambda: {"to": "{to}", "from": "{from}", "text": "{text}",
                                 "reference": "{ref}"}
    )
    """Values may use {to} {to_digits} {from} {text} {ref} {part} {parts} {encoding}."""
    headers: dict[str, str] = field(default_factory=dict)
    authorization: Secret | None = None
    """Sent as the ``Authorization`` header."""
    split: bool = False
    """Send each segment as its own request (the aggregator does not split)."""
    timeout: Duration = Duration(10)


@dataclass(frozen=True, slots=True)
class GenericConfig:
    """``[adapters.NAME]`` with ``type = "sms-webhook"``."""

    path: str = "/sms/webhook"
    auth: Literal["hmac-sha256", "shared-secret", "none"] = "hmac-sha256"
    secret: Secret | None = None
    signature_header: str = "X-Signature"
    secret_header: str = "X-Webhook-Secret"  # noqa: S105 (a header name)
    fields: FieldNames = field(default_factory=FieldNames)
    status: StatusFields = field(default_factory=StatusFields)
    send: SendTemplate = field(default_factory=SendTemplate)
    region: str = "CN"
    recipient: str = ""
    """Recipient when the aggregator does not say (the hotline number)."""
    sender_id: str = ""
    """``{from}`` of replies; default: the number the citizen wrote to."""
    max_body: int = 64 * 1024
    response_body: str = ""
    response_content_type: str = "text/plain"
    ack_text: str = ""
    """Auto-acknowledgement sent through the send template; ``{ref}``, ``{id}`` filled."""
    concat_timeout: Duration = Duration(60)
    max_segments: int = 10


@dataclass(frozen=True, slots=True)
class GenericMessage:
    sender: str
    recipient: str
    text: str
    id: str
    origin_at: Micros | None
    concat: Concat | None


def _lookup(data: Any, path: str) -> Any:
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def parse_fields(content_type: str, body: bytes, raw_query: str) -> dict[str, Any]:
    """Decode a JSON object, a form body or (for GET) the query; raise ``BadRequest``."""
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "application/json" or ctype.endswith("+json"):
        try:
            data = safejson.loads(body)
        except safejson.BadJson as exc:
            raise common.BadRequest(f"malformed JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise common.BadRequest("JSON body must be an object")
        return data
    source = body if body else raw_query.encode("latin-1", "replace")
    try:
        text = source.decode("utf-8")
        return dict(parse_qsl(text, keep_blank_values=True, errors="strict", max_num_fields=200))
    except (UnicodeDecodeError, ValueError) as exc:
        raise common.BadRequest("malformed form (UTF-8 expected)") from exc


def _time(value: str) -> Micros:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        try:
            return from_datetime(datetime.fromisoformat(text.replace("Z", "+00:00")))
        except ValueError as exc:
            raise common.BadRequest("time is neither unix time nor RFC 3339") from exc
    if not 0 <= number < 1e14:
        raise common.BadRequest("time out of range")
    seconds = number / 1000 if number > 1e11 else number
    return int(seconds * MICROS_PER_SECOND)


def parse_message(
    data: dict[str, Any], names: FieldNames, default_recipient: str
) -> GenericMessage:
    """Pick the configured fields out of a decoded payload; raise ``BadRequest``."""
    sender = _scalar(_lookup(data, names.sender)) or ""
    if not sender.strip():
        raise common.BadRequest(f"missing sender ({names.sender})")
    text_value = _lookup(data, names.text)
    if text_value is not None and not isinstance(text_value, str):
        raise common.BadRequest(f"{names.text} must be a string")
    text = clean_text(text_value or "")
    recipient = _scalar(_lookup(data, names.recipient)) or default_recipient
    time_raw = _scalar(_lookup(data, names.time)) if names.time else None
    origin_at = _time(time_raw) if time_raw else None
    if names.id:
        message_id = _scalar(_lookup(data, names.id)) or ""
        if not message_id.strip():
            raise common.BadRequest(f"missing message id ({names.id})")
    else:
        digest = hashlib.sha256(f"{sender}\x1f{recipient}\x1f{time_raw}\x1f{text}".encode())
        message_id = "sha256:" + digest.hexdigest()[:32]
    if len(message_id) > 128 or len(sender) > 64 or len(recipient) > 64:
        raise common.BadRequest("field too long")
    concat = None
    if names.concat_ref and names.concat_total and names.concat_part:
        values = [_scalar(_lookup(data, n)) for n in
                  (names.concat_ref, names.concat_total, names.concat_part)]
        if all(values):
            try:
                ref, total, seq = (int(v or "") for v in values)
            except ValueError as exc:
                raise common.BadRequest("concatenation fields must be integers") from exc
            if not (0 <= ref < 65536 and 1 <= seq <= total <= 255):
                raise common.BadRequest("concatenation fields out of range")
            concat = Concat(ref, total, seq)
    return GenericMessage(sender.strip(), recipient.strip(), text, message_id.strip(),
                          origin_at, concat)


def verify_hmac(secret: str, body: bytes, given: str) -> bool:
    """Check an HMAC-SHA256 of ``body``: hex or base64, optionally prefixed ``sha256=``."""
    value = given.strip()
    if value.lower().startswith("sha256="):
        value = value[7:]
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
    hex_ok = secrets_equal(value.lower(), digest.hex())
    b64_ok = secrets_equal(value, base64.b64encode(digest).decode("ascii"))
    return hex_ok | b64_ok


class GenericAdapter(common.SmsWebhook):
    """A configurable SMS webhook, its reply template and its delivery reports."""

    provider = "sms-webhook"

    def __init__(self, ctx: AdapterContext, config: GenericConfig) -> None:
        super().__init__(ctx, path=config.path, report_suffix="/status", region=config.region,
                         parts=float(config.concat_timeout), secret=config.secret)
        self.config = config
        self._progress = SentParts()
        self.route(("GET", "POST"), self.receive, self.status_report)

    # ------------------------------------------------------------------ inbound

    def _check(self, request: web.Request, body: bytes) -> web.Response | None:
        cfg = self.config
        if cfg.auth == "none" or not cfg.secret:
            return None
        header = cfg.signature_header if cfg.auth == "hmac-sha256" else cfg.secret_header
        given = request.headers.get(header, "")
        if not given:
            return common.unauthorized("sms-webhook")
        if cfg.auth == "hmac-sha256":
            signed = body if body else request.rel_url.raw_query_string.encode("latin-1", "replace")
            ok = verify_hmac(cfg.secret.reveal(), signed, given)
        else:
            ok = secrets_equal(given, cfg.secret.reveal())
        return None if ok else common.forbidden()

    async def _read(
        self, request: web.Request
    ) -> tuple[dict[str, Any] | None, web.Response | None]:
        try:
            body = await read_body(request, self.config.max_body)
        except web.HTTPRequestEntityTooLarge:
            return None, web.Response(status=413, text="request body too large\n")
        denied = self._check(request, body)
        if denied is not None:
            return None, denied
        try:
            raw_query = request.rel_url.raw_query_string if request.method == "GET" else ""
            return parse_fields(request.headers.get("Content-Type", ""), body, raw_query), None
        except common.BadRequest as exc:
            return None, common.bad_request(str(exc))

    async def receive(self, request: web.Request) -> web.StreamResponse:
        """Handle one inbound message."""
        received_at = self.ctx.clock.now_us()
        data, refused = await self._read(request)
        if refused is not None or data is None:
            return refused or common.bad_request("empty")
        try:
            msg = parse_message(data, self.config.fields, self.config.recipient)
            sender, recipient = self.addresses(msg.sender, msg.recipient)
        except common.BadRequest as exc:
            return common.bad_request(str(exc))
        if msg.concat is not None and msg.concat.total > 1:
            part = Part(
                group=group_key(sender, recipient, msg.concat),
                seq=msg.concat.seq,
                total=msg.concat.total,
                external_id=msg.id,
                data=msg.text.encode("utf-8"),
                charset="utf-8",
                received_at=received_at,
                origin_at=msg.origin_at,
                sender=sender,
                recipient=recipient,
                meta={"ref": msg.concat.ref},
            )
            added = await self.take_part(part)  # the hand-over acknowledges, whenever it happens
            return added if isinstance(added, web.Response) else self._answer()
        try:
            receipt = await self.take(
                external_id=msg.id, sender=sender, recipient=recipient, received_at=received_at,
                text=msg.text, origin_at=msg.origin_at,
            )
        except Refused as exc:
            return exc.answer()
        self._acknowledge(receipt)
        return self._answer()

    def _answer(self) -> web.Response:
        return web.Response(
            status=200,
            body=self.config.response_body.encode("utf-8"),
            headers={"Content-Type": self.config.response_content_type},
        )

    async def handover(self, parts: list[Part], complete: bool) -> Receipt:
        inbound = self.assembled(
            parts, complete, b"".join(p.data for p in parts).decode("utf-8", "replace")
        )
        receipt = await self.ctx.intake.submit(inbound)
        self._acknowledge(receipt)
        return receipt

    def _acknowledge(self, receipt: Receipt) -> None:
        if not self.config.ack_text or not self.config.send.url or receipt.status == "duplicate":
            return
        self.send_ack_later(receipt.contact_id, self.config.ack_text, self._send_reply, "sms")

    async def _send_reply(self, contact: Contact, reply: Reply) -> SendReceipt:
        return await self._deliver(contact, reply.text, reply.id or "")

    # ------------------------------------------------------------------ delivery reports

    async def reference(self, contact_id: str, ref: str) -> str:
        """Return the reference handed to the aggregator: contact, reply, signature."""
        return f"{contact_id}:{ref}:{await self.references.tag(contact_id, ref)}"

    async def status_report(self, request: web.Request) -> web.Response:
        """Handle a delivery report carrying one of our references."""
        data, refused = await self._read(request)
        if refused is not None or data is None:
            return refused or common.bad_request("empty")
        names = self.config.status
        reference = _scalar(_lookup(data, names.reference)) or ""
        status = _scalar(_lookup(data, names.status)) or ""
        contact_id, _, rest = reference.partition(":")
        ref, _, tag = rest.rpartition(":")
        if not contact_id or not ref or not tag or not status:
            return common.bad_request(f"missing {names.reference} or {names.status}")
        if not await self.references.valid(contact_id, ref, tag):
            return common.forbidden()
        kind: Literal["delivered", "failed"] | None = None
        if status in names.delivered:
            kind = "delivered"
        elif status in names.failed:
            kind = "failed"
        return await self.report(contact_id, ref, kind, {"status": status[:40]}, self._answer())

    # ------------------------------------------------------------------ outbound

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Send one reply through the template."""
        return await self._deliver(contact, reply.text, self.reply_ref(contact, reply))

    async def _deliver(self, contact: Contact, text: str, ref: str) -> SendReceipt:
        tpl = self.config.send
        if not tpl.url:
            raise SendError("no send.url configured", retryable=False)
        text, segments = common.reply_segments(text, self.config.max_segments)
        pieces = segments.parts if tpl.split else (text,)
        start = sent = self._progress.resume(ref)  # a retry resumes after the parts sent
        session = self.session(tpl.url)
        headers = dict(tpl.headers)
        if tpl.authorization:
            headers["Authorization"] = tpl.authorization.reveal()
        try:
            for index in range(start, len(pieces)):
                await self._send_piece(contact, ref, tpl, headers, session, pieces, index,
                                       segments.encoding)
                sent = index + 1
        finally:
            self._progress.keep(ref, sent, len(pieces))
        log.info("reply %s to %s sent (%d requests)", ref, mask_phone(contact.sender.address),
                 len(pieces) - start)
        return SendReceipt(
            external_id=None,
            detail={"ref": ref, "segments": segments.count, "encoding": segments.encoding},
        )

    async def _send_piece(self, contact: Contact, ref: str, tpl: SendTemplate,
                          headers: dict[str, str], session: aiohttp.ClientSession,
                          pieces: tuple[str, ...], index: int, encoding: str) -> None:
        """One request of the send template: part ``index`` of the reply."""
        values = {
            "to": contact.sender.address,
            "to_digits": contact.sender.address.lstrip("+"),
            "from": self.config.sender_id or contact.recipient,
            "text": pieces[index],
            "ref": await self.reference(contact.id, ref),
            "part": str(index + 1),
            "parts": str(len(pieces)),
            "encoding": encoding,
        }
        payload = {k: _fill(v, values) for k, v in tpl.fields.items()}
        kwargs: dict[str, Any]
        if tpl.method == "GET":
            kwargs = {"params": payload}
        elif tpl.format == "json":
            kwargs = {"data": orjson.dumps(payload),
                      "headers": {**headers, "Content-Type": "application/json"}}
        else:
            kwargs = {"data": payload}
        kwargs.setdefault("headers", headers)
        status, resp_headers, body = await common.call(
            session, tpl.method, tpl.url, timeout_s=float(tpl.timeout),
            provider="sms-webhook send", **kwargs,
        )
        common.check_status(status, resp_headers, body, "sms-webhook send")


def _fill(template: str, values: dict[str, str]) -> str:
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out


def _check(config: GenericConfig, key: str, settings: AdapterSettings) -> None:
    if config.auth != "none" and not config.secret:
        raise ConfigError([(f"{key}.secret", f"required with auth = {config.auth!r}")])


CHANNEL: ChannelType[GenericConfig] = ChannelType(
    name="sms-webhook",
    channel="sms",
    config=GenericConfig,
    factory=GenericAdapter,
    check=_check,
    example={"path": "/sms/webhook", "auth": "hmac-sha256", "secret": "change-me"},
)
