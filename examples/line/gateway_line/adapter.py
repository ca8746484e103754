"""LINE Messaging API: the webhook in, push messages out.

The LINE Platform POSTs a JSON body ``{"destination": ..., "events": [...]}`` signed in
``X-Line-Signature`` = base64(HMAC-SHA256(channel secret, raw body)). Text message events
become contacts (deduplicated by ``webhookEventId``, which a redelivery keeps); other events
are acknowledged and ignored. The answer is 200 only once every contact of the body is durable;
otherwise 503, and LINE redelivers (with webhook redelivery on in the console). Replies go out
as push messages (``POST /v2/bot/message/push``) with the channel access token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.common import Refused, submit
from gateway.records import Contact, Inbound, Reply, Sender, clean_text
from gateway.server.config import Duration, Secret
from gateway.server.egress import client_session
from gateway.server.http import read_body

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LineConfig:
    """``[adapters.NAME]`` with ``type = "line"``."""

    channel_secret: Secret
    channel_access_token: Secret
    path: str = "/line/webhook"
    api_base_url: str = "https://api.line.me"
    max_body: int = 256 * 1024
    timeout: Duration = Duration(10)


def signature(secret: str, body: bytes) -> str:
    """LINE's ``X-Line-Signature`` of ``body``."""
    digest = hmac.new(secret.encode("utf-8"), body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


class BadBody(Exception):
    """The body is not a LINE webhook body."""


def text_events(body: bytes) -> tuple[str, list[dict[str, Any]]]:
    """The bot's user id and the text message events of a webhook body; raise ``BadBody``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadBody("malformed JSON") from exc
    events = data.get("events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        raise BadBody("no events array")
    found = []
    for event in events:
        if not isinstance(event, dict) or event.get("type") != "message":
            continue
        message, source = event.get("message"), event.get("source")
        if not isinstance(message, dict) or message.get("type") != "text":
            continue
        if not isinstance(source, dict) or not isinstance(source.get("userId"), str):
            raise BadBody("message event without source.userId")
        if not isinstance(message.get("text"), str) or not isinstance(message.get("id"), str):
            raise BadBody("text message without text or id")
        found.append(event)
    destination = data.get("destination")
    return (destination if isinstance(destination, str) else ""), found


class LineAdapter:
    """Receives LINE webhooks on the gateway's HTTP server and pushes replies."""

    channel = "chat"

    def __init__(self, ctx: AdapterContext, config: LineConfig) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        ctx.router.add_post(config.path, self.receive)

    async def start(self) -> None:
        """Routes are on the gateway's server: nothing to start."""

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def receive(self, request: web.Request) -> web.Response:
        received_at = self.ctx.clock.now_us()
        try:  # bounded even without a Content-Length (chunked)
            body = await read_body(request, self.config.max_body)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="body too large\n")
        given = request.headers.get("X-Line-Signature", "")
        expected = signature(self.config.channel_secret.reveal(), body)
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            return web.Response(status=401 if not given else 403, text="bad signature\n")
        try:
            destination, events = text_events(body)
        except BadBody as exc:
            return web.Response(status=400, text=f"{exc}\n")
        for event in events:
            message = event["message"]
            inbound = Inbound(
                channel="chat",
                adapter=self.name,
                external_id=str(event.get("webhookEventId") or message["id"]),
                sender=Sender("line:" + event["source"]["userId"]),
                recipient=destination,
                received_at=received_at,
                text=clean_text(message["text"]),
                origin_at=int(event["timestamp"]) * 1000
                if isinstance(event.get("timestamp"), int) else None,
                meta={"provider": "line", "message_id": message["id"]},
            )
            try:  # durable, or the shared answer: 503/429 + Retry-After, 400
                receipt = await submit(self.ctx, inbound)
            except Refused as exc:
                return exc.answer()
            log.debug("LINE message %s as %s", receipt.status, receipt.contact_id)
        return web.Response(status=200, text="ok\n")

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Push one text message to the user the contact came from."""
        user = contact.sender.address.removeprefix("line:")
        url = self.config.api_base_url.rstrip("/") + "/v2/bot/message/push"
        if self._session is None:  # the operator's egress proxy, as every adapter's
            self._session = client_session(self.ctx.settings.egress, url)
        headers = {"Authorization": f"Bearer {self.config.channel_access_token.reveal()}",
                   "Content-Type": "application/json"}
        if reply.id:
            headers["X-Line-Retry-Key"] = _retry_key(reply.id)
        payload = {"to": user, "messages": [{"type": "text", "text": reply.text[:5000]}]}
        try:
            async with self._session.post(
                url, data=orjson.dumps(payload), headers=headers,
                timeout=aiohttp.ClientTimeout(total=float(self.config.timeout)),
            ) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendError(f"LINE push: {type(exc).__name__}", retryable=True) from exc
        if status == 409:  # the retry key was accepted before: already sent
            return SendReceipt(external_id=None, detail={"duplicate": True})
        if status >= 300:
            log.warning("LINE push answered %d", status)
            raise SendError(f"LINE push answered {status}", retryable=status in (429,) or
                            status >= 500)
        return SendReceipt(external_id=None, detail={})


def _retry_key(reply_id: str) -> str:
    """LINE's retry key is a UUID: one derived from the reply's id, stable across retries."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, "gateway-reply:" + reply_id))


def _factory(ctx: AdapterContext, config: LineConfig) -> LineAdapter:
    return LineAdapter(ctx, config)


CHANNEL: ChannelType[LineConfig] = ChannelType(
    name="line",
    channel="chat",
    config=LineConfig,
    factory=_factory,
    example={"channel_secret": "change-me", "channel_access_token": "change-me"},
)
