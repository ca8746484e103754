"""App intake: channel type ``app``, for the hotline's own mobile and web clients.

``POST /v1/apps/{app}/contacts`` extends the core ``POST /v1/intake`` contact (same JSON fields,
validated by ``gateway.server.intake_api.parse_intake``) with what client apps need:

- a key per app (``Authorization: Bearer <key>`` or ``X-API-Key``), compared in constant time;
- ``location``: ``{"lat", "lon", "accuracy_m", "address"}``;
- ``confidential``: the citizen asked for confidential handling;
- attachments: send ``multipart/form-data`` with the contact as a JSON part named ``contact``
  (or as plain form fields) and any number of file parts (photos, recordings, documents).

Answers 202 ``{"id", "status", "deadline"}`` once the contact is durable; 503 + Retry-After when
it cannot be; a retried ``external_id`` answers the first contact's id.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import BodyPartReader, web

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.common import Refused, submit
from gateway.channels.web.common import contact_history, read_part
from gateway.contact import safejson
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.clock import format_time
from gateway.contact.language import guess_language
from gateway.records import Contact, Inbound, Reply
from gateway.server.auth import presented_key, secrets_equal
from gateway.server.config import Secret
from gateway.server.http import MALFORMED_BODY, read_capped
from gateway.server.intake_api import BadRequest, parse_intake
from gateway.server.problems import problem

log = logging.getLogger(__name__)

_FORM_FIELDS: Final = frozenset(
    {
        "text",
        "subject",
        "sender",
        "sender_name",
        "external_id",
        "language",
        "confidential",
        "thread",
        "lat",
        "lon",
        "accuracy_m",
        "address",
    }
)
_MAX_FIELD: Final = 64 * 1024
_CONTACT_ID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class AppClient:
    """One client app and its key."""

    key: Secret
    name: str = ""


@dataclass(frozen=True, slots=True)
class AppConfig:
    """``[adapters.NAME]`` with ``type = "app"``; ``apps.<id>.key`` per client app."""

    apps: dict[str, AppClient] = field(default_factory=dict)
    path: str = "/v1/apps"
    max_body: int = 30 * 1024 * 1024
    """Whole request bound (files included); each file is also bounded by intake.max_attachment."""
    max_files: int = 10
    recipient: str = ""
    """What ``contact.recipient`` says when the client gives none (e.g. the hotline number)."""


def parse_location(value: Any) -> dict[str, Any]:
    """Validate ``location``; raise BadRequest."""
    if not isinstance(value, dict):
        raise BadRequest("location: expected an object")
    unknown = sorted(set(value) - {"lat", "lon", "accuracy_m", "address"})
    if unknown:
        raise BadRequest(f"location: unknown field {unknown[0]}")
    out: dict[str, Any] = {}
    for name, bound in (("lat", 90.0), ("lon", 180.0)):
        raw = value.get(name)
        if raw is None:
            continue
        number = _number(raw, f"location.{name}")
        if abs(number) > bound:
            raise BadRequest(f"location.{name}: out of range")
        out[name] = number
    if ("lat" in out) != ("lon" in out):
        raise BadRequest("location: lat and lon go together")
    if value.get("accuracy_m") is not None:
        out["accuracy_m"] = abs(_number(value["accuracy_m"], "location.accuracy_m"))
    address = value.get("address")
    if address is not None:
        if not isinstance(address, str) or len(address) > 1024:
            raise BadRequest("location.address: expected a string of at most 1024 characters")
        out["address"] = address
    if not out:
        raise BadRequest("location: give lat and lon, or an address")
    return out


def _number(raw: Any, name: str) -> float:
    if isinstance(raw, bool):
        raise BadRequest(f"{name}: expected a number")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}: expected a number") from None
    if not math.isfinite(number):
        raise BadRequest(f"{name}: expected a finite number")
    return number


def form_to_body(fields: dict[str, str]) -> dict[str, Any]:
    """Turn plain multipart form fields into the JSON contact shape; raise BadRequest."""
    unknown = sorted(set(fields) - _FORM_FIELDS)
    if unknown:
        raise BadRequest(f"unknown field: {unknown[0]}")
    body: dict[str, Any] = {
        k: fields[k]
        for k in ("text", "subject", "external_id", "language", "thread")
        if k in fields
    }
    if "sender" in fields or "sender_name" in fields:
        body["sender"] = {"address": fields.get("sender", ""), "name": fields.get("sender_name")}
    if "confidential" in fields:
        flag = fields["confidential"].strip().lower()
        if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            raise BadRequest("confidential: expected true or false")
        body["confidential"] = flag in ("true", "1", "yes", "on")
    location = {k: fields[k] for k in ("lat", "lon", "accuracy_m", "address") if k in fields}
    if location:
        body["location"] = location
    return body


class AppIntake:
    """The app intake endpoint; replies to app contacts are fetched by the app, not pushed."""

    channel = "web"

    def __init__(self, ctx: AdapterContext, config: AppConfig) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.config = config
        base = config.path.rstrip("/") + "/{app}/contacts"
        ctx.router.add_post(base, self.post)
        ctx.router.add_get(base + "/{id}", self.get)

    async def start(self) -> None:
        """Routes are on the gateway's server: nothing to start."""

    async def stop(self) -> None:
        """Nothing to drain beyond the server's own in-flight requests."""

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Apps have no push channel here: case systems answer through their own app backend."""
        raise SendError("the app channel takes no pushed replies", retryable=False)

    def _authorize(self, request: web.Request, app: str) -> AppClient | None:
        client = self.config.apps.get(app)
        given = presented_key(request) or ""
        # Compare even for an unknown app, so timing does not tell which apps exist.
        expected = client.key.reveal() if client is not None else "\x00" * 32
        ok = secrets_equal(given, expected)
        return client if ok and client is not None and given else None

    async def get(self, request: web.Request) -> web.Response:
        """The status of one of this app's contacts: open, responded or closed."""
        app = request.match_info["app"]
        if self._authorize(request, app) is None:
            return problem(403, "unknown app or wrong key")
        contact_id = request.match_info["id"]
        contact = await self.ctx.contacts.get(contact_id) if _CONTACT_ID.match(contact_id) else None
        if contact is None or contact.adapter != self.name or contact.meta.get("app") != app:
            return problem(404, "no such contact for this app")
        history = await contact_history(self.ctx.contacts, contact.id)
        status = (
            "closed" if "closed" in history else "responded" if "responded" in history else "open"
        )
        return web.Response(
            body=orjson.dumps(
                {
                    "id": contact.id,
                    "status": status,
                    "received_at": format_time(contact.received_at),
                    "deadline": {
                        "kind": contact.deadline.kind,
                        "due_at": format_time(contact.deadline.due_at),
                        "policy": contact.deadline.policy,
                    },
                    "events": {k: format_time(v) for k, v in sorted(history.items())},
                }
            ),
            content_type="application/json",
        )

    async def post(self, request: web.Request) -> web.Response:
        """Take one contact from a client app."""
        received_at = self.ctx.clock.now_us()
        app = request.match_info["app"]
        if self._authorize(request, app) is None:
            return problem(403, "unknown app or wrong key")
        if request.content_length is not None and request.content_length > self.config.max_body:
            return problem(413, f"body larger than {self.config.max_body} bytes")
        files: list[tuple[bytes, str, str]] = []
        try:
            if request.content_type == "multipart/form-data":
                body = await self._read_multipart(request, files)
            else:
                raw = await read_capped(request.content, _MAX_FIELD)
                if raw is None:
                    return problem(413, f"JSON body larger than {_MAX_FIELD} bytes")
                try:
                    body = safejson.loads(raw)
                except safejson.BadJson as exc:
                    return problem(400, f"body: {exc}")
            inbound = self._inbound(body, app, received_at, bool(files))
            # stored only once the whole request is valid: a refused upload leaves nothing
            attachments = [await self.ctx.attachments.put(*file) for file in files]
            inbound = dataclasses.replace(inbound, attachments=tuple(attachments))
        except BadRequest as exc:
            return problem(400, str(exc))
        except AttachmentTooLarge as exc:
            return problem(413, f"attachment too large: {exc}")
        except MALFORMED_BODY as exc:
            return problem(400, f"malformed body: {type(exc).__name__}")
        try:
            receipt = await submit(self.ctx, inbound)
        except Refused as exc:
            return exc.answer(problem)
        return web.Response(
            status=202,
            body=orjson.dumps(
                {
                    "id": receipt.contact_id,
                    "status": receipt.status,
                    "deadline": {
                        "kind": receipt.deadline.kind,
                        "due_at": format_time(receipt.deadline.due_at),
                        "policy": receipt.deadline.policy,
                    },
                    "attachments": [
                        {"name": a.name, "size": a.size, "sha256": a.sha256} for a in attachments
                    ],
                }
            ),
            content_type="application/json",
        )

    def _inbound(self, body: Any, app: str, received_at: int, has_files: bool) -> Inbound:
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        body = dict(body)
        location = (
            parse_location(body.pop("location")) if body.get("location") is not None else None
        )
        body.pop("location", None)
        if body.get("channel", "web") != "web":
            raise BadRequest("channel: the app endpoint takes web contacts only")
        inbound = parse_intake(body, received_at, self.name)
        if not inbound.text and not has_files and location is None:
            raise BadRequest("give text, a location or an attachment")
        meta = {**inbound.meta, "app": app}
        if location is not None:
            meta["location"] = location
        return dataclasses.replace(
            inbound,
            external_id=f"{app}:{inbound.external_id}" if inbound.external_id else "",
            recipient=inbound.recipient or self.config.recipient,
            language=inbound.language or guess_language(inbound.text),
            meta=meta,
        )

    async def _read_multipart(
        self, request: web.Request, files: list[tuple[bytes, str, str]]
    ) -> dict[str, Any]:
        reader = await request.multipart()
        fields: dict[str, str] = {}
        contact: Any = None
        total = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart is not supported")
            if part.filename:
                if len(files) >= self.config.max_files:
                    raise BadRequest(f"more than {self.config.max_files} files")
                limit = min(self.ctx.attachments.max_size, self.config.max_body - total)
                data = await read_part(part, limit)
                total += len(data)
                content_type = part.headers.get("Content-Type", "application/octet-stream")
                files.append((data, part.filename, content_type))
                continue
            name = part.name or ""
            value = await read_part(part, _MAX_FIELD)
            total += len(value)
            if name == "contact":
                try:
                    contact = safejson.loads(value)
                except safejson.BadJson as exc:
                    raise BadRequest(f"contact: {exc}") from None
            else:
                fields[name] = value.decode("utf-8", errors="replace")
        if contact is not None:
            if fields:
                raise BadRequest("give the contact as one JSON part or as form fields, not both")
            if not isinstance(contact, dict):
                raise BadRequest("contact: expected a JSON object")
            return contact
        return form_to_body(fields)


CHANNEL: ChannelType[AppConfig] = ChannelType(
    name="app",
    channel="web",
    config=AppConfig,
    factory=AppIntake,
    example={"apps": {"citizen-ios": {"key": "change-me"}}},
)
