"""Turn one raw e-mail (bytes plus SMTP envelope) into the fields of a contact.

Pure and total: ``normalize`` never raises. Whatever the email package can parse is decoded
with lenient, superset-aware charset handling (mail labelled gb2312 that holds GBK characters,
Big5 with HKSCS or Windows extensions, Shift_JIS as cp932, EUC-KR as cp949, undeclared 8-bit
as UTF-8 then a configured regional fallback); anything that cannot be parsed yields a
flagged result that keeps the raw message as its only attachment.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date
from email import policy
from email.message import EmailMessage, Message
from email.parser import BytesParser, Parser
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any, Final

from gateway.channels.email.headers import (
    ENCODED_WORD,
    clean_line,
    decode_bytes,
    decode_header,
    header_params,
    language_of,
    message_ids,
    raw_text,
    unfold,
)
from gateway.channels.email.htmltext import html_to_text
from gateway.contact.clock import MICROS_PER_SECOND, Micros, from_datetime
from gateway.contact.language import guess_language
from gateway.records import Sender, clean_text

MAX_DEPTH: Final = 16
MAX_PARTS: Final = 200
MAX_DEFECTS: Final = 20

def _raw_header(name: str, value: str) -> str:
    return value


MAX_BOUNDARY: Final = 200
"""Longest MIME boundary taken as one (RFC 2046 allows 70): the standard library compiles a
regular expression per boundary and keeps the last 512 in ``re``'s cache, so boundaries of
70 kB held about 100 MB after a fuzz run. A part with a longer one is read as a single part
(``NoBoundaryInMultipartDefect``); nothing of the message is lost (the raw file is kept)."""


class _Message(EmailMessage):
    _body: bytes | None = None
    """A one-part message's body as it arrived (``_single_part``): its text, the payload, is
    made from it only when asked for (``_part_bytes`` takes the bytes themselves)."""

    def get_boundary(self, failobj: Any = None) -> Any:
        boundary = super().get_boundary(failobj)
        if isinstance(boundary, str) and len(boundary) > MAX_BOUNDARY:
            return failobj
        return boundary

    @property
    def _payload(self) -> Any:
        body = self._body
        if body is not None:  # the text the feed parser would have made, made now
            self.__dict__["_payload_value"] = body.decode("ascii", "surrogateescape")
            self._body = None
        return self.__dict__.get("_payload_value")

    @_payload.setter
    def _payload(self, value: Any) -> None:
        self._body = None
        self.__dict__["_payload_value"] = value

    def is_multipart(self) -> bool:
        return self._body is None and super().is_multipart()


POLICY: Final = policy.default.clone(header_factory=_raw_header, message_factory=_Message)
"""The modern policy, minus its header objects: headers are decoded here, leniently and with
charset supersets, and parsing them twice costs ~2 ms per message (15x the whole parse)."""

_FIELD_NAME: Final = rb"[\041-\071\073-\176]+"
_FIELD_BODY: Final = rb"[^\r\n]*(?:\r\n|\r|\n)(?:[ \t][^\r\n]*(?:\r\n|\r|\n))*"
_FIELD_PARTS: Final = re.compile(b"(" + _FIELD_NAME + b"):[ \t]*(" + _FIELD_BODY + b")")
"""A header field as the feed parser tells it (its ``headerRE``): a name of printable ASCII but
the colon, then continuation lines starting with a space or tab; lines end at CR, LF or CRLF.
Neither a ``From `` envelope line nor a field without a name or a line end matches. The value
is taken after the spaces and tabs that begin it (the policy's ``lstrip(' \t')``). Read on the
message's bytes: the feed parser reads their text decoded byte for character (ASCII, every
other byte a surrogate escape), where these classes take the same characters."""


def parse(raw: bytes) -> Message:
    """Parse ``raw`` as ``BytesParser(policy=POLICY)`` does.

    A message with one part (no multipart or message content type) and clean headers is read
    here: its header fields found by one regular expression and taken as the feed parser takes
    them, the rest its payload; the feed parser walks the body line by line (half the cost of
    normalizing a small mail). Anything else, or any header the feed parser would note a defect
    for, goes to it."""
    msg = _single_part(raw)
    if msg is not None:
        return msg
    return Parser(policy=POLICY).parsestr(raw.decode("ascii", "surrogateescape"))


def _single_part(raw: bytes) -> Message | None:
    msg = _Message(policy=POLICY)
    content_type: str | None = None
    end = 0
    match = _FIELD_PARTS.match
    add = msg.set_raw
    while (m := match(raw, end)) is not None:
        end = m.end()
        name = m.group(1).decode("ascii")
        value = m.group(2).rstrip(b"\r\n").decode("ascii", "surrogateescape")
        if content_type is None and len(name) == 12 and name.lower() == "content-type":
            content_type = value.lower()  # the first one is the message's type
        add(name, value)
    separator = raw[end : end + 2]
    if separator == b"\r\n":
        body = end + 2
    elif separator[:1] in (b"\r", b"\n"):
        body = end + 1
    elif end == len(raw):
        body = end
    else:
        return None  # a line that is no field, a field without a line end, a ``From `` line
    if content_type is not None and ("multipart" in content_type or "message" in content_type):
        return None  # parts (or message/*) for the feed parser
    msg._body = raw[body:]
    return msg


_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CONTACT_ID: Final = re.compile(rf"^{_UUID}$")
_OWN_MESSAGE_ID: Final = re.compile(rf"<(?:reply|ack)\.({_UUID})\.[0-9a-z]+@", re.IGNORECASE)
"""Message-IDs the gateway puts on its own replies carry the contact id (see relay.py)."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """The SMTP envelope of one message; ``mail_from`` is "" for the null sender ``<>``."""

    mail_from: str | None
    rcpt_tos: tuple[str, ...]
    peer: str | None = None
    helo: str | None = None
    smtputf8: bool = False
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Options:
    """Decoding choices taken from the adapter's config."""

    regional_fallback: str = "gb18030"
    max_text_chars: int = 500_000


