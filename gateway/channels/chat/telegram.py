"""Telegram bot: channel type ``telegram`` (python-telegram-bot).

Two ways in, chosen by ``mode``:

- ``webhook``: PTB is built with ``.updater(None)``; Telegram posts updates to our route on the
  gateway's HTTP server, where ``X-Telegram-Bot-Api-Secret-Token`` is checked in constant time,
  the update is decoded with ``Update.de_json`` and answered 200 only once its contact is durable
  (503 otherwise, and Telegram retries). ``setWebhook`` is called on start when configured.
- ``polling``: for hosts without a public URL. We drive ``getUpdates`` ourselves through the PTB
  ``Bot``: the next offset, which confirms an update to Telegram, is asked for only after that
  update's contact is durable. Telegram allows one poller per bot, so in a fleet the poller
  runs under the lease ``telegram:<bot id>`` (``AdapterContext.leases``): one instance polls,
  another takes over within ``[fleet] lease_ttl`` when it dies. What the old holder took but did
  not confirm is fetched again and dedupes (give the adapter the same name on every instance).

Text, photo, document, voice, video, location, venue and contact messages become contacts
(files fetched with ``getFile`` into the attachment store); edited messages are follow-ups on
the same thread; in groups only messages that address the bot are taken.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal

from aiohttp import web
from telegram import Bot, Message, Update
from telegram.error import (
    BadRequest,
    ChatMigrated,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import Application, ApplicationBuilder
from telegram.warnings import PTBUserWarning

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.chat import SENDER_CONTACTS
from gateway.channels.chat.telegram_updates import (
    FileRef,
    decode_update,
    derived_secret,
    language_of,
    split_text,
    start_payload,
)
from gateway.channels.common import Refused, SentParts, retry_later, submit
from gateway.contact import safejson
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.clock import Micros
from gateway.queueing.coordination import Fence
from gateway.records import Attachment, Contact, Inbound, Reply
from gateway.server.config import Duration, Secret
from gateway.server.egress import SendRate, proxy_for
from gateway.server.http import read_body
from gateway.server.supervise import Backoff

log = logging.getLogger(__name__)

ALLOWED_UPDATES: Final = ("message", "edited_message")
SECRET_HEADER: Final = "X-Telegram-Bot-Api-Secret-Token"  # noqa: S105 - a header name
_POLL_TIMEOUT: Final = Duration(30)
_MAX_FILE: Final = 20 * 1024 * 1024
"""The Bot API serves files up to 20 MB to bots."""


@dataclass(frozen=True, slots=True)
class TelegramConfig:
    """``[adapters.NAME]`` with ``type = "telegram"``."""

    token: Secret
    mode: Literal["webhook", "polling"] = "webhook"
    path: str = ""
    """Webhook path on the gateway's HTTP server; default ``/chat/telegram/<name>``."""
    secret_token: Secret | None = None
    """X-Telegram-Bot-Api-Secret-Token; default: derived from the bot token."""
    verify: bool = True
    set_webhook: bool = True
    """Call setWebhook on start (webhook mode) with ``webhook_url`` or public_url + path."""
    webhook_url: str = ""
    drop_pending_updates: bool = False
    """Drop the updates Telegram holds when the bot changes over to this webhook (or from a
    webhook to polling); a start that finds it registered already drops nothing."""
    api_base: str = "https://api.telegram.org/bot"
    file_base: str = "https://api.telegram.org/file/bot"
    poll_timeout: Duration = _POLL_TIMEOUT
    max_file: int = _MAX_FILE
    welcome: str = ""
    """Sent at once to a citizen who starts the bot (``/start``); not a case reply, no SLA."""
    start_contacts: bool = False
    """``/start`` (sent by Telegram when a citizen opens the bot) becomes a contact too
    (``meta.command = "start"``, ``meta.start_payload`` for deep links); default: not."""


# ---------------------------------------------------------------- the adapter


