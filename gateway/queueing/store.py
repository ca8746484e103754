"""The Redis side of the queue: connection, the atomic intake and stamp scripts, lookups."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import NoScriptError, ResponseError

from gateway.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.config import RedisSection
from gateway.queueing.keys import Keys
from gateway.records import Contact, Deadline, Event, EventType, Inbound, Repeat

log = logging.getLogger(__name__)

RedisClient = Any
"""``redis.asyncio.Redis`` or ``RedisCluster`` (their common surface)."""


def connect(section: RedisSection, url: str) -> RedisClient:
    """Return a client for a URL, a Sentinel group or a Cluster, as configured."""
    password = section.password.reveal() if section.password else None
    common: dict[str, Any] = {
        "socket_connect_timeout": 2.0,
        "socket_timeout": max(5.0, 2 * float(section.write_timeout)),
        "health_check_interval": 10,
    }
    if section.sentinel is not None and section.sentinel.hosts:
        s_password = section.sentinel.password.reveal() if section.sentinel.password else None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            [(h.host, h.port) for h in section.sentinel.hosts],
            sentinel_kwargs={"password": s_password} if s_password else None,
            password=password,
            **common,
        )
        return sentinel.master_for(section.sentinel.master)
    if section.cluster:
        return RedisCluster.from_url(url, password=password, **common)
    return aioredis.from_url(url, password=password, **common)


def _script(name: str) -> str:
    return files("gateway.queueing").joinpath(name).read_text(encoding="utf-8")


INTAKE_LUA = _script("intake.lua")
STAMP_LUA = _script("stamp.lua")


@dataclass(frozen=True, slots=True)
class Prepared:
    """A contact ready to be written: id and deadline fixed, JSON encoded at write time."""

    id: str
    inbound: Inbound
    deadline: Deadline
    warn_at: Micros


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What the intake script answered for one contact."""

    created: bool
    contact_id: str
    repeat_count: int
    enqueued_at: Micros


_REPEAT_MARK = b'"repeat":{"count":0'

_CLEARS: dict[str, frozenset[str]] = {
    "answer": frozenset({"answered", "abandoned", "closed"}),
    "response": frozenset({"responded", "closed"}),
}