@dataclass(frozen=True, slots=True)
class Part:
    """One attachment or inline image, with its decoded bytes."""

    name: str
    content_type: str
    data: bytes
    content_id: str | None = None
    inline: bool = False


@dataclass(frozen=True, slots=True)
class Normalized:
    """The contact fields of one message, before its files are stored."""

    external_id: str
    sender: Sender
    recipient: str
    subject: str | None
    text: str
    language: str | None
    thread: str | None
    origin_at: Micros | None
    parts: tuple[Part, ...]
    auto_generated: str | None
    """Why the message is machine-generated (never auto-acknowledge it), or None."""
    parse_error: str | None
    meta: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- message structure


def _raw_headers(msg: Message) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in msg.raw_items():
        key = name.strip().lower()
        if key not in headers:
            headers[key] = str(value)
    return headers


_MAIL_TRACE: Final = frozenset(
    (b"received", b"return-path", b"delivered-to", b"x-original-to", b"x-envelope-to")
)


def content_hash(raw: bytes) -> str:
    """Hash the message with CRLF line ends and without leading trace headers.

    A resend of the same message through another relay then hashes the same.
    """
    lines = re.split(rb"\r?\n", raw)
    i = 0
    skipping = False
    while i < len(lines):
        line = lines[i]
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                break
            i += 1
            continue
        name = line.split(b":", 1)[0].strip().lower() if b":" in line else b""
        if name in _MAIL_TRACE:
            skipping = True
            i += 1
            continue
        break
    digest = hashlib.sha256(b"\r\n".join(lines[i:])).hexdigest()
    return f"sha256:{digest}"


_MIME_TYPE: Final = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,128}")
_BOUNDARY_LINE: Final = re.compile(rb"^--([ -~]{1,70}?)(--)?[ \t]*\r?$", re.MULTILINE)


def _guess_boundary(body: bytes) -> bytes | None:
    """Find the lost boundary of a multipart: a ``--x`` line, best one closed by ``--x--``."""
    seen: dict[bytes, int] = {}
    for m in _BOUNDARY_LINE.finditer(body[:1_000_000]):
        token = m.group(1)
        if m.group(2):
            if token in seen:
                return token
        else:
            seen[token] = seen.get(token, 0) + 1
    return max(seen, key=lambda t: seen[t]) if seen else None


def _recover_multipart(part: Message, ctype: str) -> Message | None:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return None
    boundary = _guess_boundary(payload)
    if boundary is None or b'"' in boundary:
        return None
    header = b'Content-Type: ' + ctype.encode() + b'; boundary="' + boundary + b'"\r\n\r\n'
    rebuilt = BytesParser(policy=POLICY).parsebytes(header + payload)
    return rebuilt if rebuilt.is_multipart() else None


