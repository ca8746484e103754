"""Kannel: smsbox ``sms-service`` get-url/post-url in, ``sendsms`` out, ``dlr-url`` reports back.

Inbound, the sms-service calls ``<path>?from=%p&to=%P&text=%b&time=%T&id=%I&coding=%c&charset=%C
&udh=%u&smsc=%i`` (get-url), or POSTs the raw text with ``X-Kannel-*`` headers (post-url, with at
least ``?id=%I`` in its URL). ``%b`` carries the message bytes exactly as Kannel holds them: UCS-2
(coding 2) as UTF-16BE unless smsbox ``mo-recode`` turned it into UTF-8, 8-bit data in whatever the
handset or SMSC used (the regional fallback charsets decide), 7-bit text as UTF-8. The text is
decoded from those bytes by the declared coding and charset, never by guessing.

The body of our 200 answer is sent to the handset by Kannel, so it is empty unless the
auto-acknowledgement is on; non-GSM text is flagged with ``X-Kannel-Coding: 2`` (the sms-service
needs ``accept-x-kannel-headers = true``). Kannel repeats a failed request identically, so a
contact is deduplicated on ``%I``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode

import phonenumbers
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, Receipt, SendError, SendReceipt
from gateway.channels.common import Refused
from gateway.channels.sms import common
from gateway.channels.sms.concat import Part, group_key, parse_udh
from gateway.channels.sms.segments import split, substitute
from gateway.channels.sms.smsbox import (
    CODING_7BIT,
    REGIONAL_8BIT,
    ascii_text,
    decode_text,
    is_number,
    parse_query,
    parse_request,
)
from gateway.contact.clock import MICROS_PER_SECOND
from gateway.contact.phone import mask_phone
from gateway.records import Contact, Reply
from gateway.server.auth import secrets_equal
from gateway.server.config import AdapterSettings, ConfigError, Duration, Secret
from gateway.server.http import read_body

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class KannelConfig:
    """``[adapters.NAME]`` with ``type = "kannel"``."""

    path: str = "/sms/kannel"
    secret: Secret | None = None
    """Password Kannel sends: in the URL's user info (Basic auth, preferred) or as ``key=``."""
    username: str = "kannel"
    """User name expected with Basic auth."""
    insecure_no_auth: bool = False
    """Accept unauthenticated requests (a Kannel on a trusted network only)."""
    allow_from: tuple[str, ...] = ()
    """smsbox's addresses or networks: requests from any other peer are refused (403). With it
    the get-url needs no secret, which Kannel would write to its logs with the URL."""
    region: str = "CN"
    """Default region for numbers without a country code."""
    eight_bit_charsets: tuple[str, ...] = ()
    """Charsets tried in order for 8-BIT data; default by region (CN: gb18030), then latin-1."""
    max_body: int = 64 * 1024
    ack_text: str = ""
    """Auto-acknowledgement sent back as the answer body; ``{ref}`` and ``{id}`` are filled."""
    concat_timeout: Duration = Duration(60)
    """How long parts of a concatenated message wait for the rest."""
    sendsms_url: str = ""
    """``http://kannel:13013/cgi-bin/sendsms``; empty: replies cannot be sent."""
    sendsms_username: str = ""
    sendsms_password: Secret | None = None
    sender_id: str = ""
    """``from`` of replies; default: the number the citizen wrote to."""
    smsc: str = ""
    dlr_mask: int = 27
    """1 delivered + 2 undeliverable + 8 SMSC accepted + 16 SMSC rejected."""
    public_url: str = ""
    """Base URL Kannel reaches the gateway at, for the dlr-url; default ``[http] public_url``."""
    number_format: Literal["e164", "digits", "national"] = "e164"
    """How ``to`` is written on sendsms: ``+8613800138000``, ``8613800138000`` or national."""
    max_segments: int = 10
    gsm_substitutions: bool = True
    """Send curly quotes and dashes as their GSM-7 look-alikes instead of switching to UCS-2."""
    send_timeout: Duration = Duration(10)