class RedisQueue:
    """Writes contacts and events with server-side scripts; every key under one hash tag."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        clock: Clock,
        *,
        source: str,
        dedupe_window_s: float,
        repeat_window_s: float,
        retention_s: float,
        maxlen: int,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        self.source = source
        self.dedupe_ttl = max(1, int(dedupe_window_s))
        self.repeat_window_s = int(repeat_window_s)
        self.retention_s = max(1, int(retention_s))
        self.maxlen = maxlen
        self._intake_sha = ""
        self._stamp_sha = ""

    async def load_scripts(self) -> None:
        """Load the scripts into the server's cache (again after a restart or failover)."""
        self._intake_sha = await self.redis.script_load(INTAKE_LUA)
        self._stamp_sha = await self.redis.script_load(STAMP_LUA)

    async def ping(self) -> bool:
        """True when the server answers."""
        return bool(await self.redis.ping())

    def _encode(self, p: Prepared, enqueued_at: Micros) -> tuple[list[str], list[Any]]:
        inbound = p.inbound
        contact = Contact(
            id=p.id,
            channel=inbound.channel,
            adapter=inbound.adapter,
            external_id=inbound.external_id,
            sender=inbound.sender,
            recipient=inbound.recipient,
            subject=inbound.subject,
            text=inbound.text,
            language=inbound.language,
            attachments=inbound.attachments,
            thread=inbound.thread,
            received_at=inbound.received_at,
            origin_at=inbound.origin_at,
            enqueued_at=enqueued_at,
            deadline=p.deadline,
            repeat=Repeat(0, self.repeat_window_s),
            confidential=inbound.confidential,
            meta=inbound.meta,
        )
        head, _, tail = contact.to_json().partition(_REPEAT_MARK)
        event = Event(p.id, "enqueued", enqueued_at, self.source).to_json()
        k = self.keys
        dedupe = k.dedupe(inbound.adapter, inbound.external_id or p.id)
        address = inbound.sender.address
        keys = [
            k.contacts,
            k.events,
            dedupe,
            k.sender(address),
            k.contact(p.id),
            k.deadlines,
            k.warnings,
        ]
        args: list[Any] = [
            p.id,
            head + b'"repeat":{"count":',
            tail,
            self.dedupe_ttl,
            self.repeat_window_s * MICROS_PER_SECOND,
            inbound.received_at,
            p.deadline.due_at,
            p.warn_at,
            event,
            self.maxlen,
            self.retention_s,
            inbound.channel,
            p.deadline.kind,
            "1" if address else "0",
        ]
        return keys, args

    async def write_batch(self, batch: list[Prepared]) -> list[WriteResult]:
        """Run the intake script for every contact in one pipelined round trip."""
        enqueued_at = self.clock.now_us()
        encoded = [self._encode(p, enqueued_at) for p in batch]
        for attempt in range(2):
            if not self._intake_sha:
                await self.load_scripts()
            pipe = self.redis.pipeline(transaction=False)
            for keys, args in encoded:
                pipe.evalsha(self._intake_sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            if any(isinstance(r, NoScriptError) for r in replies) and attempt == 0:
                self._intake_sha = ""  # the server restarted: reload and write again (idempotent)
                continue
            break
        results: list[WriteResult] = []
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
            created, contact_id, count = reply
            cid = contact_id.decode() if isinstance(contact_id, bytes) else str(contact_id)
            results.append(WriteResult(bool(created), cid, int(count), enqueued_at))
        return results

    async def emit(self, event: Event) -> None:
        """Append an event; ``abandoned`` and ``closed`` also settle the contact's deadline."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(
            self.keys.events,
            {"event": event.to_json(), "contact_id": event.contact_id, "type": event.type},
            maxlen=self.maxlen,
            approximate=True,
        )
        if event.type in ("abandoned", "closed"):
            pipe.zrem(self.keys.deadlines, event.contact_id)
            pipe.zrem(self.keys.warnings, event.contact_id)
        await pipe.execute()

    async def stamp(
        self,
        contact_id: str,
        type: EventType,
        at: Micros,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> Event | None:
        """Record a deadline event once per contact and type (see ``EventSink.stamp``)."""
        fields = await self.redis.hmget(
            self.keys.contact(contact_id), ["received_us", "due_us", "kind"]
        )
        if fields[0] is None:
            return None
        received, due, kind = int(fields[0]), int(fields[1]), fields[2].decode()
        event = Event(
            contact_id=contact_id,
            type=type,
            at=at,
            source=source,
            due_at=due,
            elapsed_ms=max(0, (at - received) // 1000),
            met=at <= due,
            detail=detail or {},
        )
        clears = "1" if type in _CLEARS.get(kind, ()) else "0"
        keys = [
            self.keys.contact(contact_id),
            self.keys.deadlines,
            self.keys.warnings,
            self.keys.events,
        ]
        args = [contact_id, type, at, event.to_json(), self.maxlen, clears]
        try:
            if not self._stamp_sha:
                await self.load_scripts()
            done = await self.redis.evalsha(self._stamp_sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load_scripts()
            done = await self.redis.evalsha(self._stamp_sha, len(keys), *keys, *args)
        return event if done else None

    async def get(self, contact_id: str) -> Contact | None:
        """Return the contact by id while it is retained, else None."""
        raw = await self.redis.hget(self.keys.contact(contact_id), "contact")
        return None if raw is None else Contact.from_json(raw)

    async def stream_length(self) -> int:
        try:
            return int(await self.redis.xlen(self.keys.contacts))
        except ResponseError:
            return 0


def decode_fields(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """Decode a stream entry's JSON field (``contact``, ``event`` or ``reply``)."""
    for name in (b"contact", b"event", b"reply"):
        if name in fields:
            return cast(dict[str, Any], orjson.loads(fields[name]))
    return {}
