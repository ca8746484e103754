"""The consumer HTTP API (``/v1/...``), described by ``gateway/cases/api/openapi.json``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError, ResponseError

from gateway.cases.api.openapi import document_bytes
from gateway.contact import safejson
from gateway.contact.attachments import REF_PREFIX, AttachmentStore, AttachmentTooLarge
from gateway.contact.clock import MICROS_PER_SECOND, Clock, parse_rfc3339
from gateway.contact.ids import uuid7
from gateway.queueing.consumer import post_reply
from gateway.queueing.store import RedisQueue
from gateway.records import Attachment, Event, Reply, clean_text
from gateway.server.auth import ApiKeys, source_of
from gateway.server.config import ApiKey, parse_duration
from gateway.server.http import read_capped
from gateway.server.metrics import Metrics
from gateway.server.problems import ApiProblem, problem

log = logging.getLogger(__name__)

OPENAPI: bytes = document_bytes()

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENTRY_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")
CONTACT_ID = re.compile(r"[A-Za-z0-9-]{1,64}")
"""Patterns used with ``fullmatch`` (``$`` would let a trailing newline through)."""
RESERVED_GROUP_PREFIX = "gateway-"

SINCE = re.compile(
    r"[1-9][0-9]{0,6}s|[1-9][0-9]{0,4}m|[1-9][0-9]{0,2}h|(?:[1-9][0-9]?|[1-3][0-9]{2}|400)d"
)
"""``since`` of the report: 1s to 400d, in the forms the document states (and nothing else)."""
BOOLEANS = ("true", "false", "1", "0")

MAX_COUNT = 1000
MAX_WAIT_MS = 30_000
BLOCK_SLICE_MS = 2_000
"""One XREADGROUP blocks at most this long, below the client's socket timeout."""
MAX_LONG_POLLS = 256
MAX_TEXT = 64 * 1024
MAX_ATTACHMENTS = 10
MAX_DETAIL = 4096
FUTURE_SKEW_US = 60 * MICROS_PER_SECOND
STREAMS = ("contacts", "events")
RECORD = {"contacts": b"contact", "events": b"event"}

Handler = Callable[["ConsumerApi", web.Request, ApiKey | None], Awaitable[web.StreamResponse]]


