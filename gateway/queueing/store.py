"""The Redis side of the queue: connection, the atomic intake and stamp scripts, lookups."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gateway.adapters import InvalidContact, RateLimited, load_media
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros, format_time
from gateway.queueing.batching import Answer
from gateway.queueing.keys import AGG_BUCKET_TTL_S, Keys
from gateway.queueing.link import Lane, Link
from gateway.queueing.outcomes import FACTS, MOVES, Step, step_of
from gateway.records import SCHEMA, Contact, Deadline, Event, EventType, Inbound, Reply
from gateway.server.config import RedisSection

log = logging.getLogger(__name__)

_pack_one: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_one
except ImportError:  # hiredis before 2.1
    _pack_one = None

RedisClient = Any
"""``redis.asyncio.Redis`` or ``RedisCluster`` (their common surface)."""


POOL_SIZE = 100
"""Connections to one Redis per process (redis-py's default bound)."""


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
    # redis-py's default pool raises MaxConnectionsError (a ConnectionError, so "Redis is
    # away" to Intake) the moment POOL_SIZE commands are in flight: under load, a process
    # then spooled contacts and skipped checks while Redis was fine. These wait for a
    # connection instead, as long as any command may take.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, password=password, max_connections=POOL_SIZE, timeout=common["socket_timeout"],
        **common,
    )
    return aioredis.Redis.from_pool(pool)


def _script(name: str) -> str:
    return files("gateway.queueing").joinpath(name).read_text(encoding="utf-8")


STEPPING = frozenset({"aggregate", "stamp", "claim"})
"""The scripts that take the dashboard's outcome steps: ``aggstep.lua`` is put before each, and
before ``emit.lua`` as ``emit_step`` (so their error messages' line numbers count its lines
first, and none of them can open with a ``#!lua`` flags line)."""
SCRIPTS = {
    name: (_script("aggstep.lua") if name in STEPPING else "") + _script(f"{name}.lua")
    for name in (
        "intake", "stamp", "emit", "claim", "aggregate", "advance", "trim", "route", "hold",
        "surge",
    )
}
SCRIPTS["emit_step"] = _script("aggstep.lua") + SCRIPTS["emit"]
"""``emit.lua`` with the step's code, for an event that takes a step (``RedisQueue.emit``);
the plain one runs without it (the step's definitions cost Valkey about 3 µs a call: every
delivery report's event)."""


class ReplicationLagError(ConnectionError):
    """Fewer replicas than ``redis.min_replicas`` confirmed a batch: treat it as not written."""


Held = tuple[str, Mapping[str, bytes]]
"""A hash key and fields to set in it (``HSET``) in the write of a contact."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A contact ready to be written: id and deadline fixed, JSON encoded at write time."""

    id: str
    inbound: Inbound
    deadline: Deadline
    warn_at: Micros
    held: Held | None = None
    """Files to hold with the contact (``Submitter.submit``), written in the same round trip
    before its script; never spooled."""


@dataclass(frozen=True, slots=True)
class TrimResult:
    """What ``trim.lua`` answered for one stream."""

    length: int
    groups: int
    removed: int
    backlog: int
    """Entries the slowest consumer group has still to read or acknowledge."""
    more: bool
    slowest: str
    """That group's name ('' without a backlog)."""


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What the intake script answered for one contact."""

    created: bool
    contact_id: str
    repeat_count: int
    enqueued_at: Micros


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``limit`` new contacts per ``window_s`` (0: no limit), counted in Redis."""

    limit: int = 0
    window_s: float = 60.0


_REPEAT_MARK = b'"repeat":{"count":0'


def contact_dict(p: Prepared, enqueued: str, repeat_window_s: int) -> dict[str, Any]:
    """The Contact JSON mapping of a prepared contact (repeat count 0: the script fills it in),
    ``enqueued`` its ``enqueued_at`` already formatted (once for a batch).

    Same fields and order as ``Contact.to_dict``, built without the intermediate record.
    """
    i = p.inbound
    return {
        "schema": SCHEMA,
        "id": p.id,
        "channel": i.channel,
        "adapter": i.adapter,
        "external_id": i.external_id,
        "sender": {"address": i.sender.address, "name": i.sender.name},
        "recipient": i.recipient,
        "subject": i.subject,
        "text": i.text,
        "language": i.language,
        "attachments": [
            {
                "name": a.name,
                "content_type": a.content_type,
                "size": a.size,
                "sha256": a.sha256,
                "ref": a.ref,
            }
            for a in i.attachments
        ],
        "thread": i.thread,
        "received_at": format_time(i.received_at),
        "origin_at": None if i.origin_at is None else format_time(i.origin_at),
        "enqueued_at": enqueued,
        "deadline": {
            "kind": p.deadline.kind,
            "due_at": format_time(p.deadline.due_at),
            "policy": p.deadline.policy,
        },
        "repeat": {"count": 0, "window": repeat_window_s},
        "confidential": i.confidential,
        "meta": i.meta,
    }


