"""``POST /v1/intake``: a partial contact as JSON, answered 202 once it is durable."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from gateway.adapters import IntakeUnavailable, InvalidContact, Receipt, Submitter, load_media
from gateway.contact import safejson
from gateway.contact.clock import Clock, format_time, parse_rfc3339
from gateway.contact.language import guess_language
from gateway.contact.phone import to_e164
from gateway.records import Inbound, Sender, clean_text
from gateway.server.auth import ApiKeys, key_in, source_of
from gateway.server.config import ApiKey
from gateway.server.fastpost import Answer, Post, problem_answer, raw_answer
from gateway.server.http import RawResponse, add_direct, can_answer_raw, read_capped
from gateway.server.problems import ApiProblem, problem

MAX_TEXT = 64 * 1024
_JSON = {"Content-Type": "application/json; charset=utf-8"}
_JSON_TYPE = b"application/json; charset=utf-8"
_ACCEPTED = b"HTTP/1.1 202 Accepted"


_KNOWN = frozenset({
    "channel",
    "sender",
    "recipient",
    "subject",
    "text",
    "external_id",
    "language",
    "confidential",
    "meta",
    "thread",
    "origin_at",
})
_SENDER_KNOWN = frozenset({"address", "name"})


class BadRequest(ValueError):
    """The request body does not describe a contact."""


def _opt_str(body: dict[str, Any], name: str, limit: int = 1024) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name}: expected a string")
    if len(value) > limit:
        raise BadRequest(f"{name}: longer than {limit} characters")
    return clean_text(value)


def parse_intake(body: object, received_at: int, adapter: str, region: str = "CN") -> Inbound:
    """Validate a ``/v1/intake`` body and build the Inbound; raise BadRequest.

    The sender of an sms or voice contact is normalized to E.164 (``region`` for numbers
    without a country code) when it is a phone number.
    """
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    if not _KNOWN.issuperset(body):
        raise BadRequest(f"unknown field: {sorted(set(body) - _KNOWN)[0]}")
    channel = body.get("channel", "web")
    media = load_media()
    if not isinstance(channel, str) or channel not in media:
        raise BadRequest(f"channel: expected a registered medium ({', '.join(media.names())})")
    sender_raw = body.get("sender")
    if sender_raw is None:
        sender_raw = {}
    if isinstance(sender_raw, str):
        sender_raw = {"address": sender_raw}
    if not isinstance(sender_raw, dict) or not isinstance(sender_raw.get("address", ""), str):
        raise BadRequest("sender: expected an object with an address")
    if not _SENDER_KNOWN.issuperset(sender_raw):
        raise BadRequest(f"unknown field: sender.{sorted(set(sender_raw) - _SENDER_KNOWN)[0]}")
    name = sender_raw.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("sender.name: expected a string")
    address = clean_text(sender_raw.get("address", ""))[:320]
    if media.by_name[channel].phone and address:
        address = to_e164(address, region) or address
    sender = Sender(address, clean_text(name) if name else None)
    confidential = body.get("confidential", False)
    if not isinstance(confidential, bool):
        raise BadRequest("confidential: expected true or false")
    meta = body.get("meta", {})
    if not isinstance(meta, dict):
        raise BadRequest("meta: expected an object")
    origin_raw = _opt_str(body, "origin_at", 64)
    try:
        origin_at = parse_rfc3339(origin_raw) if origin_raw is not None else None
    except ValueError as exc:
        raise BadRequest("origin_at: expected an RFC 3339 time") from exc
    external_id = _opt_str(body, "external_id", 512) or ""
    recipient = _opt_str(body, "recipient", 320) or ""
    text = _opt_str(body, "text", MAX_TEXT) or ""
    subject = _opt_str(body, "subject", 998)
    language = _opt_str(body, "language", 35)
    if language is None and text:
        # Intake's own hint (Intake.prepare), given here: the Inbound is built once, not twice
        language = guess_language(text)
    return Inbound(
        channel=channel,
        adapter=adapter,
        external_id=external_id,
        sender=sender,
        recipient=recipient,
        received_at=received_at,
        text=text,
        subject=subject,
        language=language,
        thread=_opt_str(body, "thread", 512),
        origin_at=origin_at,
        confidential=confidential,
        meta=meta,
    )


class IntakeApi:
    """The JSON intake endpoint."""

    def __init__(
        self, intake: Submitter, keys: ApiKeys, clock: Clock, max_body: int, region: str = "CN"
    ) -> None:
        self.intake = intake
        self.keys = keys
        self.clock = clock
        self.max_body = max_body
        self.region = region

    def register(self, app: web.Application, fast: bool = True) -> None:
        """``POST /v1/intake``; with ``fast`` also answered from the connection."""
        add_direct(app, "POST", "/v1/intake", self.post, fast=self.fast if fast else None)

    async def post(self, request: web.Request) -> web.StreamResponse:
        received_at = self.clock.now_us()
        try:
            key = self.keys.authorize(request, "intake")
            declared = request.content_length  # a property that parses the header each time
            if declared is not None and declared > self.max_body:
                raise ApiProblem(413, f"body larger than {self.max_body} bytes")
            raw = await read_capped(request.content, self.max_body)
            if raw is None:
                raise ApiProblem(413, f"body larger than {self.max_body} bytes")
            inbound = self._inbound(raw, key, received_at)
        except ApiProblem as exc:
            return exc.response()
        try:
            receipt = await self.intake.submit(inbound)
        except (InvalidContact, IntakeUnavailable) as exc:
            return problem(*_refusal(exc))
        answer = _accepted(receipt)
        if can_answer_raw(request):  # the whole answer in one piece
            return RawResponse(202, "Accepted", raw_answer(_ACCEPTED, _JSON_TYPE, answer))
        # the bytes as they are: json_response would decode them and encode them again
        return web.Response(body=answer, status=202, headers=_JSON)

    def fast(self, request: Post) -> Awaitable[Answer] | None:
        """``post`` for a request taken from the connection (``fastpost``): the same checks,
        and None for every request they refuse (aiohttp then answers it through ``post``);
        else the write and its answer."""
        received_at = self.clock.now_us()
        try:
            key = self.keys.check(
                key_in(request.authorization, request.api_key), request.remote, "intake"
            )
            if len(request.body) > self.max_body:
                return None
            inbound = self._inbound(request.body, key, received_at)
        except ApiProblem:
            return None
        return self._write(inbound)

    def _inbound(self, raw: bytes, key: ApiKey | None, received_at: int) -> Inbound:
        """The contact a body describes; ``ApiProblem`` 400 if none."""
        try:
            body = safejson.loads(raw)
        except safejson.BadJson as exc:
            raise ApiProblem(400, f"body: {exc}") from exc
        try:
            return parse_intake(body, received_at, source_of(key), self.region)
        except BadRequest as exc:
            raise ApiProblem(400, str(exc)) from exc

    async def _write(self, inbound: Inbound) -> Answer:
        try:
            receipt = await self.intake.submit(inbound)
        except (InvalidContact, IntakeUnavailable) as exc:
            status, detail, headers = _refusal(exc)
            return status, problem_answer(status, detail, headers)
        return 202, raw_answer(_ACCEPTED, _JSON_TYPE, _accepted(receipt))


def _refusal(exc: InvalidContact | IntakeUnavailable) -> tuple[int, str, dict[str, str] | None]:
    """The problem answering a contact Intake refused."""
    if isinstance(exc, InvalidContact):
        return 400, str(exc), None
    return 503, "queue unavailable, retry later", {"Retry-After": "5"}


def _accepted(receipt: Receipt) -> bytes:
    """The 202's body."""
    deadline = receipt.deadline
    return orjson.dumps(
        {
            "id": receipt.contact_id,
            "status": receipt.status,
            "deadline": {
                "kind": deadline.kind,
                "due_at": format_time(deadline.due_at),
                "policy": deadline.policy,
            },
            "repeat": {"count": receipt.repeat.count, "window": receipt.repeat.window},
        }
    )
