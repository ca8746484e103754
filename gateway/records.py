"""The Contact and Event records (schema 1): the contract with case systems.

Times inside the records are integer microseconds since the epoch (UTC); on the wire they
are RFC 3339 strings with microseconds. See ``gateway/schemas/*.schema.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import orjson

from gateway.contact.clock import Micros, format_time, parse_time

SCHEMA: Final = 1

Channel = str
"""A registered medium (``gateway.adapters.load_media``); built in: voice, sms, email, chat, web."""

DeadlineKind = Literal["answer", "response"]

EventType = Literal[
    "enqueued",
    "answered",
    "abandoned",
    "responded",
    "acknowledged",
    "warning",
    "breached",
    "delivered",
    "failed",
    "closed",
    "surge",
]
EVENT_TYPES: Final[tuple[str, ...]] = (
    "enqueued",
    "answered",
    "abandoned",
    "responded",
    "acknowledged",
    "warning",
    "breached",
    "delivered",
    "failed",
    "closed",
    "surge",
)


@dataclass(frozen=True, slots=True)
class Sender:
    """Who the contact came from: E.164 phone, e-mail, ``telegram:<id>``, ``wechat:<openid>``."""

    address: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """A stored file; ``ref`` says where the bytes are (see ``gateway.contact.attachments``)."""

    name: str
    content_type: str
    size: int
    sha256: str
    ref: str


@dataclass(frozen=True, slots=True)
class Deadline:
    """The service-level deadline that applies to a contact."""

    kind: DeadlineKind
    due_at: Micros
    policy: str


@dataclass(frozen=True, slots=True)
class Repeat:
    """Earlier contacts from the same sender within ``window`` seconds."""

    count: int
    window: int


@dataclass(frozen=True, slots=True)
class Inbound:
    """A normalized contact as an adapter hands it to Intake (no id, deadline or repeat yet)."""

    channel: Channel
    adapter: str
    external_id: str
    sender: Sender
    recipient: str
    received_at: Micros
    text: str = ""
    subject: str | None = None
    language: str | None = None
    attachments: tuple[Attachment, ...] = ()
    thread: str | None = None
    origin_at: Micros | None = None
    confidential: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact, schema 1, exactly as it travels on ``{gateway}:contacts``."""

    id: str
    channel: Channel
    adapter: str
    external_id: str
    sender: Sender
    recipient: str
    subject: str | None
    text: str
    language: str | None
    attachments: tuple[Attachment, ...]
    thread: str | None
    received_at: Micros
    origin_at: Micros | None
    enqueued_at: Micros
    deadline: Deadline
    repeat: Repeat
    confidential: bool
    meta: dict[str, Any]
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping, fields in contract order."""
        return {
            "schema": self.schema,
            "id": self.id,
            "channel": self.channel,
            "adapter": self.adapter,
            "external_id": self.external_id,
            "sender": {"address": self.sender.address, "name": self.sender.name},
            "recipient": self.recipient,
            "subject": self.subject,
            "text": self.text,
            "language": self.language,
            "attachments": [
                {
                    "name": a.name,
                    "content_type": a.content_type,
                    "size": a.size,
                    "sha256": a.sha256,
                    "ref": a.ref,
                }
                for a in self.attachments
            ],
            "thread": self.thread,
            "received_at": format_time(self.received_at),
            "origin_at": None if self.origin_at is None else format_time(self.origin_at),
            "enqueued_at": format_time(self.enqueued_at),
            "deadline": {
                "kind": self.deadline.kind,
                "due_at": format_time(self.deadline.due_at),
                "policy": self.deadline.policy,
            },
            "repeat": {"count": self.repeat.count, "window": self.repeat.window},
            "confidential": self.confidential,
            "meta": self.meta,
        }

    def to_json(self) -> bytes:
        """Encode as UTF-8 JSON."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contact:
        """Decode a mapping produced by :meth:`to_dict`."""
        sender = d["sender"]
        deadline = d["deadline"]
        repeat = d["repeat"]
        origin = d.get("origin_at")
        return cls(
            schema=int(d.get("schema", SCHEMA)),
            id=d["id"],
            channel=d["channel"],
            adapter=d["adapter"],
            external_id=d["external_id"],
            sender=Sender(sender["address"], sender.get("name")),
            recipient=d["recipient"],
            subject=d.get("subject"),
            text=d.get("text", ""),
            language=d.get("language"),
            attachments=tuple(
                Attachment(a["name"], a["content_type"], int(a["size"]), a["sha256"], a["ref"])
                for a in d.get("attachments", ())
            ),
            thread=d.get("thread"),
            received_at=parse_time(d["received_at"]),
            origin_at=None if origin is None else parse_time(origin),
            enqueued_at=parse_time(d["enqueued_at"]),
            deadline=Deadline(deadline["kind"], parse_time(deadline["due_at"]), deadline["policy"]),
            repeat=Repeat(int(repeat["count"]), int(repeat["window"])),
            confidential=bool(d.get("confidential", False)),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Contact:
        """Decode UTF-8 JSON."""
        return cls.from_dict(cast(dict[str, Any], orjson.loads(data)))


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a contact, as it travels on ``{gateway}:events``.

    ``due_at``, ``elapsed_ms`` and ``met`` are set on deadline events (answered, responded,
    acknowledged, warning, breached). ``detail`` carries optional facts (a failure reason,
    a reply id) and is omitted when empty.
    """

    contact_id: str
    type: EventType
    at: Micros
    source: str
    due_at: Micros | None = None
    elapsed_ms: int | None = None
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping."""
        d: dict[str, Any] = {
            "contact_id": self.contact_id,
            "type": self.type,
            "at": format_time(self.at),
            "source": self.source,
        }
        if self.due_at is not None:
            d["due_at"] = format_time(self.due_at)
        if self.elapsed_ms is not None:
            d["elapsed_ms"] = self.elapsed_ms
        if self.met is not None:
            d["met"] = self.met
        if self.detail:
            d["detail"] = self.detail
        return d

    def to_json(self) -> bytes:
        """Encode as UTF-8 JSON."""
        return orjson.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        """Decode a mapping produced by :meth:`to_dict`."""
        due = d.get("due_at")
        return cls(
            contact_id=d["contact_id"],
            type=d["type"],
            at=parse_time(d["at"]),
            source=d["source"],
            due_at=None if due is None else parse_time(due),
            elapsed_ms=d.get("elapsed_ms"),
            met=d.get("met"),
            detail=dict(d.get("detail") or {}),
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Event:
        """Decode UTF-8 JSON."""
        return cls.from_dict(cast(dict[str, Any], orjson.loads(data)))


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply written by a case system on ``{gateway}:replies``."""

    contact_id: str
    text: str
    attachments: tuple[Attachment, ...] = ()
    id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready mapping."""
        return {
            "id": self.id,
            "contact_id": self.contact_id,
            "text": self.text,
            "attachments": [
                {
                    "name": a.name,
                    "content_type": a.content_type,
                    "size": a.size,
                    "sha256": a.sha256,
                    "ref": a.ref,
                }
                for a in self.attachments
            ],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Reply:
        """Decode a reply mapping (``id`` and ``attachments`` optional)."""
        return cls(
            contact_id=str(d["contact_id"]),
            text=str(d.get("text") or ""),
            attachments=tuple(
                Attachment(a["name"], a["content_type"], int(a["size"]), a["sha256"], a["ref"])
                for a in d.get("attachments") or ()
            ),
            id=str(d.get("id") or ""),
        )


def short_ref(contact_id: str) -> str:
    """The reference quoted to a citizen (SMS, mail): the id's last 10 hex digits, upper case.

    They are random bits of the UUIDv7, so two contacts share one with odds of 1 in 2**40.
    """
    return contact_id.replace("-", "")[-10:].upper()


_CONTROL = re.compile("[\x00\ud800-\udfff]")


def repair_text(value: str) -> str:
    """Return ``value`` as valid UTF-8 text, keeping what cannot be decoded visible and stable.

    Bytes that arrived as surrogate escapes (8-bit header bytes) and lone surrogates become
    ``\\xNN`` / ``\\udNNN`` escapes: the same input always gives the same text, so an
    identifier built from it still deduplicates a peer's resend.
    """
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def clean_text(value: str | bytes, encoding: str = "utf-8") -> str:
    """Return valid UTF-8 text: invalid sequences, lone surrogates and NUL removed."""
    if isinstance(value, bytes):
        value = value.decode(encoding, errors="ignore")
    if value.isprintable():  # no NUL (Cc) and no surrogate (Cs): nothing to remove, no regex
        return value
    return _CONTROL.sub("", value)