_CLEARS: dict[str, frozenset[str]] = {
    "answer": frozenset({"answered", "abandoned", "closed"}),
    "response": frozenset({"responded", "closed"}),
}


class Pseudonyms:
    """What key names hold instead of a citizen's address (a full phone number, an e-mail
    address): a keyed hash, so that listing the keys (``SCAN``, ``--bigkeys``, an exporter)
    shows no number and one cannot find a number's keys by hashing guesses without the key.
    The key is the fleet's, in Redis (``{p}:pseudonym-key``); the first instance makes it."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self._key: bytes | None = None
        self._inner: hashlib._Hash | None = None
        self._outer: hashlib._Hash | None = None

    async def load(self, *, again: bool = False) -> None:
        """Read the fleet's key. ``again`` (after a restart of the server, which may have lost
        it): offer the one in use, so the fleet keeps one key."""
        if self._key is not None and not again:
            return
        name = self.keys.pseudonym_key
        offer = self._key or secrets.token_hex(32).encode()
        await self.redis.set(name, offer, nx=True)
        value = await self.redis.get(name)
        self.use(value if isinstance(value, bytes) else str(value).encode())

    @property
    def loaded(self) -> bool:
        return self._key is not None

    def use(self, key: bytes) -> None:
        """Take ``key`` as the fleet's key (``load`` reads it from Redis)."""
        self._key = key
        self._inner, self._outer = hmac_states(key)

    def of(self, address: str) -> str:
        """The pseudonym of ``address``; empty for an empty address. ``load`` first.

        HMAC-SHA256 (RFC 2104) from the key's inner and outer hash states computed once at
        ``load``, so a call hashes the address and the inner digest only (a third of the time
        of ``hmac.digest``, which derives both states again on every call); the same value as
        ``hmac.new(key, address, sha256)``.
        """
        if not address:
            return ""
        if self._inner is None or self._outer is None:
            raise RuntimeError("pseudonym key not loaded")
        inner = self._inner.copy()
        inner.update(address.encode("utf-8", "surrogatepass"))
        outer = self._outer.copy()
        outer.update(inner.digest())
        return "p" + outer.digest()[:16].hex()