class TelegramAdapter:
    """One bot, in webhook or polling mode."""

    channel = "chat"

    def __init__(self, ctx: AdapterContext, config: TelegramConfig) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.config = config
        self.path = config.path or f"/chat/telegram/{ctx.name}"
        token = config.token.reveal()
        self.secret = (
            config.secret_token.reveal() if config.secret_token else derived_secret(token)
        ).encode()
        builder = (
            ApplicationBuilder()
            .token(token)
            .base_url(config.api_base)
            .base_file_url(config.file_base)
            .updater(None)
        )
        proxy = proxy_for(ctx.settings.egress, config.api_base)
        if proxy:  # otherwise httpx honours HTTPS_PROXY / NO_PROXY itself
            builder = builder.proxy(proxy).get_updates_proxy(proxy)
        self.application: Application[Any, Any, Any, Any, Any, Any] = builder.build()
        self.bot: Bot = self.application.bot
        self.offset: int | None = None
        """Polling: the next offset to ask for (every update below it is durable)."""
        self.ready = asyncio.Event()
        self._loop = f"telegram-{ctx.name}"
        self._running = False
        self._initialized = False
        self._welcomed: dict[str, None] = {}
        self._progress = SentParts()
        """Reply id -> parts already sent, for a retried multi-part reply."""
        if config.mode == "webhook":
            ctx.router.add_route("POST", self.path, self.handle_webhook)

    async def start(self) -> None:
        """Bring the bot up in the background: an unreachable Telegram must not stop the gateway.

        ``ready`` is set once getMe (and setWebhook or deleteWebhook) succeeded; until then the
        webhook answers 503, so Telegram retries.
        """
        if not self._running:
            self._running = True
            # in webhook mode the loop ends once the bot is up: a finished start-up, not a
            # loop down (required, it would fail /readyz for good); polling runs for ever
            polling = self.config.mode == "polling"
            self.ctx.supervisor.spawn(self._loop, self._run, required=polling)

    async def stop(self) -> None:
        """Stop polling (releasing the poller's lease) and shut PTB down; idempotent."""
        if self._running:
            self._running = False
            await self.ctx.supervisor.stop(self._loop)
        if self._initialized:
            self._initialized = False
            self.ready.clear()
            await self.application.stop()
            await self.application.shutdown()

    async def _run(self) -> None:
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                await self._bring_up()
                break
            except (InvalidToken, Forbidden) as exc:
                log.error("%s: Telegram refused the bot token (%s)", self.name, type(exc).__name__)
                await asyncio.sleep(60)
            except Exception as exc:  # network, DNS, a bad api_base: keep trying
                log.warning("%s: bot not up yet (%s); retrying", self.name, type(exc).__name__)
                await backoff.sleep()
        self.ready.set()
        if self.config.mode == "polling":
            await self.ctx.leases.exclusive(f"telegram:{self.bot.id}", self._poll_held)

    async def _poll_held(self, fence: Fence) -> None:
        log.info("%s: polling (lease fence %d)", self.name, fence.token)
        await self._poll()

    async def _bring_up(self) -> None:
        if not self._initialized:
            await self.application.initialize()
            await self.application.start()
            self._initialized = True
        if self.config.mode == "polling":
            await self.bot.delete_webhook(drop_pending_updates=await self._drop_pending(""))
            return
        public = self.ctx.settings.http.public_url
        url = self.config.webhook_url or (public.rstrip("/") + self.path if public else "")
        if self.config.set_webhook and url:
            await self.bot.set_webhook(
                url,
                allowed_updates=list(ALLOWED_UPDATES),
                drop_pending_updates=await self._drop_pending(url),
                secret_token=self.secret.decode(),
            )
            log.info("%s: webhook set", self.name)
        elif self.config.set_webhook:
            log.warning("%s: no http.public_url or webhook_url: setWebhook skipped", self.name)

    async def _drop_pending(self, url: str) -> bool:
        """``drop_pending_updates`` applies when the bot changes over to ``url`` (to polling:
        ""), not at every start: each worker and instance starts (and restarts) the adapter,
        and a drop then lost updates the running ones had not been sent or fetched yet."""
        if not self.config.drop_pending_updates:
            return False
        info = await self.bot.get_webhook_info()
        return bool(info.url != url)

    # -------------------------------------------------------------- intake

    async def take(self, update: Update, received_at: Micros) -> str | None:
        """Make one update durable; return its contact id (None when ignored).

        ``received_at`` is when the update was first seen (before it was parsed). Raises
        ``Refused`` when it was not taken (not durable: 503).
        """
        try:
            msg = decode_update(update, self.bot.id, self.bot.username)
        except (AttributeError, TypeError, ValueError) as exc:
            # PTB builds an update with missing fields left None (a message without a chat)
            log.warning("%s: malformed update ignored: %s", self.name, type(exc).__name__)
            return None
        if msg is None:
            return None
        payload = start_payload(msg)
        if payload is not None:
            msg.meta.update(command="start", start_payload=payload)
            if self.config.welcome and not msg.edited and msg.external_id not in self._welcomed:
                self._welcomed[msg.external_id] = None  # Telegram may deliver it again
                while len(self._welcomed) > 10_000:
                    self._welcomed.pop(next(iter(self._welcomed)))
                await self._welcome(msg.chat_id)
            if not self.config.start_contacts:
                log.info("%s: /start not taken as a contact", self.name)
                return None
        attachments = tuple([a for ref in msg.files if (a := await self._fetch(ref, msg.meta))])
        inbound = Inbound(
            channel="chat",
            adapter=self.name,
            external_id=msg.external_id,
            sender=msg.sender,
            recipient="@" + self.bot.username,
            received_at=received_at,
            text=msg.text,
            language=language_of(msg),
            attachments=attachments,
            thread=f"telegram:{msg.chat_id}",
            origin_at=msg.origin_at,
            meta=msg.meta,
        )
        receipt = await submit(self.ctx, inbound)
        return receipt.contact_id

    async def _welcome(self, chat_id: int) -> None:
        try:
            await self.bot.send_message(chat_id, self.config.welcome)
        except TelegramError as exc:  # best effort: the citizen can still write
            log.warning("%s: welcome not sent: %s", self.name, type(exc).__name__)

    async def _fetch(self, ref: FileRef, meta: dict[str, Any]) -> Attachment | None:
        if ref.size is not None and ref.size > self.config.max_file:
            meta.setdefault("attachment_errors", []).append(f"{ref.name}: too large")
            return None
        try:
            tg_file = await self.bot.get_file(ref.file_id)
            if tg_file.file_size is not None and tg_file.file_size > self.config.max_file:
                raise AttachmentTooLarge(str(tg_file.file_size))
            data = bytes(await tg_file.download_as_bytearray())
            return await self.ctx.attachments.put(data, ref.name, ref.content_type)
        except AttachmentTooLarge:
            meta.setdefault("attachment_errors", []).append(f"{ref.name}: too large")
        except TelegramError as exc:
            log.warning("%s: file not fetched: %s", self.name, type(exc).__name__)
            meta.setdefault("attachment_errors", []).append(f"{ref.name}: {type(exc).__name__}")
        return None

    async def handle_webhook(self, request: web.Request) -> web.Response:
        """Take one update posted by Telegram."""
        received_at = self.ctx.clock.now_us()
        if self.config.verify:
            given = request.headers.get(SECRET_HEADER, "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, self.secret):
                log.warning("%s: webhook refused: bad secret token", self.name)
                return web.Response(status=403, text="forbidden")
        if not self.ready.is_set():
            return retry_later()
        body = await read_body(request, self.ctx.settings.http.max_body)
        try:
            data = safejson.loads(body)
            if not isinstance(data, dict) or type(data.get("update_id")) is not int:
                raise ValueError("not an update")
            update = Update.de_json(data, self.bot)
        except Exception as exc:  # PTB raises assorted errors for bad shapes
            log.warning("%s: malformed update: %s", self.name, type(exc).__name__)
            return web.Response(status=400, text="bad request")
        try:
            await self.take(update, received_at)
        except Refused as exc:
            return exc.answer()
        return web.Response(text="")

    async def _poll(self) -> None:
        backoff = Backoff(1.0, 30.0)
        timeout = max(int(self.config.poll_timeout), 0)
        while True:
            try:
                updates = await self.bot.get_updates(
                    offset=self.offset,
                    timeout=timeout,
                    allowed_updates=list(ALLOWED_UPDATES),
                    read_timeout=10,  # PTB adds the long-poll timeout to it
                )
                received_at = self.ctx.clock.now_us()
                backoff.reset()
            except RetryAfter as exc:
                await asyncio.sleep(_retry_after_s(exc))
                continue
            except (InvalidToken, Forbidden) as exc:
                log.error(
                    "%s: getUpdates refused (%s); retrying in 60 s", self.name, type(exc).__name__
                )
                await asyncio.sleep(60)
                continue
            except (TypeError, KeyError, ValueError, AttributeError):  # an update PTB cannot build
                try:
                    updates = await self._updates_one_by_one()
                except Exception as exc:
                    log.warning("%s: getUpdates failed: %s", self.name, type(exc).__name__)
                    await backoff.sleep()
                    continue
                received_at = self.ctx.clock.now_us()
            except Exception as exc:  # network errors
                log.warning("%s: getUpdates failed: %s", self.name, type(exc).__name__)
                await backoff.sleep()
                continue
            if not await self._take_batch(updates, received_at):
                await backoff.sleep()

    async def _updates_one_by_one(self) -> tuple[Update, ...]:
        """The pending batch read raw and built one update at a time: an update the library
        cannot build (a Bot API newer than it, a malformed one) is logged and stands as an
        empty update of its id, so it is confirmed instead of stopping polling for good."""
        with warnings.catch_warnings():  # PTB suggests get_updates: the very call that fails
            warnings.simplefilter("ignore", PTBUserWarning)
            raw = await self.bot.do_api_request(
                "getUpdates",
                api_kwargs={"offset": self.offset, "timeout": 0,
                            "allowed_updates": list(ALLOWED_UPDATES)},
                return_type=None,
            )
        updates: list[Update] = []
        for item in raw if isinstance(raw, list) else []:
            update_id = item.get("update_id") if isinstance(item, dict) else None
            if not isinstance(update_id, int):
                continue
            try:
                update = Update.de_json(item, self.bot)
            except Exception as exc:
                log.warning("%s: update %d cannot be read (%s); skipped", self.name, update_id,
                            type(exc).__name__)
                update = Update(update_id)
            if update is not None:
                updates.append(update)
        return tuple(updates)

    async def _take_batch(self, updates: Sequence[Update], received_at: Micros) -> bool:
        """Take one getUpdates batch; return False when some update could not be taken.

        Chats go in parallel, each chat's updates in order (a failure holds that chat's later
        updates back). The offset then moves over the longest prefix of the batch that is all
        durable: nothing after an update that failed is confirmed (what was taken after it is
        fetched again and dedupes).
        """
        pending = [u for u in updates if self.offset is None or u.update_id >= self.offset]
        chains: dict[int | None, list[Update]] = {}
        for update in pending:
            chat = update.effective_chat
            chains.setdefault(chat.id if chat is not None else None, []).append(update)
        taken: set[int] = set()

        async def run(chain: list[Update]) -> None:
            for update in chain:
                try:
                    await self.take(update, received_at)
                except Refused as exc:
                    if exc.status != 400:  # not durable now: the chain waits for the next poll
                        log.warning("%s: update %d not taken (%s); it stays unconfirmed",
                                    self.name, update.update_id, exc)
                        return
                    # Intake can never take it: confirming it is the only way the chat's
                    # later updates are ever taken (as a webhook answers it 400)
                    log.warning("%s: update %d refused for good (%s); skipped",
                                self.name, update.update_id, exc.reason)
                except Exception as exc:  # a disk error storing a file
                    log.warning(
                        "%s: update %d not taken (%s); it stays unconfirmed",
                        self.name,
                        update.update_id,
                        type(exc).__name__,
                    )
                    return
                taken.add(update.update_id)

        await asyncio.gather(*(run(chain) for chain in chains.values()))
        for update in pending:
            if update.update_id not in taken:
                return False
            self.offset = update.update_id + 1
        return True

    # -------------------------------------------------------------- replies

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Send a reply to the contact's chat: the text (split at Telegram's 4096-character
        limit), then each attachment as a photo or a document.

        A retried reply resumes after the parts already sent (same process), so a flood-control
        pause in the middle of a long answer does not repeat its beginning.
        """
        chat_id = contact.meta.get("chat_id")
        if not isinstance(chat_id, int):
            raise SendError("contact has no Telegram chat id", retryable=False)
        reply_to = contact.meta.get("message_id")
        parts: list[str | Attachment] = [*split_text(reply.text), *reply.attachments]
        key = reply.id or f"{contact.id}:{hash(reply.text)}"
        done = self._progress.resume(key)
        first: str | None = None
        for index in range(done, len(parts)):
            try:
                sent = await self._send_part(
                    chat_id, parts[index], reply_to if index == 0 else None
                )
            except SendError:
                self._progress.keep(key, index, len(parts))
                raise
            first = first or f"{sent.chat.id}:{sent.message_id}"
        return SendReceipt(external_id=first)

    async def _send_part(self, chat_id: int, part: str | Attachment, reply_to: Any) -> Message:
        for attempt in (1, 2):
            try:
                if isinstance(part, str):
                    return await self.bot.send_message(
                        chat_id,
                        part,
                        reply_to_message_id=reply_to if isinstance(reply_to, int) else None,
                        allow_sending_without_reply=True,
                    )
                data = await asyncio.to_thread(self.ctx.attachments.read, part.sha256)
                if part.content_type in _PHOTO_TYPES and part.size <= _MAX_PHOTO:
                    return await self.bot.send_photo(chat_id, data, filename=part.name)
                return await self.bot.send_document(chat_id, data, filename=part.name)
            except ChatMigrated as exc:  # the group became a supergroup: send there
                if attempt == 2:
                    raise SendError("chat migrated twice", retryable=False) from None
                chat_id = exc.new_chat_id
            except RetryAfter as exc:
                raise SendError(
                    "flood control", retryable=True, retry_after_s=_retry_after_s(exc)
                ) from None
            except Forbidden:
                raise SendError(
                    "forbidden: the user blocked the bot or left", retryable=False
                ) from None
            except (BadRequest, InvalidToken) as exc:
                raise SendError(f"refused: {type(exc).__name__}", retryable=False) from None
            except NetworkError as exc:
                raise SendError(f"network: {type(exc).__name__}", retryable=True) from None
            except TelegramError as exc:
                raise SendError(f"telegram: {type(exc).__name__}", retryable=True) from None
            except (FileNotFoundError, ValueError):
                raise SendError("attachment not in the store", retryable=False) from None
        raise SendError("chat migrated", retryable=False)  # pragma: no cover


_PHOTO_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/webp"})
_MAX_PHOTO: Final = 10 * 1024 * 1024

def _retry_after_s(exc: RetryAfter) -> float:
    value: Any = getattr(exc, "_retry_after", None)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value) if isinstance(value, (int, float)) else 1.0


CHANNEL: ChannelType[TelegramConfig] = ChannelType(
    name="telegram",
    channel="chat",
    config=TelegramConfig,
    factory=TelegramAdapter,
    example={"token": "123456:ABC-DEF", "mode": "polling"},
    # core.telegram.org/bots/faq: about 30 messages a second per bot, one a second per chat
    send_rate=SendRate(per_second=30, burst=30, per_recipient=1),
    sender_contacts=SENDER_CONTACTS,
)

__all__ = ["CHANNEL", "TelegramAdapter", "TelegramConfig", "decode_update"]