class KannelAdapter(common.SmsWebhook):
    """One Kannel smsbox: inbound sms-service, outbound sendsms, delivery reports."""

    provider = "kannel"

    def __init__(self, ctx: AdapterContext, config: KannelConfig) -> None:
        self.allowed = common.networks(config.allow_from, f"adapters.{ctx.name}.allow_from")
        super().__init__(ctx, path=config.path, report_suffix="/dlr", region=config.region,
                         parts=float(config.concat_timeout),
                         secret=config.secret or config.sendsms_password)
        self.config = config
        self.eight_bit = config.eight_bit_charsets or REGIONAL_8BIT.get(config.region.upper(), ())
        self.route(("GET", "POST"), self.receive, self.delivery_report)

    # ------------------------------------------------------------------ inbound

    def _authorized(self, request: web.Request, params_key: str | None) -> web.Response | None:
        if self.allowed and not common.peer_in(request, self.allowed):
            return common.forbidden()
        secret = self.config.secret
        if not secret:
            return None
        creds = common.basic_password(request.headers.get("Authorization"))
        if creds is not None:
            user_ok = secrets_equal(creds[0], self.config.username)
            pass_ok = secrets_equal(creds[1], secret.reveal())
            return None if user_ok and pass_ok else common.forbidden()
        if params_key is not None:
            return None if secrets_equal(params_key, secret.reveal()) else common.forbidden()
        return common.unauthorized()

    async def receive(self, request: web.Request) -> web.StreamResponse:
        """Handle one sms-service request."""
        received_at = self.ctx.clock.now_us()
        try:
            body = await read_body(request, self.config.max_body)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="request body too large\n")
        raw_query = request.rel_url.raw_query_string
        if len(raw_query) > self.config.max_body:
            return web.Response(status=413, text="query too large\n")
        params = parse_query(raw_query)
        key = params.get("key")
        denied = self._authorized(request, None if key is None else key.decode("latin-1"))
        if denied is not None:
            return denied
        post = request.method == "POST"
        headers = {k.lower(): v for k, v in request.headers.items()} if post else {}
        try:
            msg = parse_request(request.method, params, headers, body)
            sender, recipient = self.addresses(msg.sender, msg.recipient)
        except common.BadRequest as exc:
            return common.bad_request(str(exc))
        origin_at = None if msg.time is None else msg.time * MICROS_PER_SECOND
        concat = parse_udh(msg.udh) if msg.udh else None
        if concat is not None and concat.total > 1:
            part = Part(
                group=group_key(sender, recipient, concat),
                seq=concat.seq,
                total=concat.total,
                external_id=msg.id,
                data=msg.data,
                charset=f"{msg.coding}:{msg.charset}",
                received_at=received_at,
                origin_at=origin_at,
                sender=sender,
                recipient=recipient,
                meta={"smsc": msg.smsc, "ref": concat.ref},
            )
            added = await self.take_part(part)
            if isinstance(added, web.Response):
                return added
            if isinstance(added.handed_over, Receipt):
                return await self._answer(added.handed_over)
            return self._empty()
        text, used = decode_text(msg.data, msg.coding, msg.charset, self.eight_bit)
        try:
            receipt = await self.take(
                external_id=msg.id, sender=sender, recipient=recipient, received_at=received_at,
                text=text, origin_at=origin_at, smsc=msg.smsc, coding=msg.coding,
                charset=msg.charset, decoded_as=used,
            )
        except Refused as exc:
            return exc.answer()
        return await self._answer(receipt)

    def _empty(self) -> web.Response:
        return web.Response(status=200, body=b"", content_type="text/plain", charset="utf-8")

    async def _answer(self, receipt: Receipt) -> web.Response:
        if not self.config.ack_text:
            return self._empty()
        text = common.render_ack(self.config.ack_text, receipt.contact_id)
        if self.config.gsm_substitutions:
            text = substitute(text) if split(substitute(text)).encoding == "gsm7" else text
        coding = "0" if split(text).encoding == "gsm7" else "2"
        await self.stamp_ack(receipt.contact_id, "answer")
        return web.Response(
            status=200,
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Kannel-Coding": coding},
        )

    async def handover(self, parts: list[Part], complete: bool) -> Receipt:
        texts: list[str] = []
        used: list[str] = []
        # Join the bytes before decoding: a UCS-2 surrogate pair or a GBK double byte may
        # straddle two parts. Parts with another coding (rare) are decoded as their own run.
        for hint, run in itertools.groupby(parts, key=lambda p: p.charset):
            coding, _, charset = hint.partition(":")
            text, codec = decode_text(
                b"".join(p.data for p in run),
                int(coding) if is_number(coding) else CODING_7BIT,
                charset,
                self.eight_bit,
            )
            texts.append(text)
            used.append(codec)
        first = parts[0]
        inbound = self.assembled(
            parts, complete, "".join(texts), smsc=first.meta.get("smsc", ""),
            decoded_as=used[0] if len(set(used)) == 1 else used,
        )
        receipt = await self.ctx.intake.submit(inbound)
        log.info(
            "SMS from %s assembled from %d/%d parts as %s",
            mask_phone(first.sender),
            len(parts),
            first.total,
            receipt.contact_id,
        )
        if not complete and self.config.ack_text and self.config.sendsms_url:
            # Handed over at the timeout: no request left to answer, so the ack goes by sendsms.
            self.send_ack_later(receipt.contact_id, self.config.ack_text, self.send, "sendsms")
        return receipt

    # ------------------------------------------------------------------ delivery reports

    async def delivery_report(self, request: web.Request) -> web.Response:
        """Handle a Kannel dlr-url callback for one of our replies."""
        query = parse_query(request.rel_url.raw_query_string)
        params = {k: ascii_text(v) for k, v in query.items()}
        contact_id, ref, tag = params.get("c", ""), params.get("r", ""), params.get("s", "")
        if not contact_id or not ref or not tag or not is_number(params.get("status", "")):
            return common.bad_request("missing c, r, s or status")
        if not await self.references.valid(contact_id, ref, tag):
            return common.forbidden()
        status = int(params["status"])
        kind: Literal["delivered", "failed"] | None
        if status & 1:
            kind = "delivered"
        elif status & (2 | 16):
            kind = "failed"
        else:
            kind = None  # 4 buffered, 8 accepted by the SMSC: not final
        detail: dict[str, Any] = {"dlr": status}
        if params.get("answer"):
            detail["answer"] = params["answer"][:160]
        return await self.report(contact_id, ref, kind, detail, web.Response(text="OK\n"))

    # ------------------------------------------------------------------ outbound

    def _format_number(self, address: str) -> str:
        if self.config.number_format == "e164" or not address.startswith("+"):
            return address
        if self.config.number_format == "digits":
            return address[1:]
        try:
            number = phonenumbers.parse(address, None)
        except phonenumbers.NumberParseException:
            return address
        return str(number.national_number)

    async def dlr_url(self, contact_id: str, ref: str) -> str:
        """Return the dlr-url for one reply: our own reference, signed, plus Kannel's escapes."""
        base = (self.config.public_url or self.ctx.settings.http.public_url).rstrip("/")
        tag = await self.references.tag(contact_id, ref)
        query = urlencode({"c": contact_id, "r": ref, "s": tag})
        return f"{base}{self.status_path}?{query}&status=%d&answer=%A&ts=%T"

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Send one reply through sendsms; Kannel splits it (coding and charset say how)."""
        cfg = self.config
        if not cfg.sendsms_url:
            raise SendError("no sendsms_url configured", retryable=False)
        text, segments = common.reply_segments(reply.text, cfg.max_segments,
                                               gsm_substitutions=cfg.gsm_substitutions)
        ref = self.reply_ref(contact, reply)
        params = {
            "username": cfg.sendsms_username,
            "password": cfg.sendsms_password.reveal() if cfg.sendsms_password else "",
            "from": cfg.sender_id or contact.recipient,
            "to": self._format_number(contact.sender.address),
            "text": text,
            "charset": "UTF-8",
            "coding": "0" if segments.encoding == "gsm7" else "2",
        }
        if cfg.smsc:
            params["smsc"] = cfg.smsc
        if cfg.dlr_mask and (cfg.public_url or self.ctx.settings.http.public_url):
            params["dlr-mask"] = str(cfg.dlr_mask)
            params["dlr-url"] = await self.dlr_url(contact.id, ref)
        status, headers, body = await common.call(
            self.session(cfg.sendsms_url),
            "GET",
            cfg.sendsms_url,
            params=params,
            timeout_s=float(cfg.send_timeout),
            provider="kannel sendsms",
        )
        common.check_status(status, headers, body, "kannel sendsms")
        log.info(
            "reply %s to %s accepted by kannel (%d %s segments)",
            ref,
            mask_phone(contact.sender.address),
            segments.count,
            segments.encoding,
        )
        return SendReceipt(
            external_id=None,
            detail={"ref": ref, "segments": segments.count, "encoding": segments.encoding},
        )


def _check(config: KannelConfig, key: str, settings: AdapterSettings) -> None:
    errors: list[tuple[str, str]] = []
    try:
        common.networks(config.allow_from, f"{key}.allow_from")
    except ConfigError as exc:
        errors.extend(exc.errors)
    if not config.secret and not config.allow_from and not config.insecure_no_auth:
        errors.append((f"{key}.secret", "required (or allow_from, or insecure_no_auth = true)"))
    errors += common.charset_errors(
        config.eight_bit_charsets or REGIONAL_8BIT.get(config.region.upper(), ()),
        f"{key}.eight_bit_charsets",
    )
    if errors:
        raise ConfigError(errors)


CHANNEL: ChannelType[KannelConfig] = ChannelType(
    name="kannel",
    channel="sms",
    config=KannelConfig,
    factory=KannelAdapter,
    check=_check,
    example={"path": "/sms/kannel", "secret": "change-me", "region": "CN"},
)