def hmac_states(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """The inner and outer SHA-256 states of an HMAC key (RFC 2104, section 2): a key longer
    than the 64-byte block is hashed first, then padded with zeros to the block."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    key = key.ljust(64, b"\0")
    return (
        hashlib.sha256(key.translate(_IPAD)),
        hashlib.sha256(key.translate(_OPAD)),
    )


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


Outcome = WriteResult | ResponseError | InvalidContact | RateLimited
"""What the intake script made of one contact (``write_batch``'s results, in order)."""


@dataclass(slots=True)
class _Written:
    """A batch encoded for the intake script (``RedisQueue._batch``) and how its replies read."""

    encoded: list[tuple[list[Any], list[Any]]]
    invalid: dict[int, InvalidContact]
    before: list[list[Any]]
    enqueued_at: Micros

    def results(self, replies: list[Any]) -> list[Outcome]:
        """One result per contact from the script calls' replies (``before``'s taken off)."""
        replies = _per_contact(replies, len(self.encoded)) if self.encoded else []
        if self.invalid:
            for n in sorted(self.invalid):
                replies.insert(n, self.invalid[n])
        results: list[Outcome] = []
        enqueued_at = self.enqueued_at
        for reply in replies:
            if isinstance(reply, (ResponseError, InvalidContact)):
                results.append(reply)
                continue
            if isinstance(reply, Exception):
                raise reply
            created, contact_id, count = reply
            if created == 2:
                results.append(RateLimited(int(contact_id) / 1000))
                continue
            cid = contact_id.decode() if isinstance(contact_id, bytes) else str(contact_id)
            results.append(WriteResult(bool(created), cid, int(count), enqueued_at))
        return results


def _evalsha(sha: str, calls: list[tuple[list[Any], list[Any]]]) -> list[list[Any]]:
    """One ``EVALSHA`` of a script a ``(keys, args)`` call."""
    return [["EVALSHA", sha, len(keys), *keys, *args] for keys, args in calls]


def _take_before(replies: list[Any], n: int) -> None:
    """Take the replies of the ``n`` plain commands sent before a round trip's scripts off
    ``replies``: an error reply to one of them raises for the whole round trip."""
    for reply in replies[:n]:
        if isinstance(reply, Exception):
            raise reply
    del replies[:n]


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
        min_replicas: int = 0,
        replica_timeout_ms: int = 1000,
        sender_limit: RateLimit = RateLimit(),
        adapter_limit: RateLimit = RateLimit(),
        sender_limits: Mapping[str, RateLimit] | None = None,
        sender_exempt: Iterable[str] = (),
        short_abandon_ms: int = 0,
    ) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        self.source = source
        self.dedupe_ttl = max(1, int(dedupe_window_s))
        self.repeat_window_s = int(repeat_window_s)
        self.retention_s = max(1, int(retention_s))
        self.maxlen = maxlen
        """Entries a stream keeps (``trim``), unless a consumer group has not read them."""
        # WAIT has no key to route by: on a cluster each master's replicas answer for their own
        self.min_replicas = min_replicas if hasattr(client, "connection_pool") else 0
        self.replica_timeout_ms = replica_timeout_ms
        self.sender_limit = sender_limit
        """Per sender, for adapters without one of their own in ``sender_limits``."""
        self.sender_limits = dict(sender_limits or {})
        self.sender_exempt = frozenset(sender_exempt)
        self.adapter_limit = adapter_limit
        self.short_abandon_ms = short_abandon_ms
        """``[sla] short_abandon`` in ms: the dashboard's steps of abandoned calls (``stamp``
        takes them, as the dashboard's reader does)."""
        self._shas: dict[str, str] = {}
        self.pseudonyms = Pseudonyms(client, keys)
        self.surge_keys: Callable[[Inbound], list[str]] | None = None
        """The surge keys of a new contact (``SurgeWatch.keys_of``, set by the case services
        when surges are on): carried in its ``enqueued`` event, so the aggregator counts them
        without reading the contact back."""
        self.step_failed: Callable[[str], None] | None = None
        """Told the writer (``stamp``, ``emit``) of an event written whose wallboard step
        failed (the runtime counts it: ``gateway_dashboard_steps_failed_total``)."""
        self._rows: dict[tuple[str, str], tuple[str, str]] = {}
        """(channel, deadline kind) -> the dashboard's row (``Media.label_of``), its open zset."""
        self._bucket_of: tuple[int, str, str] = (-1, "", "")
        self._fixed = (
            keys.contacts, keys.events, keys.deadlines, keys.warnings, keys.agg_waiting,
            keys.agg_repeats,
        )
        """The intake script's keys that are the same for every contact."""
        self._heads = (keys.sender_head, keys.contact_head, keys.sender_first_head)
        """The heads of a contact's own key names (``Keys.sender``, ``contact``,
        ``sender_first``), made once: ``_encode`` adds a pseudonym or id to them (33 and 36
        printable characters, which ``Keys`` keeps as they are)."""
        self._dedupe_of: dict[str, str] = {}
        """Adapter -> the head of its dedupe keys (``Keys.dedupe_of``), made once."""
        self._link = Lane()
        """The intake batches' own connection (``gateway/queueing/link.py``), opened by
        ``load_scripts`` (again by a batch that finds it closed); none on a cluster client (its
        pipeline routes by slot) or with ``min_replicas``."""
        self._linked = hasattr(client, "connection_pool")
        self._retries: set[asyncio.Task[Any]] = set()
        """``start_batch``'s second tries under way (held: a task nobody holds may vanish)."""
        self._side = Lane()
        """The connection of ``execute``'s plain commands (the dashboard's aggregator, the
        surge counters, the watcher's lookups, the stamps' and closes' reads of a contact's
        facts), opened by the first: their replies parsed in one callback as the intake
        batches' are, not one redis-py coroutine chain a reply (the surge marks of an older
        version's contacts, ``HDEL`` a contact). Apart from the intake link, so that a failure
        there never fails an intake batch. When the connection drops, every command on it
        fails; reads (``execute(..., reads=True)``: the facts of a stamp or a close, the
        watcher's looks) are sent once more on a new connection, other commands leave their
        caller the error, as a script's caller has it (the surge counters and the
        aggregator's commands are tried again at their next beat)."""

    async def load_scripts(self) -> None:
        """Load the scripts into the server's cache (again after a restart or failover), the
        fleet's pseudonym key, and open the intake write's own connection (``Link``), so that
        the first contact after a start or an outage does not also wait for its connect and
        handshake within ``write_timeout``."""
        self._shas = {name: await self.redis.script_load(body) for name, body in SCRIPTS.items()}
        await self.load_pseudonym_key(again=True)
        pool = getattr(self.redis, "connection_pool", None)
        if self._linked and pool is not None and self.min_replicas == 0:  # else none: _execute
            await self._open(self._link, pool)

    async def load_pseudonym_key(self, *, again: bool = False) -> None:
        """``Pseudonyms.load``."""
        await self.pseudonyms.load(again=again)

    def pseudonym(self, address: str) -> str:
        """``Pseudonyms.of``: what key names hold instead of a sender's address."""
        return self.pseudonyms.of(address)

    async def ping(self) -> bool:
        """True when the server answers."""
        return bool(await self.redis.ping())

    def _encode(
        self, p: Prepared, enqueued_at: Micros, enqueued: str, limited: bool = False
    ) -> tuple[list[Any], list[Any]]:
        inbound = p.inbound
        contact = contact_dict(p, enqueued, self.repeat_window_s)
        head, _, tail = orjson.dumps(contact).partition(_REPEAT_MARK)
        # Event(p.id, "enqueued", enqueued_at, source).to_json(), without the record (a
        # tenth of its time): the same bytes (tests/queueing/test_link.py)
        event = orjson.dumps(
            {"contact_id": p.id, "type": "enqueued", "at": enqueued, "source": self.source}
        )
        k = self.keys
        address = inbound.sender.address
        pseudonym = self.pseudonyms.of
        sender = pseudonym(address)
        label, open_zset = self._rows.get((inbound.channel, p.deadline.kind)) or self._row(
            inbound.channel, p.deadline.kind
        )
        minute, hour = self._buckets(inbound.received_at)
        # the contact's own keys and arguments (intake.lua's layout; the ones every contact
        # shares are added once a call by _script_calls)
        senders, contacts, firsts = self._heads
        dedupe = self._dedupe_of.get(inbound.adapter) or self._dedupe_head(inbound.adapter)
        keys = [
            # encoded here, so a key that is not valid UTF-8 fails this contact alone
            # the peer's id may hold a number (CMPP's ``cmpp:<msg_id>:<number>``): pseudonym
            (dedupe + pseudonym(inbound.external_id or p.id)).encode(),
            (senders + sender).encode(),
            contacts + p.id,
            minute,
            hour,
            open_zset,
            (firsts + sender).encode(),  # intake.lua reads the pseudonym back from it
        ]
        surge = self.surge_keys
        args: list[Any] = [
            p.id,
            head + b'"repeat":{"count":',
            tail,
            inbound.received_at,
            p.deadline.due_at,
            p.warn_at,
            event,
            inbound.channel,
            p.deadline.kind,
            "1" if address else "0",
            label,
            b"" if surge is None else orjson.dumps([inbound.received_at, *surge(inbound)]),
        ]
        if limited:
            now_ms = enqueued_at // 1000
            for scope, name, rate in (
                ("sender", "" if address in self.sender_exempt else sender,
                 self.sender_limits.get(inbound.adapter, self.sender_limit)),
                ("adapter", inbound.adapter, self.adapter_limit),
            ):
                if rate.limit > 0 and name:
                    window_ms = max(1, int(rate.window_s * 1000))
                    keys.append(k.rate(scope, name, now_ms // window_ms).encode())
                    args += [rate.limit, window_ms, window_ms - now_ms % window_ms,
                             "1" if scope == "sender" else "0"]
        return keys, args

    def _script_calls(
        self, encoded: list[tuple[list[Any], list[Any]]]
    ) -> list[tuple[list[Any], list[Any]]]:
        """The intake script's calls for contacts encoded one by one (``_encode``): up to
        ``SCRIPT_CONTACTS`` in a call; its keys: the ones every contact shares, then each
        contact's in turn; its arguments: the count, the ones every contact shares, each
        contact's numbers of keys and arguments, then each contact's in turn (``intake.lua``)."""
        calls: list[tuple[list[Any], list[Any]]] = []
        shared = [
            self.dedupe_ttl, self.repeat_window_s * MICROS_PER_SECOND, self.retention_s,
            AGG_BUCKET_TTL_S,
        ]
        for start in range(0, len(encoded), SCRIPT_CONTACTS):
            group = encoded[start : start + SCRIPT_CONTACTS]
            keys: list[Any] = list(self._fixed)
            sizes: list[Any] = [len(group), *shared]
            args: list[Any] = []
            for k, a in group:
                keys += k
                sizes += (len(k), len(a))
                args += a
            calls.append((keys, sizes + args))
        return calls

    def _row(self, channel: str, kind: str) -> tuple[str, str]:
        label = load_media().label_of(channel, kind)
        row = self._rows[(channel, kind)] = (label, self.keys.agg_open(label))
        return row

    def _dedupe_head(self, adapter: str) -> str:
        if len(self._dedupe_of) >= 1024:  # adapters are configured names: never this many
            self._dedupe_of.clear()
        head = self._dedupe_of[adapter] = self.keys.dedupe_of(adapter)
        return head

    def _buckets(self, received_at: Micros) -> tuple[str, str]:
        """The dashboard's minute and hour buckets of a contact received at ``received_at``
        (the last minute's names are kept: a batch's contacts mostly share it)."""
        second = received_at // MICROS_PER_SECOND
        minute = second - second % 60
        last, m, h = self._bucket_of
        if minute != last:
            m = self.keys.agg_bucket("m", minute)
            h = self.keys.agg_bucket("h", minute - minute % 3600)
            self._bucket_of = (minute, m, h)
        return m, h

    async def write_batch(
        self, batch: list[Prepared], *, limited: bool = False
    ) -> list[Outcome]:
        """Run the intake script for every contact in one pipelined round trip.

        A contact that cannot be encoded comes back as ``InvalidContact``, one the server
        refuses as its error and, with ``limited``, one over its sender's or adapter's rate
        limit as ``RateLimited``; the others are written. A failed round trip (connection,
        timeout) raises for the whole batch.
        """
        if not self.pseudonyms.loaded:
            await self.load_pseudonym_key()
        written = self._batch(batch, limited)
        encoded, before = written.encoded, written.before
        replies = (
            await self.run_scripts(
                "intake", self._script_calls(encoded), replicated=True, before=before,
                link=True,
            )
            if encoded else []
        )
        return written.results(replies)

    def start_batch(
        self,
        batch: list[Prepared],
        answer: Answer[Outcome],
        *,
        limited: bool = False,
    ) -> bool:
        """``write_batch`` without a wait, when nothing has to be awaited first: the batch
        encoded and written on the intake link now, in the caller's step, and ``answer(results,
        None)`` or ``answer(None, error)`` called once, from the link's callback when the
        replies have come (a batch of one the coalescer sends from its submitter's step:
        ``Coalescer``'s ``start``). The same commands and outcomes as ``write_batch``; a
        reply that the script is not loaded (a restarted server) loads it and runs the batch
        again, as ``run_scripts`` does, in a task. False, having done nothing, when something
        has to be awaited first (the link to open or found closed, the scripts or the
        pseudonym key to load), with ``redis.min_replicas`` (a ``WAIT`` holds a pooled
        connection) or on a cluster: the caller then awaits ``write_batch``. Raises as the
        link's write does."""
        if not (self._linked and self._shas and self.pseudonyms.loaded) or self.min_replicas:
            return False
        link = self._link.ready()
        if link is None:
            return False
        written = self._batch(batch, limited)
        if not written.encoded:
            return False
        commands = [
            *written.before, *_evalsha(self._shas["intake"], self._script_calls(written.encoded))
        ]

        def replied(replies: list[Any] | None, error: Exception | None) -> None:
            if error is not None or replies is None:
                answer(None, error or RuntimeError("a batch without replies"))
                return
            try:
                _take_before(replies, len(written.before))
                if any(isinstance(r, NoScriptError) for r in replies):
                    self._shas = {}  # the server restarted: load again and rerun (idempotent)
                    self._again(self.write_batch(batch, limited=limited), answer)
                    return
                results = written.results(replies)
            except Exception as exc:
                answer(None, exc)
                return
            answer(results, None)

        link.start(pack_commands(commands), len(commands), replied)
        return True

    def _again(
        self,
        work: Coroutine[Any, Any, list[Outcome]],
        answer: Answer[Outcome],
    ) -> None:
        """``start_batch``'s rare second try, in a task of its own, answered when it ends."""
        task = asyncio.ensure_future(work)
        self._retries.add(task)

        def ended(done: asyncio.Task[Any]) -> None:
            self._retries.discard(done)
            if done.cancelled():
                answer(None, RedisConnectionError("the batch's second try was cancelled"))
            elif (exc := done.exception()) is not None:
                answer(None, exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            else:
                answer(done.result(), None)

        task.add_done_callback(ended)

    def _batch(self, batch: list[Prepared], limited: bool) -> _Written:
        """A batch's script calls, encoded: the contacts that cannot be encoded set apart, the
        plain commands that go first (``held``'s ``HSET``s)."""
        enqueued_at = self.clock.now_us()
        enqueued = format_time(enqueued_at)
        encoded: list[tuple[list[Any], list[Any]]] = []
        invalid: dict[int, InvalidContact] = {}
        for n, p in enumerate(batch):
            try:
                encoded.append(self._encode(p, enqueued_at, enqueued, limited))
            except (TypeError, ValueError) as exc:  # orjson's errors, UnicodeEncodeError
                invalid[n] = InvalidContact(f"contact not encodable: {exc}")
        held: dict[str, list[Any]] = {}  # one HSET per key, before the scripts
        for n, p in enumerate(batch):
            if p.held is not None and n not in invalid:
                fields = held.setdefault(p.held[0], [])
                for name, value in p.held[1].items():
                    fields += (name, value)
        before = [["HSET", key, *fields] for key, fields in held.items()]
        return _Written(encoded, invalid, before, enqueued_at)

    async def run_scripts(
        self,
        name: str,
        calls: list[tuple[list[Any], list[Any]]],
        *,
        replicated: bool = False,
        before: list[list[Any]] | None = None,
        after: list[list[Any]] | None = None,
        link: bool = False,
    ) -> list[Any]:
        """Run one of the gateway's scripts once per ``(keys, args)`` in one round trip; error
        replies come back as values. Loads the script again after a restart or failover.

        ``replicated``: with ``redis.min_replicas``, raise ReplicationLagError unless that many
        replicas confirm the writes (``WAIT`` in the same round trip). ``before``: plain
        commands sent first on the same connection (executed before the scripts); an error
        reply to one of them raises for the whole round trip. ``after``: plain commands sent
        after the scripts (executed after them, whatever they answered; run again with them
        when the server had lost the scripts); their replies follow the scripts' in the list
        returned, errors as values. ``link``: over the intake write's own connection
        (``Link``) instead of a pooled one.
        """
        before = before or []
        after = after or []
        wait = replicated and self.min_replicas > 0
        for attempt in range(2):
            if not self._shas:
                await self.load_scripts()
            sha = self._shas[name]
            commands = _evalsha(sha, calls)
            commands += after
            if wait:
                # WAIT counts the replicas that have this connection's last write. A batch of
                # duplicates writes nothing, so that was an older write (or none), and WAIT
                # confirmed at once contacts whose first write, made on another connection,
                # no replica had yet (a replayed spool, a peer's retry at another instance):
                # a PUBLISH is propagated to the replicas (no key), so WAIT covers everything
                # the master has when it runs
                commands.append(["PUBLISH", self.keys.replicated, "1"])
                commands.append(["WAIT", self.min_replicas, self.replica_timeout_ms])
            # a WAIT holds its connection until the replicas answer: with min_replicas each
            # batch keeps a pooled connection of its own, so batches wait for them side by side
            replies = await self._execute([*before, *commands], link=link and not wait)
            _take_before(replies, len(before))
            if wait:
                confirmed = replies.pop()
                replies.pop()  # the PUBLISH's count of subscribers
                if isinstance(confirmed, Exception) or int(confirmed) < self.min_replicas:
                    raise ReplicationLagError(
                        f"{confirmed} of {self.min_replicas} replicas acknowledged the batch"
                    )
            if attempt == 0 and any(
                isinstance(r, NoScriptError) for r in replies[: len(calls)]
            ):  # the server restarted: load again and rerun (idempotent), ``after`` with them
                self._shas = {}
                continue
            break
        return replies

    async def execute(
        self, commands: list[list[Any]], *, pooled: bool = False, reads: bool = False
    ) -> list[Any]:
        """Run plain commands in one round trip (the cheap path ``run_scripts`` takes); error
        replies come back as values. Commands that answer at once only (no blocking read):
        on a single server they share one connection (``_side``), pipelined; ``pooled``: on a
        pooled connection of their own instead (a caller that polls, as the aggregator's
        reads, keeps off the connection the others' commands share).

        ``reads``: the commands only read, so when the shared connection is lost while they
        are on it (``CLIENT KILL``, a reset, a proxy's or the server's idle timeout, a
        Sentinel dropping the clients of a demoted master: every command in flight on it
        fails) they are sent once more, at once, on a new connection; when none can be made
        (the server down) that error is raised. Other commands fail with the connection
        (whether they ran is not known), and so do reads whose link timed out (a stalled
        server: ``TimeoutError``)."""
        if self._linked and not pooled:
            payload = pack_commands(commands)
            again = reads
            while True:
                side = self._side.ready() or await self._open(
                    self._side, getattr(self.redis, "connection_pool", None)
                )
                if side is None:
                    break
                try:
                    return await side.send(payload, len(commands))
                except RedisConnectionError:
                    if not again:
                        raise
                    again = False
        return await self._execute(commands)

    async def _execute(self, commands: list[list[Any]], *, link: bool = False) -> list[Any]:
        """Send commands in one write and read every reply; error replies come back as values.

        On a single server (or a Sentinel master) the commands are packed here and written on
        one pooled connection, which costs a third of redis-py's pipeline, or with ``link`` on
        the intake write's own connection (``Link``: replies parsed in one callback, no pool);
        a cluster client goes through its own pipeline, which routes by slot.
        """
        pool = getattr(self.redis, "connection_pool", None)
        if pool is None:
            pipe = self.redis.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        if link and self._linked:
            own = self._link.ready() or await self._open(self._link, pool)
            if own is not None:
                return await own.send(pack_commands(commands), len(commands))
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(pack_commands(commands), check_health=False)
            replies: list[Any] = []
            # one deadline for all the replies of the batch (the connection's socket timeout),
            # not one timeout context per reply: math.inf tells redis-py not to add its own
            async with asyncio.timeout(conn.socket_timeout):
                for _ in commands:
                    try:
                        replies.append(await conn.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _open(self, lane: Lane, pool: Any) -> Link | None:
        """``lane``'s link; none for good when the pool's connection class cannot give its
        transport (the pooled path then serves)."""
        own = await lane.get(pool)
        if own is None:
            self._linked = False
        return own

    async def aclose(self) -> None:
        """Close the intake write's own connection (the client is closed by its owner)."""
        self._link.close()
        self._side.close()

    async def emit(self, event: Event, *, once: bool = False) -> bool:
        """Append an event; ``abandoned`` and ``closed`` also settle the contact's deadline;
        False when nothing was written (the same event written already; with ``once``, also
        an event of its type, or a contact no longer retained). An event that may move the
        contact's outcome (``MOVES``: a close through the API, as a rule) has its wallboard
        step taken by ``emit.lua`` in the same call, the contact's facts read first (one
        round trip more), and is marked ``counted``, as ``stamp``'s. ``once``: written once
        per contact and type, as a stamp (field ``stamp:<type>``, the event's time), and only
        while the contact is retained: for the API's close only (the deadline events
        ``stamp`` writes carry what ``stamp.lua`` needs: their mark must come from it)."""
        assert not once or event.type == "closed"
        hash_key = self.keys.contact(event.contact_id)
        keys = [self.keys.events, hash_key, self.keys.deadlines, self.keys.warnings]
        clears = "1" if event.type in ("abandoned", "closed") else "0"
        args: list[Any] = [event.contact_id, event.type, event.to_json(), clears]
        script = "emit"
        counted, step = "0", None
        if event.type in MOVES:
            fields = await self._facts(hash_key)
            if fields[0] is not None and fields[1] is not None and fields[3] is not None:
                counted = "1"  # the facts are known: the step given here, or none
                step = self.step_for(event, fields)
        args += [counted, event.at if once else ""]
        if step is not None:
            keys += step.keys
            args += step.args
            script = "emit_step"
        done = await self._evalsha(script, keys, args)
        if type(done) is list:  # written; its wallboard step failed
            self._step_failed("emit", event.type, event.contact_id)
        return done is not None

    def _step_failed(self, writer: str, type: str, contact_id: str) -> None:
        """A writer's event was written and its wallboard step failed: Valkey's log says why;
        counted by ``step_failed``."""
        log.warning("%s: %s of contact %s written, its wallboard step failed (see the Redis "
                    "server's log)", writer, type, contact_id,
                    extra={"contact_id": contact_id, "event": type})
        if self.step_failed is not None:
            self.step_failed(writer)

    def step_for(self, event: Event, facts: Sequence[Any]) -> Step | None:
        """The wallboard step of ``event`` (its type, time, ``met`` and ``elapsed_ms``), from
        its contact's ``FACTS`` as read (``HMGET``: received, due and channel present); None
        when it moves nothing. For the events' writers: ``stamp``, ``emit``, the watcher."""
        received, due, kind, channel = facts
        return step_of(
            self.keys, self.short_abandon_ms, event.contact_id, event.type, event.at, event.met,
            event.elapsed_ms, received=int(received), due=int(due),
            kind=kind.decode() if kind is not None else "response", channel=channel.decode(),
        )

    async def retained(self, contact_id: str) -> bool:
        """Whether the contact is still retained: its hash's edge stamp (``received_us``), by
        which ``stamp`` and ``emit`` judge it (written and expired with the hash's ``contact``
        field: one ``HSET``, one key)."""
        (found,) = raise_errors(await self.execute(
            [["HEXISTS", self.keys.contact(contact_id), "received_us"]], reads=True
        ))
        return bool(found)

    async def _facts(self, hash_key: str) -> list[Any]:
        """The contact's ``FACTS`` (each None once it is gone), read over the plain commands'
        link: what a writer builds the event's wallboard step from."""
        (fields,) = raise_errors(await self.execute([["HMGET", hash_key, *FACTS]], reads=True))
        return list(fields)

    async def _evalsha(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one script once; an error reply raises."""
        (reply,) = await self.run_scripts(name, [(keys, args)])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def stamp(
        self,
        contact_id: str,
        type: EventType,
        at: Micros,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> Event | None:
        """Record a deadline event once per contact and type (see ``EventSink.stamp``), with
        its dashboard step when it has one (``stamp.lua``: the event marked ``counted``)."""
        fields = await self._facts(self.keys.contact(contact_id))
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
            # a call's answer deadline is met only by an answer: a call abandoned or closed
            # (an Asterisk restart) in time was still never answered
            met=at <= due and (kind != "answer" or type == "answered"),
            detail=detail or {},
        )
        clears = "1" if type in _CLEARS.get(kind, ()) else "0"
        keys = [
            self.keys.contact(contact_id),
            self.keys.deadlines,
            self.keys.warnings,
            self.keys.events,
        ]
        # with the contact's channel (every contact of this version has it) the step is known
        # here: taken by stamp.lua, or none; the event is marked counted either way
        counted = fields[3] is not None
        args = [contact_id, type, at, event.to_json(), clears, "1" if counted else "0"]
        step = self.step_for(event, fields) if counted else None
        if step is not None:
            keys += step.keys
            args += step.args
        done = await self._evalsha("stamp", keys, args)
        if done == 2:  # written; its wallboard step failed
            self._step_failed("stamp", type, contact_id)
        return event if done else None

    async def contact_events(self, contact_id: str) -> list[bytes]:
        """The contact's events as raw JSON, in stream order.

        Every script that appends an event (``intake.lua``, ``stamp.lua``, ``emit.lua``, the
        watcher's claim) also writes it into the contact's hash as ``event:<entry id>`` in the
        same atomic step: the index never lags the stream, expires with the contact, and a read
        is one HGETALL instead of a scan of everything written since the contact arrived.
        """
        fields: dict[bytes, bytes] = await self.redis.hgetall(self.keys.contact(contact_id))
        indexed = [
            (_entry_order(name[6:]), value)
            for name, value in fields.items()
            if name.startswith(b"event:")
        ]
        return [value for _, value in sorted(indexed)]

    async def events(self, contact_id: str) -> list[Event]:
        """The contact's events so far, oldest first (``ContactLookup.events``)."""
        return [Event.from_json(raw) for raw in await self.contact_events(contact_id)]

    async def get(self, contact_id: str) -> Contact | None:
        """Return the contact by id while it is retained, else None."""
        raw = await self.redis.hget(self.keys.contact(contact_id), "contact")
        return None if raw is None else Contact.from_json(raw)

    async def trim(self, stream: str, floor_ms: int = 0, look: int = 1000) -> TrimResult:
        """Trim ``stream`` to ``maxlen`` entries, never past what a consumer group has not
        read and acknowledged (``trim.lua``); with ``floor_ms``, also every entry older than
        that (an operator's retention), read or not. One call trims at most ``look`` entries
        by the cap (``more`` says when there is more to trim)."""
        floor = f"{floor_ms}-0" if floor_ms > 0 else ""
        reply = await self._evalsha("trim", [stream], [self.maxlen, floor, look])
        left, groups, removed, backlog, more = (int(v) for v in reply[:5])
        slowest = reply[5].decode() if isinstance(reply[5], bytes) else str(reply[5])
        return TrimResult(left, groups, removed, backlog, bool(more), slowest)

    async def route_reply(self, group: str, entry_id: str, reply: Reply, adapter: str) -> bool:
        """Move a reply read by ``group`` from ``{p}:replies`` to its adapter's stream, once
        (``route.lua``); False when another instance already did."""
        k = self.keys
        keys = [k.replies, k.replies_to(adapter), k.reply_adapters]
        args = [group, entry_id, orjson.dumps(reply.to_dict()), reply.contact_id, adapter]
        return bool(await self._evalsha("route", keys, args))

    async def hold(self, stream: str, group: str, entry_id: str, consumer: str) -> bool:
        """Reset the idle time of a pending entry while ``consumer`` still owns it
        (``hold.lua``); False once another consumer has taken it over."""
        return bool(await self._evalsha("hold", [stream], [group, entry_id, consumer]))

    async def stream_length(self) -> int:
        try:
            return int(await self.redis.xlen(self.keys.contacts))
        except ResponseError:
            return 0


SCRIPT_CONTACTS = 64
"""Contacts in one call of ``intake.lua`` (a longer batch is sent as several calls in its one
round trip): a call holds Valkey for all of its contacts, about 0.1 ms each."""


def _per_contact(replies: list[Any], contacts: int) -> list[Any]:
    """One reply per contact from the replies of ``_script_calls``' calls: a call's error
    reply stands for each of its contacts."""
    out: list[Any] = []
    for n, reply in enumerate(replies):
        if isinstance(reply, Exception):
            out += [reply] * min(SCRIPT_CONTACTS, contacts - n * SCRIPT_CONTACTS)
        else:
            out += reply
    return out


def raise_errors(replies: list[Any]) -> list[Any]:
    """The replies of ``RedisQueue.execute`` or ``run_scripts``, or the first error among
    them raised (for callers that have no use for a partial batch)."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


def _entry_order(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def pack_commands(commands: list[list[Any]]) -> bytes:
    """Encode commands in RESP (arrays of bulk strings), all in one buffer.

    hiredis's C packer does it in a third of the time of the Python one (about 5 against
    15-20 µs for an intake call of 22 arguments); an argument it does not take (only str,
    bytes, int and float) falls back to the Python packer, which writes ``str(arg)``.
    (The buffers handed to the transport as a list instead of joined: no gain measured, a
    loss at 100 commands, uvloop writing many small buffers.)
    """
    if _pack_one is not None:
        try:
            return b"".join([_pack_one(tuple(command)) for command in commands])
        except TypeError:
            pass
    return _pack_commands(commands)


def _pack_commands(commands: list[list[Any]]) -> bytes:
    out: list[bytes] = []
    append = out.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            if type(arg) is not bytes:
                arg = arg.encode() if type(arg) is str else str(arg).encode()
            append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def decode_fields(fields: dict[bytes, bytes]) -> dict[str, Any]:
    """Decode a stream entry's JSON field (``contact``, ``event`` or ``reply``)."""
    for name in (b"contact", b"event", b"reply"):
        if name in fields:
            return cast(dict[str, Any], orjson.loads(fields[name]))
    return {}
