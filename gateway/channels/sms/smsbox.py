"""Kannel smsbox's sms-service request as it reaches us (get-url query or post-url body with
``X-Kannel-*`` headers), undecoded, and its message bytes decoded by the declared coding and
charset: UCS-2 as UTF-16BE (or UTF-8 after ``mo-recode``), 8-bit data in the regional fallback
charsets, 7-bit text as UTF-8. Pure: the adapter (``kannel.py``) serves it."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import unquote_plus, unquote_to_bytes

from gateway.channels.sms import common
from gateway.records import clean_text

CODING_7BIT = 0
CODING_8BIT = 1
CODING_UCS2 = 2

REGIONAL_8BIT: dict[str, tuple[str, ...]] = {
    "CN": ("gb18030",),
    "TW": ("big5",),
    "HK": ("big5hkscs",),
    "MO": ("big5hkscs",),
    "JP": ("shift_jis",),
    "KR": ("euc_kr",),
    "RU": ("cp1251",),
}
"""8-bit user data in the wild, by region; the last resort everywhere is ISO-8859-1."""

_ALIASES: dict[str, tuple[str, ...]] = {
    "from": ("from", "sender", "p"),
    "to": ("to", "receiver", "P"),
    "text": ("text", "message", "b", "a"),
    "time": ("time", "ts", "T"),
    "id": ("id", "I"),
    "coding": ("coding", "c"),
    "charset": ("charset", "C"),
    "udh": ("udh", "u"),
    "smsc": ("smsc", "i"),
}


@dataclass(frozen=True, slots=True)
class KannelMessage:
    """One sms-service request, undecoded."""

    sender: str
    recipient: str
    data: bytes
    coding: int
    charset: str
    udh: bytes
    id: str
    time: int | None
    smsc: str
    extra: dict[str, str] = field(default_factory=dict)


def parse_query(raw: str) -> dict[str, bytes]:
    """Split a raw query string into names and raw byte values (``+`` is a space)."""
    out: dict[str, bytes] = {}
    for item in raw.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        key = unquote_plus(name, errors="replace")
        if key not in out:
            out[key] = unquote_to_bytes(value.replace("+", " "))
    return out


def _pick(params: dict[str, bytes], name: str) -> bytes | None:
    for alias in _ALIASES[name]:
        if alias in params:
            return params[alias]
    return None


def ascii_text(value: bytes | None) -> str:
    return "" if value is None else value.decode("latin-1").strip()


def _content_charset(content_type: str) -> str:
    for piece in content_type.split(";")[1:]:
        key, _, value = piece.strip().partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').strip()
    return ""


def parse_request(
    method: str, raw_query: str | dict[str, bytes], headers: dict[str, str], body: bytes
) -> KannelMessage:
    """Parse an sms-service request (get-url or post-url); raise ``BadRequest``.

    ``raw_query`` is the raw query string or its :func:`parse_query` result; ``headers`` has
    lower-case names.
    """
    params = parse_query(raw_query) if isinstance(raw_query, str) else raw_query
    sender = ascii_text(_pick(params, "from")) or headers.get("x-kannel-from", "").strip()
    recipient = ascii_text(_pick(params, "to")) or headers.get("x-kannel-to", "").strip()
    message_id = ascii_text(_pick(params, "id"))
    if not sender:
        raise common.BadRequest("missing sender (from=%p)")
    if not message_id:
        raise common.BadRequest("missing message id (id=%I)")
    if len(message_id) > 128 or len(sender) > 64 or len(recipient) > 64:
        raise common.BadRequest("field too long")
    text = _pick(params, "text")
    charset = ascii_text(_pick(params, "charset"))
    coding_raw = ascii_text(_pick(params, "coding")) or headers.get("x-kannel-coding", "").strip()
    if text is None and method == "POST":
        text = body
        charset = charset or _content_charset(headers.get("content-type", ""))
        if not coding_raw and "application/octet-stream" in headers.get("content-type", ""):
            coding_raw = str(CODING_8BIT)
    try:
        coding = int(coding_raw) if coding_raw else CODING_7BIT
    except ValueError as exc:
        raise common.BadRequest("coding must be 0, 1 or 2") from exc
    if coding not in (CODING_7BIT, CODING_8BIT, CODING_UCS2):
        coding = CODING_7BIT  # DC_UNDEF (-1) and the like: Kannel's own default
    udh = _pick(params, "udh")
    if udh is None and headers.get("x-kannel-udh"):
        udh = unquote_to_bytes(headers["x-kannel-udh"].strip())
    time_raw = ascii_text(_pick(params, "time"))
    origin: int | None = None
    if not time_raw and headers.get("x-kannel-time"):  # post-url: "2026-11-25 08:00:00" UTC
        try:
            stamp = datetime.strptime(headers["x-kannel-time"].strip(), "%Y-%m-%d %H:%M:%S")
        except ValueError as exc:
            raise common.BadRequest("X-Kannel-Time is not YYYY-MM-DD HH:MM:SS") from exc
        time_raw = str(int(stamp.replace(tzinfo=UTC).timestamp()))
    if time_raw:
        try:
            origin = int(time_raw)
        except ValueError as exc:
            raise common.BadRequest("time must be a unix time (time=%T)") from exc
        if not 0 <= origin < 1 << 40:
            raise common.BadRequest("time out of range")
    smsc = ascii_text(_pick(params, "smsc")) or headers.get("x-kannel-smsc", "").strip()
    return KannelMessage(
        sender=sender,
        recipient=recipient,
        data=text or b"",
        coding=coding,
        charset=charset[:40],
        udh=udh or b"",
        id=message_id,
        time=origin,
        smsc=smsc[:64],
    )


def is_number(value: str) -> bool:
    return value.isascii() and value.isdigit() and len(value) < 10


def decode_text(
    data: bytes, coding: int, charset: str, eight_bit: tuple[str, ...]
) -> tuple[str, str]:
    """Decode message bytes by their declared coding and charset; return (text, codec used).

    UCS-2 is read as UTF-16BE; ``8-BIT`` (or 8-bit coding without a charset) tries
    ``eight_bit`` strictly in order, then ISO-8859-1. A declared charset that does not fit
    the bytes falls back the same way; undecodable bytes never raise.
    """
    declared = charset.strip().upper()
    if declared in ("UTF-16BE", "UTF-16", "UCS-2", "UCS2", "UCS-2BE", "ISO-10646-UCS-2") or (
        not declared and coding == CODING_UCS2
    ):
        text = data.decode("utf-16-be", errors="replace")
        return clean_text(text.removeprefix("\ufeff")), "utf-16-be"
    chain: list[str] = []
    if declared and declared not in ("8-BIT", "8BIT", "BINARY"):
        known = common.known_charset(declared)
        if known:
            chain.append(known)
    elif not declared and coding == CODING_7BIT:
        chain.append("utf-8")  # Kannel's internal charset for 7-bit text (%C says UTF-8)
    chain.extend(eight_bit)
    for name in chain:
        try:
            return clean_text(data.decode(name)), codecs.lookup(name).name
        except (UnicodeError, LookupError):  # UnicodeError: a codec that decodes nothing
            continue
    return clean_text(data.decode("latin-1")), "iso8859-1"