@dataclass(slots=True)
class _Body:
    plain: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    charsets: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_DECODED: Final = frozenset(
    ("quoted-printable", "base64", "x-uuencode", "uuencode", "uue", "x-uue")
)
"""The transfer encodings ``Message.get_payload(decode=True)`` decodes; any other value (or
none) gives the payload's bytes as they came."""


def _part_bytes(part: Message, headers: dict[str, str] | None = None) -> bytes:
    """``get_payload(decode=True)``'s bytes of a leaf part, or the bytes of a message part.

    With the part's ``headers`` (``_raw_headers``), a text payload whose transfer encoding is
    not one that is decoded is turned back into its bytes here, as ``get_payload`` does, without
    its header lookups and surrogate test (half the cost of reading a small mail's body)."""
    if headers is not None:
        cte = headers.get("content-transfer-encoding", "")
        # a folded value never names an encoding once unfolded (a fold leaves a space)
        if "\n" not in cte and "\r" not in cte and cte.lower() not in _DECODED:
            body = part._body if type(part) is _Message else None
            if body is not None:  # read by ``_single_part``: the bytes as they came
                return body
            raw = getattr(part, "_payload", None)
            if type(raw) is str:
                try:
                    return raw.encode("ascii", "surrogateescape")
                except UnicodeEncodeError:  # not read from bytes: get_payload's own way
                    pass
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    inner = part.get_payload()
    if isinstance(inner, list) and inner and isinstance(inner[0], Message):
        try:
            return inner[0].as_bytes(policy=policy.compat32)
        except Exception:  # the generator chokes on some hostile headers
            return b""
    return b""