def operation(
    name: str, scope: str
) -> Callable[[Handler], Callable[[ConsumerApi, web.Request], Awaitable[web.StreamResponse]]]:
    """Authorize, turn ``ApiProblem`` and Redis failures into problem responses, count."""

    def wrap(
        fn: Handler,
    ) -> Callable[[ConsumerApi, web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(fn)
        async def handler(self: ConsumerApi, request: web.Request) -> web.StreamResponse:
            try:
                key = self.keys.authorize(request, scope)
                response = await fn(self, request, key)
            except ApiProblem as exc:
                response = problem(exc.status, exc.detail, exc.headers)
            except (RedisError, OSError) as exc:
                log.warning("api %s: queue unavailable (%s)", name, type(exc).__name__)
                response = problem(503, "queue unavailable, retry later", {"Retry-After": "2"})
            except Exception:  # a bug: answered and counted like every other outcome
                log.exception("api %s: internal error", name)
                response = problem(500, "internal error")
            self.metrics.api_requests.labels(name, str(response.status)).inc()
            return response

        return handler

    return wrap


def json_body(data: bytes | dict[str, Any], status: int = 200) -> web.Response:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(body=body, status=status, content_type="application/json")


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise ApiProblem(400, f"{name}: expected an integer from {low} to {high}")
    return int(raw)


def name_param(value: object, what: str) -> str:
    if value is None:
        raise ApiProblem(400, f"{what}: required")
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ApiProblem(400, f"{what}: 1-64 letters, digits, '.', '_' or '-'")
    return value


def group_param(request: web.Request) -> str:
    group = name_param(request.match_info["group"], "group")
    if group.startswith(RESERVED_GROUP_PREFIX):
        raise ApiProblem(400, f"group: names starting with {RESERVED_GROUP_PREFIX!r} are reserved")
    return group


def entry_id(value: object) -> bool:
    """True for a stream entry id as documented: ``<ms>-<seq>``, at most 19 digits each, so
    always one Redis accepts (its parts go up to 2^64 - 1, 20 digits)."""
    return isinstance(value, str) and ENTRY_ID.fullmatch(value) is not None


def _int_field(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, float) and value.is_integer():  # JSON 67.0 is the integer 67
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiProblem(400, f"{name}: expected an integer from {low} to {high}")
    return value


def _known(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiProblem(400, f"unknown field: {unknown[0]}")


class ConsumerApi:
    """Routes of the consumer API. Group reads are long polls; every other call is short."""

    def __init__(
        self,
        queue: RedisQueue,
        keys: ApiKeys,
        attachments: AttachmentStore,
        clock: Clock,
        metrics: Metrics,
        *,
        max_body: int,
        report: Callable[[float, str, bool], Awaitable[dict[str, Any]]],
        deadletter: Any = None,
    ) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.prefix = queue.keys.prefix
        self.keys = keys
        self.attachments = attachments
        self.clock = clock
        self.metrics = metrics
        self.max_body = max_body
        self.report_source = report
        self.deadletter = deadletter
        self.closing = False
        """Set when the gateway stops: long polls answer at their next slice."""
        self._long_polls = asyncio.Semaphore(MAX_LONG_POLLS)
        self._groups: set[tuple[str, str]] = set()

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/openapi.json", self.openapi)
        for stream in STREAMS:
            router.add_get(f"/v1/groups/{{group}}/{stream}", self.read_group)
            router.add_post(f"/v1/groups/{{group}}/{stream}/ack", self.ack)
            router.add_post(f"/v1/groups/{{group}}/{stream}/reclaim", self.reclaim)
        router.add_get("/v1/contacts/{contact_id}", self.get_contact)
        router.add_post("/v1/contacts/{contact_id}/replies", self.post_reply)
        router.add_post("/v1/contacts/{contact_id}/events", self.post_event)
        router.add_get("/v1/report", self.report)
        router.add_get("/v1/admin/deadletter", self.deadletter_list)
        router.add_get("/v1/admin/deadletter/{subscriber}", self.deadletter_entries)
        router.add_post("/v1/admin/deadletter/{subscriber}/replay", self.deadletter_replay)

    # ------------------------------------------------------------------ helpers

    def _stream(self, request: web.Request) -> str:
        resource = request.match_info.route.resource
        parts = resource.canonical.split("/") if resource is not None else []
        return "events" if len(parts) > 4 and parts[4] == "events" else "contacts"

    def _stream_key(self, stream: str) -> str:
        return self.queue.keys.events if stream == "events" else self.queue.keys.contacts

    async def _json(self, request: web.Request, limit: int = 64 * 1024) -> dict[str, Any]:
        limit = min(limit, self.max_body)
        if request.content_length == 0:
            return {}
        ctype = request.headers.get("Content-Type", "application/json").split(";")[0].strip()
        if ctype.lower() not in ("application/json", ""):
            raise ApiProblem(415, "expected Content-Type: application/json")
        if request.content_length is not None and request.content_length > limit:
            raise ApiProblem(413, f"body larger than {limit} bytes")
        raw = await read_capped(request.content, limit)
        if raw is None:
            raise ApiProblem(413, f"body larger than {limit} bytes")
        try:
            body = safejson.loads(raw or b"{}")
        except safejson.BadJson as exc:
            raise ApiProblem(400, f"body: {exc}") from exc
        if not isinstance(body, dict):
            raise ApiProblem(400, "expected a JSON object")
        return body

    async def _ensure_group(self, stream_key: str, group: str, start: str) -> None:
        if (stream_key, group) in self._groups:
            return
        try:
            await self.redis.xgroup_create(stream_key, group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((stream_key, group))

    def _entries(self, stream: str, entries: list[Any]) -> list[bytes]:
        field = RECORD[stream]
        out: list[bytes] = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            head = b'{"entry_id":"' + eid.encode() + b'","' + field + b'":'
            if not fields or field not in fields:
                out.append(head + b'null,"error":"entry no longer in the stream"}')
            else:
                out.append(head + fields[field] + b"}")
        return out

    # ------------------------------------------------------------------ operations

    async def openapi(self, request: web.Request) -> web.Response:
        return json_body(OPENAPI)

    @operation("read", "read")
    async def read_group(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        stream = self._stream(request)
        group = group_param(request)
        consumer = name_param(request.query.get("consumer"), "consumer")
        count = int_param(request, "count", 10, 1, MAX_COUNT)
        wait_ms = int_param(request, "wait_ms", 0, 0, MAX_WAIT_MS)
        start = request.query.get("start", "begin")
        if start not in ("begin", "new"):
            raise ApiProblem(400, "start: expected begin or new")
        pending = request.query.get("pending", "false")
        if pending not in ("true", "false", "1", "0"):
            raise ApiProblem(400, "pending: expected true or false")
        stream_key = self._stream_key(stream)
        await self._ensure_group(stream_key, group, "0" if start == "begin" else "$")
        if pending in ("true", "1"):
            reply = await self._xreadgroup(stream_key, group, consumer, "0", count, None)
        elif wait_ms == 0:
            reply = await self._xreadgroup(stream_key, group, consumer, ">", count, None)
        else:
            if self._long_polls.locked():
                raise ApiProblem(503, "too many long polls, retry later", {"Retry-After": "1"})
            async with self._long_polls:
                reply = await self._long_poll(stream_key, group, consumer, count, wait_ms)
        entries = self._entries(stream, reply)
        self.metrics.api_delivered.labels(stream).inc(len(entries))
        body = (
            b'{"group":"'
            + group.encode()
            + b'","consumer":"'
            + consumer.encode()
            + b'","entries":['
            + b",".join(entries)
            + b"]}"
        )
        return json_body(body)

    async def _xreadgroup(
        self, stream_key: str, group: str, consumer: str, start: str, count: int, block: int | None
    ) -> list[Any]:
        try:
            reply = await self.redis.xreadgroup(
                group, consumer, {stream_key: start}, count=count, block=block
            )
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._groups.discard((stream_key, group))  # deleted behind our back: create again
            await self._ensure_group(stream_key, group, "0")
            reply = await self.redis.xreadgroup(
                group, consumer, {stream_key: start}, count=count, block=block
            )
        return list(reply[0][1]) if reply else []

    async def _long_poll(
        self, stream_key: str, group: str, consumer: str, count: int, wait_ms: int
    ) -> list[Any]:
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_ms / 1000
        while True:
            remaining_ms = int((until - loop.time()) * 1000)
            block = min(BLOCK_SLICE_MS, remaining_ms) if remaining_ms >= 1 else None
            entries = await self._xreadgroup(stream_key, group, consumer, ">", count, block)
            if entries or block is None or self.closing:
                return entries

    @operation("ack", "read")
    async def ack(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        stream = self._stream(request)
        group = group_param(request)
        body = await self._json(request)
        _known(body, {"ids"})
        ids = body.get("ids")
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= MAX_COUNT
            or not all(entry_id(i) for i in ids)
        ):
            raise ApiProblem(400, f"ids: expected 1 to {MAX_COUNT} stream entry ids")
        acked = int(await self.redis.xack(self._stream_key(stream), group, *ids))
        self.metrics.api_acked.labels(stream).inc(acked)
        return json_body({"acked": acked})

    @operation("reclaim", "read")
    async def reclaim(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        stream = self._stream(request)
        group = group_param(request)
        body = await self._json(request)
        _known(body, {"consumer", "min_idle_ms", "count", "cursor"})
        consumer = name_param(body.get("consumer"), "consumer")
        min_idle = _int_field(body, "min_idle_ms", 60_000, 0, 7 * 86_400_000)
        count = _int_field(body, "count", 100, 1, MAX_COUNT)
        cursor = body.get("cursor", "0-0")
        if not entry_id(cursor):
            raise ApiProblem(400, "cursor: expected a stream entry id")
        stream_key = self._stream_key(stream)
        try:
            reply = await self.redis.xautoclaim(
                stream_key, group, consumer, min_idle, cursor, count
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                raise ApiProblem(404, f"no group {group!r} on {stream}") from exc
            raise
        next_id = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        entries = self._entries(stream, reply[1])
        deleted = [d.decode() for d in reply[2]] if len(reply) > 2 else []
        self.metrics.api_delivered.labels(stream).inc(len(entries))
        return json_body(
            b'{"next":"'
            + next_id.encode()
            + b'","deleted":'
            + orjson.dumps(deleted)
            + b',"entries":['
            + b",".join(entries)
            + b"]}"
        )

    async def _contact_json(self, contact_id: str) -> bytes:
        if not CONTACT_ID.fullmatch(contact_id):
            raise ApiProblem(400, "not a contact id")
        raw: bytes | None = await self.redis.hget(self.queue.keys.contact(contact_id), "contact")
        if raw is None:
            raise ApiProblem(404, "no such contact (unknown or past retention)")
        return raw

    @operation("get_contact", "read")
    async def get_contact(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        contact_id = request.match_info["contact_id"]
        raw = await self._contact_json(contact_id)
        events = await self.queue.contact_events(contact_id)
        return json_body(b'{"contact":' + raw + b',"events":[' + b",".join(events) + b"]}")

    async def _attachment(self, item: object, index: int) -> Attachment:
        where = f"attachments[{index}]"
        if not isinstance(item, dict):
            raise ApiProblem(400, f"{where}: expected an object")
        _known(item, {"name", "content_type", "data", "sha256"})
        name = item.get("name", "attachment")
        ctype = item.get("content_type", "application/octet-stream")
        if not isinstance(name, str) or not isinstance(ctype, str) or len(ctype) > 255:
            raise ApiProblem(400, f"{where}: name and content_type must be strings")
        if "data" in item and "sha256" in item:
            raise ApiProblem(400, f"{where}: give data or sha256, not both")
        if "data" in item:
            data = item["data"]
            if not isinstance(data, str):
                raise ApiProblem(400, f"{where}.data: expected base64")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiProblem(400, f"{where}.data: expected base64") from exc
            if not raw:
                raise ApiProblem(400, f"{where}.data: empty (an attachment needs content)")
            try:
                return await self.attachments.put(raw, name, ctype)
            except AttachmentTooLarge as exc:
                raise ApiProblem(413, f"{where}: {exc}") from exc
        digest = item.get("sha256")
        if not isinstance(digest, str):
            raise ApiProblem(400, f"{where}: give data (base64) or the sha256 of a stored file")
        try:
            path = self.attachments.path_for(digest)
        except ValueError as exc:
            raise ApiProblem(400, f"{where}.sha256: not a sha256 digest") from exc
        if not await self.attachments.ensure(digest):  # held: written now
            raise ApiProblem(404, f"{where}.sha256: no such stored attachment")
        size = path.stat().st_size
        if not size:
            raise ApiProblem(400, f"{where}.sha256: an empty file (an attachment needs content)")
        return Attachment(name[:255], ctype, size, digest, REF_PREFIX + digest)

    @operation("post_reply", "reply")
    async def post_reply(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        contact_id = request.match_info["contact_id"]
        body = await self._json(request, self.max_body)
        _known(body, {"text", "attachments"})
        text = body.get("text", "")
        if not isinstance(text, str) or len(text) > MAX_TEXT:
            raise ApiProblem(400, f"text: expected a string of at most {MAX_TEXT} characters")
        items = body.get("attachments", [])
        if not isinstance(items, list) or len(items) > MAX_ATTACHMENTS:
            raise ApiProblem(400, f"attachments: expected a list of at most {MAX_ATTACHMENTS}")
        if not text.strip() and not items:
            raise ApiProblem(400, "a reply needs text or attachments")
        await self._contact_json(contact_id)
        attachments = tuple([await self._attachment(a, i) for i, a in enumerate(items)])
        reply = Reply(contact_id, clean_text(text), attachments, uuid7())
        entry = await post_reply(self.redis, reply, prefix=self.prefix)
        return json_body({"id": reply.id, "contact_id": contact_id, "entry_id": entry}, 202)

    @operation("post_event", "reply")
    async def post_event(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        contact_id = request.match_info["contact_id"]
        body = await self._json(request)
        _known(body, {"type", "at", "detail"})
        type_ = body.get("type")
        if type_ not in ("answered", "responded", "closed"):
            raise ApiProblem(400, "type: expected answered, responded or closed")
        now = self.clock.now_us()
        at = now
        if "at" in body:
            try:
                at = parse_rfc3339(body["at"] if isinstance(body["at"], str) else "")
            except ValueError as exc:
                raise ApiProblem(400, "at: expected an RFC 3339 time") from exc
            if at > now + FUTURE_SKEW_US:  # the contact's timeline ends at the gateway's now
                raise ApiProblem(409, "at: more than a minute ahead of the gateway's clock")
        detail = body.get("detail", {})
        if not isinstance(detail, dict) or len(orjson.dumps(detail)) > MAX_DETAIL:
            raise ApiProblem(400, f"detail: expected an object of at most {MAX_DETAIL} bytes")
        await self._contact_json(contact_id)
        source = source_of(key)
        if type_ == "closed":
            # once per contact, like the stamps: emit.lua checks and sets ``stamp:closed`` in
            # the call that writes it (a failed write leaves no mark: it can be retried)
            closed = Event(contact_id, "closed", at, source, detail=detail)
            event = closed if await self.queue.emit(closed, once=True) else None
        else:
            event = await self.queue.stamp(contact_id, type_, at, source, detail)
        if event is None:  # a repeat, or the contact gone (expired) since the read above
            if not await self.queue.retained(contact_id):
                raise ApiProblem(404, "no such contact (unknown or past retention)")
            return json_body({"recorded": False, "event": None})
        return json_body({"recorded": True, "event": event.to_dict()}, 201)

    @operation("report", "read")
    async def report(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        raw_since = request.query.get("since", "24h")
        if not SINCE.fullmatch(raw_since):
            raise ApiProblem(400, "since: a whole number of s, m, h or d, from 1s to 400d")
        since = float(parse_duration(raw_since))
        by = request.query.get("by", "channel")
        if by not in ("channel", "hour"):
            raise ApiProblem(400, "by: expected channel or hour")
        charts_raw = request.query.getall("charts", ["false"])
        if len(charts_raw) != 1 or charts_raw[0] not in BOOLEANS:
            raise ApiProblem(400, "charts: expected true or false")
        charts = charts_raw[0] in ("true", "1")
        return json_body(await self.report_source(since, by, charts))

    def _subscriber(self, request: web.Request) -> str:
        name = request.match_info["subscriber"]
        if self.deadletter is None or name not in self.deadletter.names:
            raise ApiProblem(404, "no such push subscriber")
        return name

    @operation("deadletter_list", "admin")
    async def deadletter_list(self, request: web.Request, key: ApiKey | None) -> web.StreamResponse:
        names = [] if self.deadletter is None else list(self.deadletter.names)
        counts = [await self.deadletter.parked(n) for n in names] if names else []
        return json_body(
            {"subscribers": [{"name": n, "parked": c} for n, c in zip(names, counts, strict=True)]}
        )

    @operation("deadletter_entries", "admin")
    async def deadletter_entries(
        self, request: web.Request, key: ApiKey | None
    ) -> web.StreamResponse:
        name = self._subscriber(request)
        count = int_param(request, "count", 50, 1, MAX_COUNT)
        entries = await self.deadletter.entries(name, count)
        return json_body({"subscriber": name, "entries": entries})

    @operation("deadletter_replay", "admin")
    async def deadletter_replay(
        self, request: web.Request, key: ApiKey | None
    ) -> web.StreamResponse:
        name = self._subscriber(request)
        body = await self._json(request)
        _known(body, {"count"})
        count = _int_field(body, "count", 100, 1, 100_000)
        result = await self.deadletter.replay(name, count)
        return json_body(result)
