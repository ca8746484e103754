"""Telegram's side of the wire, without the bot: an update decoded into the message we take (text,
files, location, who and where), whether a group message addresses the bot, the webhook secret
derived from the token, and texts cut to Telegram's limits (UTF-16 code units)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from telegram import Message, MessageEntity, Update

from gateway.contact.clock import Micros, from_datetime
from gateway.contact.language import guess_language
from gateway.records import Sender, clean_text

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file to fetch with getFile."""

    file_id: str
    name: str
    content_type: str
    size: int | None


@dataclass(frozen=True, slots=True)
class TelegramMessage:
    """One decoded message (before its files are fetched)."""

    chat_id: int
    message_id: int
    external_id: str
    kind: str
    sender: Sender
    text: str
    edited: bool
    origin_at: Micros | None
    files: tuple[FileRef, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def derived_secret(token: str) -> str:
    """Return the default webhook secret: 64 hex characters derived from the bot token."""
    return hmac.new(token.encode(), b"gateway-telegram-webhook", hashlib.sha256).hexdigest()


def addressed_to_bot(message: Message, bot_id: int, bot_username: str) -> bool:
    """Tell whether a group message addresses the bot (mention, /command@bot, or reply to it)."""
    reply = message.reply_to_message
    if reply is not None and reply.from_user is not None and reply.from_user.id == bot_id:
        return True
    handle = "@" + bot_username.lower()
    text = message.text or message.caption or ""
    entities = message.entities or message.caption_entities or ()
    for entity in entities:
        if entity.type == MessageEntity.TEXT_MENTION:
            if entity.user is not None and entity.user.id == bot_id:
                return True
            continue
        if entity.type not in (MessageEntity.MENTION, MessageEntity.BOT_COMMAND):
            continue
        fragment = _utf16_slice(text, entity.offset, entity.length).lower()
        if fragment == handle or fragment.endswith(handle):
            return True
    return False


def _utf16_slice(text: str, offset: int, length: int) -> str:
    encoded = text.encode("utf-16-le")
    return encoded[offset * 2 : (offset + length) * 2].decode("utf-16-le", errors="ignore")


def decode_update(update: Update, bot_id: int, bot_username: str) -> TelegramMessage | None:
    """Decode one update into a message to take; None for what we ignore (logged)."""
    message = update.message or update.edited_message
    if message is None:
        log.info("telegram: ignoring update %d without a message", update.update_id)
        return None
    edited = update.message is None
    chat = message.chat
    if chat.type in ("group", "supergroup") and not addressed_to_bot(message, bot_id, bot_username):
        return None
    if chat.type == "channel":
        return None
    user = message.from_user
    if user is None or user.is_bot:
        return None
    name = " ".join(p for p in (user.first_name, user.last_name) if p) or None
    sender = Sender(f"telegram:{user.id}", name)
    text = message.text or message.caption or ""
    files: list[FileRef] = []
    meta: dict[str, Any] = {}
    if message.text is not None:
        kind = "text"
    elif message.photo:
        kind = "photo"
        best = max(message.photo, key=lambda p: (p.width * p.height, p.file_size or 0))
        files.append(
            FileRef(best.file_id, f"photo-{best.file_unique_id}.jpg", "image/jpeg", best.file_size)
        )
    elif message.document is not None:
        kind = "document"
        doc = message.document
        files.append(
            FileRef(
                doc.file_id,
                doc.file_name or f"document-{doc.file_unique_id}",
                doc.mime_type or "application/octet-stream",
                doc.file_size,
            )
        )
    elif message.voice is not None:
        kind = "voice"
        voice = message.voice
        files.append(
            FileRef(
                voice.file_id,
                f"voice-{voice.file_unique_id}.ogg",
                voice.mime_type or "audio/ogg",
                voice.file_size,
            )
        )
    elif message.video is not None:
        kind = "video"
        video = message.video
        files.append(
            FileRef(
                video.file_id,
                video.file_name or f"video-{video.file_unique_id}.mp4",
                video.mime_type or "video/mp4",
                video.file_size,
            )
        )
    elif message.venue is not None:
        kind = "venue"
        venue = message.venue
        meta["location"] = {"lat": venue.location.latitude, "lon": venue.location.longitude}
        meta["venue"] = {"title": venue.title, "address": venue.address}
        text = "\n".join(p for p in (venue.title, venue.address) if p)
    elif message.location is not None:
        kind = "location"
        loc = message.location
        meta["location"] = {"lat": loc.latitude, "lon": loc.longitude}
        if loc.horizontal_accuracy is not None:
            meta["location"]["accuracy_m"] = loc.horizontal_accuracy
    elif message.contact is not None:
        kind = "contact"
        shared = message.contact
        meta["contact"] = {
            "phone_number": shared.phone_number,
            "first_name": shared.first_name,
            "last_name": shared.last_name,
            "user_id": shared.user_id,
        }
        text = " ".join(p for p in (shared.first_name, shared.last_name, shared.phone_number) if p)
    else:
        log.info("telegram: ignoring a message of a kind we do not take (chat type %s)", chat.type)
        return None
    external_id = f"{chat.id}:{message.message_id}"
    if edited:
        edit_stamp = int(message.edit_date.timestamp()) if message.edit_date else update.update_id
        meta["edit_of"] = external_id
        external_id = f"{external_id}:edit:{edit_stamp}"
    meta.update(
        {
            "kind": kind,
            "chat_id": chat.id,
            "chat_type": chat.type,
            "message_id": message.message_id,
            "update_id": update.update_id,
        }
    )
    if user.username:
        meta["username"] = user.username
    if user.language_code:
        meta["language_code"] = user.language_code
    when = message.edit_date if edited and message.edit_date else message.date
    return TelegramMessage(
        chat_id=chat.id,
        message_id=message.message_id,
        external_id=external_id,
        kind=kind,
        sender=sender,
        text=clean_text(text),
        edited=edited,
        origin_at=from_datetime(when) if when else None,
        files=tuple(files),
        meta=meta,
    )


TEXT_LIMIT: Final = 4096
"""sendMessage takes at most 4096 characters (UTF-16 code units) per message."""


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Split ``text`` into messages of at most ``limit`` UTF-16 units, at line ends if possible."""
    if not text:
        return []
    parts: list[str] = []
    while _utf16_len(text) > limit:
        cut = _utf16_prefix(text, limit)
        newline = text.rfind("\n", 0, cut)
        if newline > cut // 2:
            cut = newline + 1
        parts.append(text[:cut])
        text = text[cut:]
    if text:
        parts.append(text)
    return parts


def _utf16_len(text: str) -> int:
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def _utf16_prefix(text: str, limit: int) -> int:
    """The largest number of characters whose UTF-16 length is at most ``limit``."""
    units = 0
    for index, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return index
    return len(text)


def start_payload(msg: TelegramMessage) -> str | None:
    """The deep-link payload of a private ``/start`` ("" without one); None for other messages."""
    if msg.kind != "text" or msg.meta.get("chat_type") != "private":
        return None
    command, _, rest = msg.text.strip().partition(" ")
    if command.split("@")[0] != "/start":
        return None
    return rest.strip()[:64]


def language_of(msg: TelegramMessage) -> str | None:
    """The text's script first; else the primary subtag of the user's Telegram language."""
    hint = guess_language(msg.text) if msg.text else None
    if hint is None:
        code = msg.meta.get("language_code")
        if isinstance(code, str) and code:
            hint = code.split("-")[0].lower()[:8] or None
    return hint