def _part_text(
    part: Message,
    ctype: str,
    params: dict[str, str],
    opts: Options,
    body: _Body,
    headers: dict[str, str] | None = None,
) -> str:
    charset = params.get("charset")
    data = _part_bytes(part, headers)
    if charset is None and ctype == "text/html":
        m = re.search(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_.:-]+)""", data[:4096], re.I)
        if m:
            charset = m.group(1).decode("ascii", "replace")
    if charset:
        body.charsets.append(charset)
    text = decode_bytes(data, charset, opts.regional_fallback)
    if params.get("format", "").lower() == "flowed":
        text = unflow(text, delsp=params.get("delsp", "").lower() == "yes")
    return text


def unflow(text: str, *, delsp: bool = False) -> str:
    """Join the soft line breaks of ``format=flowed`` text (RFC 3676)."""
    out: list[str] = []
    pending: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        quote = len(line) - len(line.lstrip(">"))
        content = line[quote:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        if pending is None:
            pending = line[:quote] + (" " if quote else "")
        if content.endswith(" ") and content != "-- ":  # soft break: the paragraph goes on
            pending += content[:-1] if delsp else content
            continue
        out.append(pending + content)
        pending = None
    if pending:
        out.append(pending)
    return "\n".join(out)


def _attachment(
    part: Message, headers: dict[str, str], ctype: str, opts: Options, index: int
) -> Part:
    fallback = opts.regional_fallback
    disposition, dparams = header_params(headers.get("content-disposition", ""), fallback)
    _, cparams = header_params(headers.get("content-type", ""), fallback)
    name = dparams.get("filename") or cparams.get("name") or ""
    content_id = message_ids(headers.get("content-id", ""))
    data = _part_bytes(part, headers)
    if ctype == "message/rfc822":
        name = name or f"message-{index}.eml"
    if not name:
        ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif", "text/html": ".html",
               "text/plain": ".txt", "application/pdf": ".pdf"}.get(ctype, ".bin")
        name = f"part-{index}{ext}"
    return Part(
        name=clean_text(clean_line(name, 255)),
        content_type=ctype,
        data=data,
        content_id=content_id[0] if content_id else None,
        inline=disposition == "inline" or (bool(content_id) and disposition != "attachment"),
    )


def _walk(msg: Message, msg_headers: dict[str, str], opts: Options, body: _Body) -> None:
    """Collect body text and files; alternatives not chosen for text still give their files."""
    stack: list[tuple[Message, int, bool]] = [(msg, 0, True)]
    count = 0
    while stack:
        part, depth, text_wanted = stack.pop()
        count += 1
        if count > MAX_PARTS:
            body.notes.append("too many parts")
            return
        headers = msg_headers if part is msg else _raw_headers(part)
        ctype, cparams = header_params(headers.get("content-type", ""), opts.regional_fallback)
        if not _MIME_TYPE.fullmatch(ctype):
            ctype = "text/plain"  # RFC 2045 5.2: an invalid Content-Type means text/plain
        maintype = ctype.split("/", 1)[0]
        if maintype == "multipart" and not part.is_multipart():
            recovered = _recover_multipart(part, ctype)
            if recovered is None:
                body.notes.append("multipart without parts")
                ctype, maintype = "text/plain", "text"
            else:
                body.notes.append("multipart boundary recovered")
                part = recovered
        if ctype == "message/rfc822" and part is not msg:
            # A forwarded message stays whole, as a .eml file, rather than mixed into the body.
            body.parts.append(_attachment(part, headers, ctype, opts, len(body.parts) + 1))
            continue
        if part.is_multipart():
            if depth >= MAX_DEPTH:
                body.notes.append("nesting too deep")
                continue
            children = [c for c in (part.get_payload() or []) if isinstance(c, Message)]
            chosen = _choose_alternative(children) if ctype == "multipart/alternative" else None
            stack.extend(
                (c, depth + 1, text_wanted and (chosen is None or c is chosen))
                for c in reversed(children)
            )
            continue
        disposition, dparams = header_params(
            headers.get("content-disposition", ""), opts.regional_fallback
        )
        is_attachment = disposition == "attachment" or "filename" in dparams
        if maintype == "text" and not is_attachment and (
            ctype in ("text/plain", "text/html") or part is msg
        ):
            if text_wanted:
                text = _part_text(part, ctype, cparams, opts, body, headers)
                (body.html if ctype == "text/html" else body.plain).append(text)
            continue
        body.parts.append(_attachment(part, headers, ctype, opts, len(body.parts) + 1))


def _choose_alternative(children: list[Message]) -> Message | None:
    """Prefer text/plain, then HTML (or a multipart holding it), then the last alternative."""
    for wanted in ("text/plain", "text/html"):
        for c in children:
            if c.get_content_type() == wanted:
                return c
    for c in children:
        if c.is_multipart():
            return c
    return children[-1] if children else None


# ---------------------------------------------------------------- the message


_AUTO_PRECEDENCE: Final = frozenset(("bulk", "list", "junk"))
_DAEMONS: Final = ("mailer-daemon", "postmaster", "noreply", "no-reply", "do-not-reply")


def auto_generated_reason(
    headers: dict[str, str], mail_from: str | None, sender: str
) -> str | None:
    """Return why a message must never get an automatic answer (RFC 3834), or None."""
    if mail_from == "":
        return "null sender"
    auto = clean_line(headers.get("auto-submitted", "")).lower()
    if auto and auto.split(";", 1)[0].strip() != "no":
        return f"auto-submitted: {auto[:40]}"
    precedence = clean_line(headers.get("precedence", "")).lower()
    if precedence in _AUTO_PRECEDENCE:
        return f"precedence: {precedence}"
    if "list-id" in headers or "list-unsubscribe" in headers:
        return "mailing list"
    suppress = headers.get("x-auto-response-suppress", "").lower()
    if any(k in suppress for k in ("all", "autoreply", "oof")):
        return "x-auto-response-suppress"
    local = sender.split("@", 1)[0].lower()
    if local.startswith(_DAEMONS) or local.endswith("-request") or local.startswith("owner-"):
        return f"sender {local[:40]}"
    return None


_SIMPLE_ADDRESS: Final = re.compile(
    r'\s*(?:"?([^"<>,;:\\]*?)"?\s*<([^<>\s@,;"]+@[^<>\s@,;"]+)>|<?([^<>\s@,;"]+@[^<>\s@,;"]+)>?)\s*'
)


def _address(raw: str, fallback: str) -> tuple[str, str | None]:
    if not raw:
        return "", None
    raw = unfold(raw)
    simple = _SIMPLE_ADDRESS.fullmatch(raw)
    if simple:  # the common shapes, without the cost of the full RFC 5322 parser
        name, addr = simple.group(1), simple.group(2) or simple.group(3)
        display = decode_header(name, fallback).strip() if name else ""
        return _norm_address(raw_text(addr, fallback)), (display or None)
    pairs = getaddresses([raw])
    for name, addr in pairs:
        if addr and "@" in addr:
            display = decode_header(name, fallback).strip().strip('"').strip() if name else ""
            return _norm_address(raw_text(addr, fallback)), (display or None)
    return "", None


def _norm_address(addr: str) -> str:
    addr = clean_text(addr).strip().strip("<>").strip()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr[:320]
    return f"{local}@{domain.lower()}"[:320]


def split_mailbox(address: str) -> tuple[str, str | None]:
    """Return the mailbox without its ``+tag`` and the tag: ``a+t@d`` -> (``a@d``, ``t``)."""
    addr = _norm_address(address)
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr, None
    base, plus, tag = local.partition("+")
    return f"{base}@{domain}", (tag if plus else None)


_MONTHS: Final = {
    m: n for n, m in enumerate("Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split(), 1)
}
_EPOCH_DAY: Final = date(1970, 1, 1).toordinal()
_DATE: Final = re.compile(
    r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?([0-9]{1,2}) "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) ([12][0-9]{3}) "
    r"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)
"""A ``Date`` as RFC 5322 writes it (``Wed, 25 Nov 2026 08:00:00 +0800``), its comments taken
out first (``_uncommented``), read here to the microseconds
``from_datetime(parsedate_to_datetime(...))`` gives for it, in under half the library's time
(about 0.6 of the instructions of ``_origin``'s whole reading); any other form, obsolete or
broken, goes to the library. ``tests/channels/email/test_fuzz.py``
holds the two readings equal."""
_COMMENT: Final = re.compile(r"\((?:[^()\\]|\\.)*\)")
"""An RFC 5322 comment with no comment inside it (quoted pairs allowed)."""


def _uncommented(value: str) -> str:
    """``value`` with its comments taken out, innermost first, each as a space (a comment is
    CFWS, RFC 5322 3.2.2), and its runs of blanks made one space. Left in, a comment right after
    the zone (``+0800(CST)``: CFWS needs no space before it) makes the library take the zone for
    part of a word and give a time with no zone, eight hours off for China's once read as
    UTC."""
    if "(" not in value:
        return value
    while (stripped := _COMMENT.sub(" ", value)) != value:
        value = stripped
    return " ".join(value.split())


def _origin(raw_date: str | None) -> Micros | None:
    if not raw_date:
        return None
    value = _uncommented(clean_line(raw_date))
    found = _DATE.fullmatch(value)
    if found is not None:
        day, month, year, hour, minute, second, sign, zone_h, zone_m = found.groups()
        h, m, sec = int(hour), int(minute), int(second)
        offset = int(zone_h) * 3600 + int(zone_m) * 60
        if not (h < 24 and m < 60 and sec < 60 and offset < 86_400):
            return None  # the library's datetime refuses it too
        try:
            days = date(int(year), _MONTHS[month], int(day)).toordinal() - _EPOCH_DAY
        except ValueError:  # no such day: the library's datetime refuses it too
            return None
        at = days * 86_400 + h * 3600 + m * 60 + sec
        return (at - offset if sign == "+" else at + offset) * MICROS_PER_SECOND
    try:
        return from_datetime(parsedate_to_datetime(value))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _thread(headers: dict[str, str], rcpt_tos: Iterable[str]) -> tuple[str | None, dict[str, Any]]:
    refs = message_ids(headers.get("references", ""))
    in_reply = message_ids(headers.get("in-reply-to", ""))
    facts: dict[str, Any] = {}
    if refs:
        facts["references"] = refs[-20:]
    if in_reply:
        facts["in_reply_to"] = in_reply[0]
    for rcpt in rcpt_tos:
        _, tag = split_mailbox(rcpt)
        if tag and _CONTACT_ID.match(tag.lower()):
            facts["reply_to_contact"] = tag.lower()
            return tag.lower(), facts
    for mid in [*in_reply, *reversed(refs)]:
        m = _OWN_MESSAGE_ID.search(mid)
        if m:
            facts["reply_to_contact"] = m.group(1).lower()
            return m.group(1).lower(), facts
    if refs:
        return refs[0], facts
    if in_reply:
        return in_reply[0], facts
    return None, facts


def _language(headers: dict[str, str], charsets: Iterable[str], text: str) -> str | None:
    declared = clean_line(headers.get("content-language", "")).split(",", 1)[0].strip()
    if declared and re.fullmatch(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*", declared):
        return declared
    for cs in charsets:
        hint = language_of(cs)
        if hint:
            return hint
    return guess_language(text)  # the one guesser every channel uses (gateway/contact/language.py)


_CONTROLS: Final = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")
_REMOVED: Final = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff\ud800-\udfff]")
"""What ``clean_text`` and ``_CONTROLS`` take out: text with none of it needs neither."""


def _tidy(text: str) -> str:
    if _REMOVED.search(text) is None:  # the common case: one scan instead of two rewrites
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        return text.strip()
    text = clean_text(text).replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROLS.sub("", text).strip()


def normalize(raw: bytes, envelope: Envelope, opts: Options = Options()) -> Normalized:
    """Return the contact fields of ``raw``; on any failure, a result flagged ``parse_error``."""
    try:
        return _normalize(raw, envelope, opts)
    except Exception as exc:  # one bad message must never block the next
        return _unparsed(raw, envelope, f"{type(exc).__name__}: {exc}"[:300])


def _recipient(envelope: Envelope) -> str:
    return split_mailbox(envelope.rcpt_tos[0])[0] if envelope.rcpt_tos else ""


def _unparsed(raw: bytes, envelope: Envelope, error: str) -> Normalized:
    try:
        mail_from = _norm_address(envelope.mail_from or "")
        recipient = _recipient(envelope)
    except Exception:
        mail_from, recipient = "", ""
    try:
        external_id = content_hash(raw)  # stable across resends: trace headers left out
    except Exception:
        external_id = f"sha256:{hashlib.sha256(raw).hexdigest()}"
    return Normalized(
        external_id=external_id,
        sender=Sender(mail_from, None),
        recipient=recipient,
        subject=None,
        text="",
        language=None,
        thread=None,
        origin_at=None,
        parts=(Part("message.eml", "message/rfc822", raw),),
        auto_generated="unparsed" if not envelope.mail_from else None,
        parse_error=error,
        meta={"parse_error": error},
    )


def _normalize(raw: bytes, envelope: Envelope, opts: Options) -> Normalized:
    fallback = opts.regional_fallback
    msg = parse(raw)
    headers = _raw_headers(msg)
    sender_addr, sender_name = _address(headers.get("from", ""), fallback)
    if not sender_addr:
        sender_addr, sender_name = _norm_address(envelope.mail_from or ""), None
    reply_to, _ = _address(headers.get("reply-to", ""), fallback)
    subject = (
        _tidy(clean_line(decode_header(headers["subject"], fallback), 1000))
        if "subject" in headers
        else None
    )
    body = _Body()
    _walk(msg, headers, opts, body)
    if body.plain:
        text = "\n\n".join(t.strip("\r\n") for t in body.plain if t.strip())
        source = "plain"
    elif body.html:
        text = "\n\n".join(html_to_text(h) for h in body.html)
        source = "html"
    else:
        text, source = "", "none"
    text = _tidy(text)
    meta: dict[str, Any] = {"body": source}
    if len(text) > opts.max_text_chars:
        text = text[: opts.max_text_chars]
        meta["text_truncated"] = True
    mids = message_ids(headers.get("message-id", ""))
    if mids:
        external_id = mids[0]
    else:
        bare = clean_line(headers.get("message-id", ""), 900)
        external_id = bare if bare and bare.isascii() and bare.isprintable() else content_hash(raw)
    thread, thread_facts = _thread(headers, envelope.rcpt_tos)
    meta.update(thread_facts)
    if reply_to and reply_to != sender_addr:
        meta["reply_to"] = reply_to
    auto = auto_generated_reason(headers, envelope.mail_from, sender_addr)
    if auto:
        meta["auto_generated"] = auto
    found = [d for p in _safe_walk(msg) for d in p.defects] if msg.is_multipart() else msg.defects
    defects = sorted({type(d).__name__ for d in found})
    if defects:
        meta["defects"] = defects[:MAX_DEFECTS]
    if body.notes:
        meta["notes"] = sorted(set(body.notes))
    return Normalized(
        external_id=external_id,
        sender=Sender(sender_addr, sender_name),
        recipient=_recipient(envelope),
        subject=subject,
        text=text,
        language=_language(
            headers, [*body.charsets, *_subject_charsets(headers)], text or subject or ""
        ),
        thread=thread,
        origin_at=_origin(headers.get("date")),
        parts=tuple(body.parts),
        auto_generated=auto,
        parse_error=None,
        meta=meta,
    )


def _subject_charsets(headers: dict[str, str]) -> list[str]:
    return [m.group(1) for m in ENCODED_WORD.finditer(headers.get("subject", ""))][:3]


def _safe_walk(msg: Message) -> Iterator[Message]:
    stack: list[tuple[Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        yield part
        if part.is_multipart() and depth < MAX_DEPTH:
            payload = part.get_payload()
            if isinstance(payload, list):
                stack.extend((c, depth + 1) for c in payload if isinstance(c, Message))
