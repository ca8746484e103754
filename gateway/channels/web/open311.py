"""Open311 GeoReport v2: channel type ``open311``, so existing 311 apps report straight in.

Endpoints under ``path`` (default ``/open311/v2``), each in JSON (``.json``) and XML (``.xml``):

- ``GET discovery``: this endpoint, its formats and changeset;
- ``GET services``, ``GET services/{service_code}``: the service list and attribute definitions
  from config;
- ``POST requests``: a service request (form-encoded as the spec says; multipart with a ``media``
  file and JSON are also taken) answered with ``service_request_id`` = the contact id once the
  contact is durable;
- ``GET requests/{service_request_id}`` and ``GET requests?service_request_id=a,b``: the request
  with its status (``open`` until the case system closes it).

Errors are the spec's list of ``{code, description}``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import BodyPartReader, web

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.common import Refused, submit
from gateway.channels.web.common import contact_history, read_part
from gateway.channels.web.georeport import (
    CONTACT_ID,
    FORMATS,
    MAX_FORM,
    SPEC_URL,
    Open311Error,
    Open311Service,
    ServiceRequest,
    iso_time,
    parse_request,
    to_xml,
    xml_fields,
)
from gateway.contact import safejson
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.clock import Micros
from gateway.contact.language import guess_language
from gateway.contact.phone import to_e164
from gateway.records import Attachment, Contact, Inbound, Reply, Sender
from gateway.server.auth import secrets_equal
from gateway.server.config import Secret
from gateway.server.http import MALFORMED_BODY, read_capped

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Open311Key:
    """An api_key given to one client application."""

    key: Secret
    name: str = ""


@dataclass(frozen=True, slots=True)
class Open311Config:
    """``[adapters.NAME]`` with ``type = "open311"``."""

    services: dict[str, Open311Service] = field(default_factory=dict)
    api_keys: tuple[Open311Key, ...] = ()
    require_api_key: bool = True
    """POST requests needs a configured api_key (GET endpoints are public, as in the spec)."""
    path: str = "/open311/v2"
    jurisdiction_id: str = ""
    """When set, a request naming another jurisdiction is refused (404)."""
    contact: str = ""
    """Discovery ``contact``: who runs this endpoint."""
    key_service: str = ""
    """Discovery ``key_service``: where developers ask for an api_key."""
    changeset: str = "2026-01-01T00:00:00Z"
    agency_responsible: str = ""
    service_notice: str = ""
    region: str = "CN"
    recipient: str = "open311"
    max_body: int = 30 * 1024 * 1024


# ---------------------------------------------------------------- the adapter


class Open311:
    """The GeoReport v2 endpoint."""

    channel = "web"

    def __init__(self, ctx: AdapterContext, config: Open311Config) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.config = config
        base = config.path.rstrip("/")
        router = ctx.router
        router.add_get(base + "/discovery.{fmt}", self.discovery)
        router.add_get(base + "/services.{fmt}", self.services)
        router.add_get(base + "/services/{code}.{fmt}", self.service_definition)
        router.add_post(base + "/requests.{fmt}", self.post_request)
        router.add_get(base + "/requests.{fmt}", self.get_requests)
        router.add_get(base + "/requests/{id}.{fmt}", self.get_request)
        router.add_get(base + "/tokens/{token}.{fmt}", self.get_token)

    async def start(self) -> None:
        """Routes are on the gateway's server: nothing to start."""

    async def stop(self) -> None:
        """Nothing to drain beyond the server's own in-flight requests."""

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """GeoReport v2 has no push: clients read status through ``GET requests``."""
        raise SendError("Open311 clients poll for status; no reply can be pushed", retryable=False)

    # -------------------------------------------------------------- responses

    @staticmethod
    def _fmt(request: web.Request) -> str:
        fmt = request.match_info.get("fmt", "json")
        if fmt not in ("json", "xml"):
            raise web.HTTPNotFound()
        return fmt

    @staticmethod
    def _render(
        fmt: str, root: str, item: str, rows: Sequence[Mapping[str, Any]], status: int = 200
    ) -> web.Response:
        if fmt == "xml":
            return web.Response(
                status=status,
                text=to_xml(root, item, rows),
                content_type="text/xml",
                charset="utf-8",
            )
        return web.Response(
            status=status, body=orjson.dumps(list(rows)), content_type="application/json"
        )

    def _error(self, fmt: str, status: int, description: str) -> web.Response:
        return self._render(
            fmt, "errors", "error", [{"code": status, "description": description}], status
        )

    def _foreign(self, given: object) -> bool:
        """True when ``jurisdiction_id`` names another jurisdiction than the configured one
        (every method takes it; it is optional, so an absent one is ours)."""
        wanted = self.config.jurisdiction_id
        return bool(wanted and given and given != wanted)

    def _origin(self, request: web.Request) -> str:
        return self.ctx.settings.http.public_url.rstrip("/") or str(request.url.origin())

    # -------------------------------------------------------------- discovery and services

    async def discovery(self, request: web.Request) -> web.Response:
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        base = self._origin(request) + self.config.path.rstrip("/")
        doc = {
            "changeset": self.config.changeset,
            "contact": self.config.contact,
            "key_service": self.config.key_service,
            "endpoints": [
                {
                    "specification": SPEC_URL,
                    "url": base,
                    "changeset": self.config.changeset,
                    "type": "production",
                    "formats": list(FORMATS),
                }
            ],
        }
        if fmt == "xml":
            xml = (
                '<?xml version="1.0" encoding="utf-8"?><discovery>'
                + xml_fields(doc)
                + "</discovery>"
            )
            return web.Response(text=xml, content_type="text/xml", charset="utf-8")
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def services(self, request: web.Request) -> web.Response:
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        rows = [
            {
                "service_code": code,
                "service_name": s.name,
                "description": s.description,
                "metadata": bool(s.attributes),
                "type": s.type,
                "keywords": ",".join(s.keywords),
                "group": s.group,
            }
            for code, s in self.config.services.items()
        ]
        return self._render(fmt, "services", "service", rows)

    async def service_definition(self, request: web.Request) -> web.Response:
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        code = request.match_info["code"]
        service = self.config.services.get(code)
        if service is None:
            return self._error(fmt, 404, "service_code not found")
        attributes = [
            {
                "variable": a.variable,
                "code": a.code,
                "datatype": a.datatype,
                "required": a.required,
                "datatype_description": a.datatype_description,
                "order": a.order or i + 1,
                "description": a.description,
                "values": [{"key": k, "name": v} for k, v in a.values.items()],
            }
            for i, a in enumerate(service.attributes)
        ]
        doc = {"service_code": code, "attributes": attributes}
        if fmt == "xml":
            xml = (
                '<?xml version="1.0" encoding="utf-8"?><service_definition>'
                + xml_fields(doc)
                + "</service_definition>"
            )
            return web.Response(text=xml, content_type="text/xml", charset="utf-8")
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    # -------------------------------------------------------------- requests

    def _check_key(self, given: str) -> str | None:
        """Return the client name for ``given`` (every key compared), or None."""
        found: str | None = None
        for entry in self.config.api_keys:
            if secrets_equal(given, entry.key.reveal()) and found is None:
                found = entry.name or "client"
        return found

    def _authorize(self, request: web.Request, form: dict[str, str | list[str]]) -> str | None:
        """The client of the request's ``api_key`` (a form field, or the query string, which
        is checked before any of the body is read); raise 403 when one is required and it is
        missing or wrong."""
        given = form.get("api_key") or request.query.get("api_key", "")
        client = self._check_key(given if isinstance(given, str) else "")
        if self.config.require_api_key and client is None:
            raise Open311Error(403, "api_key is missing or invalid")
        return client

    async def post_request(self, request: web.Request) -> web.Response:
        """Take one service request; answer with its id once it is durable."""
        received_at = self.ctx.clock.now_us()
        fmt = self._fmt(request)
        if request.content_length is not None and request.content_length > self.config.max_body:
            return self._error(fmt, 413, "request too large")
        try:
            form, files = await self._read_form(request)
            client = self._authorize(request, form)
            if self._foreign(form.get("jurisdiction_id") or request.query.get("jurisdiction_id")):
                raise Open311Error(404, "jurisdiction_id not found")
            req = parse_request(form, self.config.services)
            # stored only once the request is valid: a refused one leaves nothing behind
            media = tuple([await self.ctx.attachments.put(*file) for file in files])
        except Open311Error as exc:
            return self._error(fmt, exc.status, exc.description)
        except AttachmentTooLarge:
            return self._error(fmt, 413, "media too large")
        except MALFORMED_BODY as exc:
            return self._error(fmt, 400, f"malformed body: {type(exc).__name__}")
        if media and not req.media_url:  # an uploaded photo: its URL on this gateway
            req = dataclasses.replace(req, media_url=self._origin(request) + media[0].ref)
        inbound = self._inbound(
            req, client, received_at, media, request.headers.get("Idempotency-Key", "")
        )
        try:
            receipt = await submit(self.ctx, inbound)
        except Refused as exc:
            return exc.answer(functools.partial(self._error, fmt))
        row = {
            "service_request_id": receipt.contact_id,
            "service_notice": self.config.service_notice,
            "account_id": req.account_id or None,
        }
        return self._render(
            fmt, "service_requests", "request", [row], 201 if receipt.status != "duplicate" else 200
        )

    def _inbound(
        self,
        req: ServiceRequest,
        client: str | None,
        received_at: Micros,
        media: tuple[Attachment, ...],
        idempotency_key: str,
    ) -> Inbound:
        service = self.config.services[req.service_code]
        phone = to_e164(req.phone, self.config.region) if req.phone else None
        if req.email:
            address = req.email
        elif phone:
            address = phone
        elif req.account_id:
            address = f"open311:account:{req.account_id}"
        elif req.device_id:
            address = f"open311:device:{req.device_id}"
        else:
            address = "open311:anonymous"
        name = " ".join(p for p in (req.first_name, req.last_name) if p) or None
        details: dict[str, Any] = {
            "service_code": req.service_code,
            "service_name": service.name,
            "attributes": req.attributes,
        }
        for key in (
            "address_string",
            "address_id",
            "media_url",
            "device_id",
            "account_id",
            "email",
        ):
            value = getattr(req, key)
            if value:
                details[key] = value
        if phone:
            details["phone"] = phone
        if client:
            details["client"] = client
        meta: dict[str, Any] = {"open311": details}
        if req.lat is not None and req.long is not None:
            meta["location"] = {"lat": req.lat, "lon": req.long}
        if req.address_string:
            meta.setdefault("location", {})["address"] = req.address_string
        return Inbound(
            channel="web",
            adapter=self.name,
            external_id=idempotency_key[:200] if idempotency_key else "",
            sender=Sender(address, name),
            recipient=self.config.recipient,
            received_at=received_at,
            text=req.description,
            subject=service.name,
            language=guess_language(req.description),
            attachments=media,
            meta=meta,
        )

    async def _read_form(
        self, request: web.Request
    ) -> tuple[dict[str, str | list[str]], list[tuple[bytes, str, str]]]:
        """The form fields, and the media file still in memory: nothing is stored before the
        api_key (a form field) has been checked."""
        form: dict[str, str | list[str]] = {}

        def add(key: str, value: str) -> None:
            old = form.get(key)
            if old is None:
                form[key] = value
            elif isinstance(old, list):
                old.append(value)
            else:
                form[key] = [old, value]

        media: list[tuple[bytes, str, str]] = []
        ctype = request.content_type
        if "api_key" in request.query:  # a key in the URL: refused before the body is read
            self._authorize(request, {})
        if ctype == "multipart/form-data":
            reader = await request.multipart()
            total = 0
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise Open311Error(400, "nested multipart is not supported")
                if part.filename:
                    if media:
                        raise Open311Error(400, "one media file per request")
                    self._authorize(request, form)  # the key comes first: no file read before
                    data = await read_part(
                        part, min(self.ctx.attachments.max_size, self.config.max_body)
                    )
                    content_type = part.headers.get("Content-Type", "application/octet-stream")
                    media.append((data, part.filename, content_type))
                    continue
                value = await read_part(part, MAX_FORM)
                total += len(value)
                if total > MAX_FORM:
                    raise Open311Error(413, "form too large")
                add(part.name or "", value.decode("utf-8", errors="replace"))
            return form, media
        raw = await read_capped(request.content, MAX_FORM)
        if raw is None:
            raise Open311Error(413, "form too large")
        if ctype == "application/json":
            try:
                doc = safejson.loads(raw)
            except safejson.BadJson as exc:
                raise Open311Error(400, f"body: {exc}") from None
            if not isinstance(doc, dict):
                raise Open311Error(400, "expected a JSON object")
            for key, value in doc.items():
                if key == "attribute" and isinstance(value, dict):
                    for code, v in value.items():
                        for item in v if isinstance(v, list) else [v]:
                            add(
                                f"attribute[{code}]" + ("[]" if isinstance(v, list) else ""),
                                str(item),
                            )
                elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
                    add(key, str(value))
                elif value is not None:
                    raise Open311Error(400, f"{str(key)[:64]}: expected a string or number")
            return form, []
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Open311Error(400, "form is not UTF-8") from None
        try:
            pairs = parse_qsl(
                text, keep_blank_values=True, strict_parsing=False, max_num_fields=200
            )
        except ValueError:
            raise Open311Error(400, "too many form fields") from None
        for name, item in pairs:
            add(name, item)
        return form, []

    async def _status_rows(self, ids: Sequence[str]) -> list[dict[str, Any]]:
        rows = []
        for contact_id in ids:
            if not CONTACT_ID.match(contact_id):
                continue
            contact = await self.ctx.contacts.get(contact_id)
            if contact is None or contact.adapter != self.name:
                continue
            rows.append(await self._row(contact))
        return rows

    async def _row(self, contact: Contact) -> dict[str, Any]:
        details = contact.meta.get("open311", {})
        location = contact.meta.get("location", {})
        stamps = await contact_history(self.ctx.contacts, contact.id)
        closed = stamps.get("closed")
        updated = max([contact.enqueued_at, *stamps.values()])
        status_notes = ""
        if closed is not None:
            status_notes = "closed"
        elif "responded" in stamps:
            status_notes = "responded"
        row: dict[str, Any] = {
            "service_request_id": contact.id,
            "status": "closed" if closed is not None else "open",
            "status_notes": status_notes,
            "service_name": details.get("service_name", contact.subject or ""),
            "service_code": details.get("service_code", ""),
            "description": "" if contact.confidential else contact.text,
            "agency_responsible": self.config.agency_responsible,
            "service_notice": self.config.service_notice,
            "requested_datetime": iso_time(contact.received_at),
            "updated_datetime": iso_time(updated),
            "expected_datetime": None,
            "address": "" if contact.confidential else location.get("address", ""),
            "address_id": details.get("address_id", ""),
            "zipcode": None,
            "lat": None if contact.confidential else location.get("lat"),
            "long": None if contact.confidential else location.get("lon"),
            "media_url": details.get("media_url", ""),
        }
        return row

    async def get_request(self, request: web.Request) -> web.Response:
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        rows = await self._status_rows([request.match_info["id"][:64]])
        if not rows:
            return self._error(fmt, 404, "service_request_id not found")
        return self._render(fmt, "service_requests", "request", rows)

    async def get_requests(self, request: web.Request) -> web.Response:
        """``service_request_id=a,b,c`` (the spec's lookup by ids); searching is not offered."""
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        ids = [i for i in request.query.get("service_request_id", "").split(",") if i][:50]
        return self._render(fmt, "service_requests", "request", await self._status_rows(ids))

    async def get_token(self, request: web.Request) -> web.Response:
        """``GET tokens/{token}``: POST answers the service_request_id at once, so the only
        tokens are those ids; an unknown one is the spec's error list, 404."""
        fmt = self._fmt(request)
        if self._foreign(request.query.get("jurisdiction_id")):
            return self._error(fmt, 404, "jurisdiction_id not found")
        token = request.match_info["token"][:64]
        rows = await self._status_rows([token])
        if not rows:
            return self._error(fmt, 404, "token not found")
        row = {"service_request_id": rows[0]["service_request_id"], "token": token}
        return self._render(fmt, "service_requests", "request", [row])


CHANNEL: ChannelType[Open311Config] = ChannelType(
    name="open311",
    channel="web",
    config=Open311Config,
    factory=Open311,
    example={"services": {"001": {"name": "Streetlight out"}}, "require_api_key": False},
)

__all__ = ["CHANNEL", "Open311", "Open311Config", "parse_request", "to_xml"]
