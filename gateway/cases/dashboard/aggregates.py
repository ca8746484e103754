"""Service-level counters kept current in Redis, so a dashboard refresh never scans the streams.

One reader a fleet (the holder of lease ``aggregate``; the other instances wait to take over)
follows ``{p}:events`` with ``XREAD`` after a cursor, the string ``{p}:agg:cursor`` (the last
entry done with and the group's entries-read counter there). Each event moves its contact
to a better-ranked outcome, once (the step of ``gateway/queueing/outcomes.py`` and
``aggstep.lua``):

    open (0) < closed (1) < abandoned, short (2) < breached (3) < within, late (4)

which is the order in which ``gateway.cases.report.compute`` decides what settled a contact: a reply
wins over a breach, a breach over an abandon, and so on. The counters are kept in the bucket
of the minute and of the hour the contact *arrived* in (``{p}:agg:m:<s>``, ``{p}:agg:h:<s>``),
field ``<label>:<outcome>``, with ``<label>:volume``, and the settling times in bins
(``<label>:t:<seconds>``, ``<label>:tsum`` in ms). A window is summed from at most 24 hour
buckets and 120 minute buckets. The contact hash remembers the outcome (field ``agg``), so an
event read twice changes nothing. Besides: open contacts per label by deadline, calls
waiting by arrival, breaches and repeat contacts by time (sorted sets, trimmed to a day).

After each batch ``advance.lua`` moves the cursor past it, only from where the batch was
read (compare and set: a reader whose lease was handed over meanwhile writes nothing and
reads on from the cursor), and moves the consumer group ``gateway-aggregate`` to the same
entry with its entries-read counter (``XGROUP SETID``): the group is no longer read, but the
streams' trimming (``trim.lua``) and the backlog go by its position as before, and an older
version's instances (a rolling upgrade) go on reading in it. There is no pending list and no
``XACK``: a reader that dies mid-batch leaves the cursor where it was, and the next reads the
batch again (every step is idempotent). Entries an older instance read in the group and left
pending are taken over (``XAUTOCLAIM``) and acknowledged.

Most steps are taken by the events' writers, in the same atomic call that appends the event,
which then says so (field ``counted``): ``stamp.lua`` (answers, replies, abandoned calls) and
``claim.lua`` (the watcher's breaches) have read the contact's facts already, ``emit.lua`` (a
contact closed through the API) is given them by its caller, and the reader skips their events
without reading anything. It steps the rest itself with ``aggregate.lua`` after reading the
contacts' facts: an older version's events (a rolling upgrade).

A new contact's first step ("open": its volume, the ``agg`` field, the open, waiting and
repeat sets) is taken by ``intake.lua`` itself, atomically with the contact's write, on every
path that writes one (Intake, the spool's replay); its ``enqueued`` event says so (field
``counted``, the repeat count) and carries the contact's surge keys (field ``keys``, computed
at intake by ``SurgeWatch.keys_of``). The aggregator skips such an event without reading
anything, and counts the surge keys of the batch's new contacts in the same ``advance.lua``
call that moves the cursor past them: once a contact, with no command of its own. An older
version's counted event carries them in field ``surge`` with a ``surge`` mark in the hash:
the first to take the mark (``HDEL``, this version or the older one's group consumers)
counts it. An ``enqueued`` event without ``counted`` (older still) takes the old path: the
contact is read, decoded and stepped here.

The loop reads ``batch`` (200) events at a time while it keeps up, and waits ``pause_s`` (250
ms) after a batch that was not full; behind a backlog each read asks for twice the last full
one, up to ``most`` (1,000): a full batch of 200 new contacts holds the event loop for 1-2 ms
(median, bench/aggregator_bench.py), a batch of outcome-moving events is stepped 50 at a
time, and the reader polls a few times a second, not dozens (each poll that finds events is
one write, an fsync of the append-only file under ``appendfsync always``, which the intake
writes queue behind).

Round trips, not CPU, bound the reader in a busy worker: each waits for Valkey's fsync and
for the worker's loop to come round, about three turns of it. So a full batch's
``advance.lua`` call carries the next batch's ``XREAD`` (after the batch's last entry) in the
same round trip, and ``poll`` takes that reply instead of reading (a refused move drops it):
under a backlog a batch of counted ``enqueued`` events costs one round trip, not two (as a
rule: a repeat surge to write, or the group's entries-read counter to find, adds one), and
since each read asks for twice the last full one, such a round trip carries up to 1,000
events (the reader caught up 1.9-2.4 times as fast with the loop spun 20 ms a turn). A part
of outcome events reads its contacts (``HMGET``) in the round trip of the previous part's
steps (``apply_then``): one round trip a part, not two.

Breaches are counted when the deadline watcher writes them (within its interval of the
deadline), where ``gateway report`` also counts a deadline passed with nothing as breached.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import ResponseError

from gateway.adapters import load_media
from gateway.cases.surge import SAMPLES, SAMPLES_TTL_S, SurgeWatch, Tagged, Tally
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.queueing.backlog import WALLBOARD_GROUP
from gateway.queueing.coordination import Fence, Leases
from gateway.queueing.keys import AGG_BUCKET_TTL_S, Keys
from gateway.queueing.outcomes import FACTS, step_of
from gateway.queueing.outcomes import HOUR_S as HOUR_S  # the dashboard's names, as before
from gateway.queueing.outcomes import MINUTE_S as MINUTE_S
from gateway.queueing.outcomes import RANKS as RANKS
from gateway.queueing.outcomes import SETTLING as SETTLING
from gateway.queueing.outcomes import Step as Step
from gateway.queueing.outcomes import time_bin as time_bin
from gateway.queueing.store import RedisQueue, raise_errors
from gateway.records import Contact
from gateway.server.config import SlaSection
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

GROUP = WALLBOARD_GROUP
LEASE = "aggregate"
CURSOR_TTL_S = 86400
"""The cursor string lives a day after its last move: a fleet quiet that long (or an older
version's instances alone, after a rollback) leaves none, and the next reader starts where the
group has read to."""
DAY_S = 86400
BUCKET_TTL_S = AGG_BUCKET_TTL_S
WAIT_LIMIT_S = HOUR_S
"""A call still 'waiting' after this long lost its hang-up (AMI down): it is left out."""
OUTCOMES = ("within", "late", "breached", "abandoned", "short", "closed")


@dataclass(slots=True)
class Counts:
    """The counters of one label over a window."""

    volume: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    bins: dict[int, int] = field(default_factory=dict)
    """Settling times: bin edge (s) -> contacts."""
    tsum_ms: int = 0

    def get(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)

    @property
    def settled(self) -> int:
        return self.get("within") + self.get("late")

    def percentile_ms(self, q: float) -> int | None:
        n = sum(self.bins.values())
        if not n:
            return None
        rank = max(1, math.ceil(q * n))
        seen = 0
        for edge in sorted(self.bins):
            seen += self.bins[edge]
            if seen >= rank:
                return edge * 1000
        return None

    def row(self, label: str) -> dict[str, Any]:
        """A row shaped like ``gateway report``'s (``ChannelFigures.as_dict``)."""
        settled = self.settled
        breached = self.get("late") + self.get("breached")
        abandoned = self.get("abandoned") + self.get("short")
        closed = self.get("closed")
        within = self.get("within")
        offered = self.volume - self.get("short")
        return {
            "channel": label,
            "volume": self.volume,
            "settled": settled,
            "within": within,
            "within_pct": 100.0 * within / self.volume if self.volume else None,
            "within_settled_pct": 100.0 * within / settled if settled else None,
            "breached": breached,
            "abandoned": abandoned,
            "closed": closed,
            "open": max(0, self.volume - settled - self.get("breached") - abandoned - closed),
            "connection_rate": (100.0 * settled / offered if offered else None)
            if label == load_media().answer_row()
            else None,
            "average_ms": round(self.tsum_ms / settled) if settled else None,
            "p50_ms": self.percentile_ms(0.5),
            "p90_ms": self.percentile_ms(0.9),
            "p99_ms": self.percentile_ms(0.99),
        }

    def add(self, other: Counts) -> None:
        self.volume += other.volume
        self.tsum_ms += other.tsum_ms
        for k, v in other.outcomes.items():
            self.outcomes[k] = self.outcomes.get(k, 0) + v
        for edge, v in other.bins.items():
            self.bins[edge] = self.bins.get(edge, 0) + v


def parse_bucket(raw: dict[Any, Any], into: dict[str, Counts]) -> None:
    """Add one bucket hash (``HGETALL``) to ``into`` (label -> counts)."""
    for k, v in raw.items():
        name = k.decode() if isinstance(k, bytes) else str(k)
        label, _, what = name.partition(":")
        counts = into.get(label)
        if counts is None:
            counts = into[label] = Counts()
        n = int(v)
        if what == "volume":
            counts.volume += n
        elif what == "tsum":
            counts.tsum_ms += n
        elif what.startswith("t:"):
            edge = int(what[2:])
            counts.bins[edge] = counts.bins.get(edge, 0) + n
        else:
            counts.outcomes[what] = counts.outcomes.get(what, 0) + n


def window_buckets(keys: Keys, start_s: int, end_s: int) -> list[str]:
    """Bucket keys covering ``[start_s, end_s)`` to the minute: whole hours from hour buckets,
    the ragged ends from minute buckets (at most 24 + 120 keys for a day)."""
    start_s -= start_s % MINUTE_S
    out: list[str] = []
    t = start_s
    while t < end_s:
        if t % HOUR_S == 0 and t + HOUR_S <= end_s:
            out.append(keys.agg_bucket("h", t))
            t += HOUR_S
        else:
            out.append(keys.agg_bucket("m", t))
            t += MINUTE_S
    return out


async def read_window(
    redis: Any, keys: Keys, start_us: Micros, end_us: Micros
) -> dict[str, Counts]:
    """Counters per label of the contacts received in ``[start_us, end_us)`` (to the minute:
    the end is rounded up to the minute ``end_us`` falls in)."""
    end_s = -(-end_us // (MINUTE_S * MICROS_PER_SECOND)) * MINUTE_S
    names = window_buckets(keys, start_us // MICROS_PER_SECOND, end_s)
    pipe = redis.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(name)
    counts: dict[str, Counts] = {}
    for raw in await pipe.execute():
        parse_bucket(raw, counts)
    return counts


async def read_hours(
    redis: Any, keys: Keys, start_us: Micros, end_us: Micros
) -> dict[int, dict[str, int]]:
    """Contacts per hour and label (volume chart): hour start (s) -> label -> volume."""
    first = start_us // MICROS_PER_SECOND
    first -= first % HOUR_S
    hours = list(range(first, end_us // MICROS_PER_SECOND + 1, HOUR_S))
    pipe = redis.pipeline(transaction=False)
    for h in hours:
        pipe.hgetall(keys.agg_bucket("h", h))
    out: dict[int, dict[str, int]] = {}
    for h, raw in zip(hours, await pipe.execute(), strict=True):
        per: dict[str, int] = {}
        for k, v in raw.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            if name.endswith(":volume"):
                per[name[: -len(":volume")]] = int(v)
        out[h] = per
    return out


STEPS_PER_CALL = 200
STEP_CHUNK = 50
"""Events that move an outcome (deadline events above all) are read and stepped this many at
a time: a batch of 200 breaches held the gateway's loop for 5-8 ms in one piece."""
STEPPED = frozenset(
    t.encode() for t in ("enqueued", "answered", "responded", "abandoned", "breached", "closed")
)
"""The event types that move a contact's outcome (``type`` fields as read)."""


async def apply(queue: RedisQueue, steps: list[Step]) -> list[bool]:
    """Run the steps in order, ``STEPS_PER_CALL`` to one script call, in one round trip;
    return, per step, whether it marked its contact counted for surges just now."""
    flags, _ = await apply_then(queue, steps, [])
    return flags


async def apply_then(
    queue: RedisQueue, steps: list[Step], then: list[list[Any]]
) -> tuple[list[bool], list[Any]]:
    """``apply``, with the plain commands ``then`` sent behind the steps in the same round
    trip: the steps' flags, and ``then``'s replies (errors as values)."""
    calls = []
    for i in range(0, len(steps), STEPS_PER_CALL):
        chunk = steps[i : i + STEPS_PER_CALL]
        calls.append(([k for s in chunk for k in s.keys], [a for s in chunk for a in s.args]))
    if not calls:
        return [], (await queue.execute(then) if then else [])
    replies = await queue.run_scripts("aggregate", calls, after=then)
    flags: list[bool] = []
    for r in raise_errors(replies[: len(calls)]):
        flags.extend(bool(int(f)) for f in r)
    return flags, replies[len(calls) :]


class Aggregator:
    """Follows ``{p}:events`` (one reader a fleet, under lease ``aggregate``) and keeps the
    counters."""

    def __init__(
        self,
        queue: RedisQueue,
        clock: Clock,
        sla: SlaSection,
        instance: str,
        *,
        surge: SurgeWatch | None = None,
        batch: int = 200,
        most: int = 0,
    ) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.keys = queue.keys
        self.clock = clock
        self.short_abandon_ms = int(float(sla.short_abandon) * 1000)
        self.instance = instance
        self.surge = surge
        """Counts new contacts for surge warnings (``[surge] enabled``), else None."""
        self.batch = batch
        """Events read at once while the reader keeps up: the loop is held for one batch's
        processing (1-2 ms for 200 new contacts)."""
        self.most = most
        """While the reader is behind, each read asks for twice as many events as the last
        full one, up to this many (0: five times ``batch``): in a busy worker a round trip
        waits several turns of the loop (tens of ms), and a batch of counted events costs a
        few µs an event, so one round trip carries more of the backlog (a batch of 1,000 new
        contacts holds the loop about 5 ms). ``batch`` again once a read was not full, or
        the cursor is taken again (a refused move, a lease taken over)."""
        self._count = 0
        """The next read's ``COUNT`` (0: ``batch``)."""
        self._behind = False
        """The last read was full (and its move went through): read again at once, without
        the pause."""
        self.pause_s = 0.25
        """After a batch that was not full, wait this long before reading again (the figures
        lag by as much; a wallboard snapshot is a second old anyway)."""
        self._supervisor: Supervisor | None = None
        self._stopping = False
        self._group_ready = False
        self._cursor: bytes = b"0-0"
        """The last entry done with: the next read starts after it."""
        self._entries_read: int | None = None
        """The group's entries-read counter at ``_cursor`` (None: unknown)."""
        self._base = b""
        """The cursor string's value the reader's next batch starts from (``advance.lua``
        compares it): b"" when there is none."""
        self._ahead: tuple[bytes, int, Any] | None = None
        """The next read, sent with the last full batch's ``advance.lua`` (one round trip for
        both): the cursor it was read after, its ``COUNT`` and ``XREAD``'s reply."""
        self.processed = 0
        self.claim_idle_ms = 60_000
        """Entries another consumer read and left unacknowledged this long are taken over."""

    def start(self, supervisor: Supervisor, leases: Leases | None = None) -> None:
        """Run the reader (supervised): under lease ``aggregate`` when ``leases`` are given
        (one reader a fleet; the others wait to take over), else here."""
        self._stopping = False
        self._supervisor = supervisor
        if leases is None:
            supervisor.spawn("aggregator", self._run, required=False, backoff=(0.5, 10.0))
            return

        async def held() -> None:
            await self._create_group()  # on every instance: the trimming waits for it
            await leases.exclusive(LEASE, self._held)

        supervisor.spawn("aggregator", held, required=False, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            await self._supervisor.stop("aggregator")

    async def _held(self, fence: Fence) -> None:
        log.info("aggregator: reading here (lease fence %d)", fence.token)
        self._group_ready = False  # the cursor as the last holder left it
        await self._run()

    async def ensure_group(self) -> None:
        """Make the group if there is none, and take the cursor: the cursor string's, else
        where the group has read to."""
        await self._create_group()
        await self._load_cursor()
        self._group_ready = True

    async def _create_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.events, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _load_cursor(self) -> None:
        self._ahead = None
        self._count, self._behind = 0, False  # reads of ``batch`` again from the new cursor
        raw = await self.redis.get(self.keys.agg_cursor)
        if raw:
            entry, _, count = bytes(raw).partition(b" ")
            self._cursor, self._base = entry, bytes(raw)
            self._entries_read = int(count) if count else None
            return
        self._base = b""
        for group in await self.redis.xinfo_groups(self.keys.events):
            if _text(group.get("name")) == GROUP:
                last = group.get("last-delivered-id") or b"0-0"
                self._cursor = last.encode() if isinstance(last, str) else bytes(last)
                read = group.get("entries-read")
                self._entries_read = None if read is None else int(read)
        if self._entries_read is None:
            await self._load_entries_read()

    async def _run(self) -> None:
        backoff = Backoff(0.5, 10.0)
        last_claim = 0.0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if not self._group_ready:
                    await self.ensure_group()
                if loop.time() - last_claim > 30:
                    last_claim = loop.time()
                    await self.claim_stale()
                    await self._load_entries_read()  # exact again at the stream's end
                await self.poll()
                backoff.reset()
                if not self._behind:  # fewer, larger batches: the cost per poll is shared
                    await asyncio.sleep(self.pause_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._group_ready = False
                log.warning("aggregator: %r, retrying in %.1f s", exc, await backoff.sleep())

    async def claim_stale(self) -> None:
        """Take over entries a consumer of the group (an instance of an older version, during
        an upgrade) read and never acknowledged: the old path's steps and surge marks."""
        if not (await self.redis.xpending(self.keys.events, GROUP))["pending"]:
            return  # as a rule: no consumer made in the group for nothing
        start: Any = "0-0"
        while True:
            reply = await self.redis.xautoclaim(
                self.keys.events,
                GROUP,
                self.instance,
                min_idle_time=self.claim_idle_ms,
                start_id=start,
                count=self.batch,
            )
            start, entries = reply[0], (reply[1] if len(reply) > 1 else [])
            if entries:
                await self.process([(e, f) for e, f in entries if f], claimed=True)
            if start in (b"0-0", "0-0") or not entries:
                return

    async def poll(self, block_ms: int | None = None) -> int:
        """Read and apply one batch after the cursor; return how many events it held: the
        batch the last full batch's move read ahead, when it read after where the cursor is
        (``_advance``), else one read now. (``block_ms`` is not used: the loop pauses between
        batches instead.)"""
        if not self._group_ready:
            await self.ensure_group()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == self._cursor:
            # read with the last batch's move, after where it left the cursor
            _, count, reply = ahead
        else:
            count = self._count or self.batch
            (reply,) = raise_errors(await self.queue.execute(
                [self._read(count)],
                pooled=True,  # polled every 250 ms: not in the way of the shared connection
            ))
        if not reply:
            self._count, self._behind = 0, False
            return 0
        # RESP3 answers a map of streams, RESP2 a list of [stream, entries]
        raw = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        await self.process(raw, count=count)  # each entry's fields as read: a flat list
        return len(raw)

    def _read(self, count: int, after: bytes | None = None) -> list[Any]:
        """The ``XREAD`` of up to ``count`` events: after ``after``, else after the cursor."""
        return ["XREAD", "COUNT", count, "STREAMS", self.keys.events, after or self._cursor]

    async def catch_up(self) -> int:
        """Apply everything not yet read (tests, benchmarks); return how many events."""
        total = 0
        while True:
            n = await self.poll()
            total += n
            if n == 0:
                return total

    async def process(
        self, entries: Sequence[Sequence[Any]], *, claimed: bool = False, count: int = 0
    ) -> None:
        """Apply a batch of event entries read in order from the stream, then move the cursor
        past those beyond it (``advance.lua``); ``claimed``: taken over from the group's
        pending list, acknowledged instead (the cursor reads them in its turn); ``count``: the
        read's ``COUNT`` (a batch that filled it is followed by a larger read, up to
        ``most``, sent with its move; else by a read of ``batch``). Each entry is
        its id and its fields as read: ``poll``'s raw reply gives a list and a flat list of
        fields and values, redis-py's claim a pair and a dict.

        An ``enqueued`` event that ``intake.lua`` marked ``counted`` took its step with the
        contact's write: nothing is read for it; nor for any other event marked ``counted``
        (``stamp.lua``'s and ``claim.lua``'s: their writers took their steps). A new contact's
        surge keys (field ``keys``) are counted by ``advance.lua`` with the cursor's move, once:
        an entry read again (at or before the cursor, or claimed) counts none. An older
        version's counted event carries them in field ``surge`` instead, with the hash's
        ``surge`` mark: the first to take the mark (``HDEL``) counts them, as that version's
        aggregator does. An ``enqueued`` event without ``counted`` (older still) takes the old
        path: the contact is read, decoded and stepped like any other event. A repeat's counted
        event also names its sender's pseudonym (field ``sender``): a citizen whose repeat surge
        of the day is written and remembered (``SurgeWatch.repeats_of``) costs no read of the
        contact.
        """
        parsed: list[tuple[str, str, dict[str, Any]]] = []
        tagged: list[Tagged] = []
        """The older version's counted contacts (the hash's mark decides)."""
        fresh: list[tuple[bytes, Micros, list[str], int]] = []
        """This version's counted contacts read past the cursor (counted with its move)."""
        senders: dict[str, tuple[bytes | str, Micros]] = {}
        """Contact id -> its sender's pseudonym and its arrival, for the repeats whose event
        names the sender (``SurgeWatch.repeats_of``: a citizen's surge already written then
        costs no read of the contact)."""
        counting = self.surge is not None
        # the entries past the cursor: from ``first`` on (in order; all of them, as a rule)
        first = len(entries)
        if not claimed:
            cursor = _order(self._cursor)
            first = 0
            while first < len(entries) and _order(entries[first][0]) <= cursor:
                first += 1
        for at, (_, read) in enumerate(entries):
            fields: dict[bytes, bytes]
            if read.__class__ is not list:
                fields = read
            else:  # as read (``poll``): a flat list of fields and values
                size = len(read)
                if (
                    (size == 10 or (size == 12 and read[10] == b"sender"))
                    and read[5] == b"enqueued" and read[8] == b"keys"
                    and read[6] == b"counted" and read[2] == b"contact_id"
                ):  # intake.lua's counted event, its fields in its order: no dict made
                    if counting and at >= first:
                        received, *names = orjson.loads(read[9])
                        fresh.append((read[3], received, names, int(read[7])))
                        if size == 12:  # a repeat's: its sender's pseudonym
                            senders[read[3].decode()] = (read[11], received)
                    continue
                if size == 8 and read[6] == b"counted" and read[5] != b"enqueued":
                    continue  # stamp.lua's or claim.lua's: stepped by its writer
                fields = dict(zip(read[::2], read[1::2], strict=False))
            kind = fields.get(b"type")
            if kind != b"enqueued" and b"counted" in fields:
                continue  # an outcome event whose writer took its step
            if kind == b"enqueued" and b"counted" in fields:
                if not counting:
                    continue
                raw = fields.get(b"keys")
                if raw is not None:
                    if at >= first:
                        received, *names = orjson.loads(raw)
                        contact_id = fields[b"contact_id"]
                        fresh.append((contact_id, received, names, int(fields[b"counted"])))
                        sender = fields.get(b"sender")
                        if sender is not None:
                            senders[_text(contact_id)] = (sender, received)
                    continue
                raw = fields.get(b"surge")
                if raw is not None:
                    received, *names = orjson.loads(raw)
                    cid = fields[b"contact_id"].decode()
                    tagged.append(Tagged(cid, received, names, int(fields[b"counted"])))
                continue
            if kind in STEPPED:
                cid = _text(fields.get(b"contact_id"))
                parsed.append((cid, _text(kind), orjson.loads(fields[b"event"])))
        extra: list[list[Any]] = []
        contacts: list[Contact] = []
        # in parts of STEP_CHUNK events: the loop and Valkey are not held for a whole batch of
        # deadline events in one piece. A part's contacts are read (HMGET) behind the previous
        # part's steps in the same round trip, so still after them: a round trip a part
        parts = [parsed[i : i + STEP_CHUNK] for i in range(0, len(parsed), STEP_CHUNK)]
        wanted, reads = self._fact_reads(parts[0]) if parts else ([], [])
        replies = await self.queue.execute(reads) if reads else []
        for n, part in enumerate(parts):
            steps: list[Step] = []
            new: dict[int, Contact] = {}
            """Step index -> the contact of an old-style ``enqueued`` step (surges: once)."""
            facts = self._facts(wanted, raise_errors(replies))
            for cid, type_, event in part:
                fact = facts.get(cid)
                if fact is None:
                    continue  # the contact expired, or never was (a foreign event)
                step = self._step(cid, type_, event, fact)
                if step is not None:
                    steps.append(step)
                if type_ == "enqueued" and fact.get("contact") and step is not None:
                    contact = Contact.from_json(fact["contact"])
                    new[len(steps) - 1] = contact
                    if contact.repeat.count >= 2:
                        extra.append(["ZADD", self.keys.agg_repeats, contact.received_at, cid])
            wanted, reads = self._fact_reads(parts[n + 1]) if n + 1 < len(parts) else ([], [])
            flags, replies = await apply_then(self.queue, steps, reads)
            # a redelivered batch counts none of its contacts for surges again
            contacts += [c for i, c in new.items() if flags[i]]
        if tagged:  # an older version's counted contacts: the first to take the mark counts
            # one plain HDEL a contact in one round trip: each is atomic on its own
            head = self.keys.contact_head  # Keys.contact, its head made once a batch
            marks = raise_errors(await self.queue.execute(
                [["HDEL", head + t.contact_id, "surge"] for t in tagged]
            ))
            tagged = [t for t, mark in zip(tagged, marks, strict=True) if mark]
        now = self.clock.now_us()
        day_ago = now - DAY_S * MICROS_PER_SECOND
        extra.append(["ZREMRANGEBYSCORE", self.keys.agg_repeats, "-inf", day_ago])
        extra.append(["ZREMRANGEBYSCORE", self.keys.agg_breaches, "-inf", day_ago])
        if claimed and entries:  # the surges of this batch are marked counted
            extra.append(["XACK", self.keys.events, GROUP, *[e for e, _ in entries]])
        # a full batch: the reader is behind, and the next read is larger
        count = count or self.batch
        full = not claimed and len(entries) >= count
        self._behind = full
        most = max(self.most or 5 * self.batch, self.batch)
        self._count = min(2 * count, most) if full else 0
        if first < len(entries):
            tally = self.surge.tally(fresh) if fresh and self.surge is not None else None
            # a full batch: the next is read in the same round trip as this one's move
            moved = await self._advance(
                entries[-1][0], len(entries) - first, tally, extra, read_on=full
            )
            if moved and tally is not None and tally.repeats and self.surge is not None:
                await self.surge.repeats_of(
                    [_text(cid) for cid in tally.repeats], senders=senders
                )
        else:
            raise_errors(await self.queue.execute(extra))
        if self.surge is not None and (contacts or tagged):
            tagged += [
                Tagged(c.id, c.received_at, self.surge.keys_of(c), c.repeat.count)
                for c in contacts
            ]
            await self.surge.count_tagged(tagged, {c.id: c for c in contacts})
        self.processed += len(entries)

    async def _advance(
        self,
        last: Any,
        read: int,
        tally: Tally | None,
        before: list[list[Any]],
        *,
        read_on: bool = False,
    ) -> bool:
        """Move the cursor to ``last`` (``read`` entries past it) and write ``tally`` (the
        surge keys of the new contacts past it), in one ``advance.lua`` call after the plain
        commands ``before`` (one round trip); False when another reader moved the cursor
        first (then nothing of it is written, and the cursor is taken again from Redis).

        ``read_on``: the next batch's ``XREAD`` (after ``last``) is sent behind the script in
        the same round trip, and ``poll`` takes its reply instead of reading; a refused move
        drops it (the cursor is elsewhere), as does a failed or empty read (``poll`` reads
        again)."""
        last = last.encode() if isinstance(last, str) else bytes(last)
        entries_read = None if self._entries_read is None else self._entries_read + read
        k = self.keys
        keys: list[Any] = [k.events, k.agg_cursor, k.surge_first]
        args: list[Any] = [
            GROUP, self._base, last, "" if entries_read is None else entries_read,
            CURSOR_TTL_S,
        ]
        if tally is not None and self.surge is not None:
            minutes = sorted({m for m, _ in tally.counted})
            number = {m: i for i, m in enumerate(minutes, start=1)}
            keys += [k.surge_bucket(m) for m in minutes]
            args += [self.surge.ttl_s, SAMPLES_TTL_S, tally.first or "", len(minutes), SAMPLES]
            for (minute, key), ids in tally.counted.items():
                samples = ids[-SAMPLES:]
                keys.append(k.surge_samples(key, minute))
                args += [number[minute], key, len(ids), len(samples), *samples]
        else:
            args += [0, SAMPLES_TTL_S, "", 0, SAMPLES]
        after = [self._read(self._count or self.batch, last)] if read_on else None
        replies = await self.queue.run_scripts(
            "advance", [(keys, args)], before=before, after=after
        )
        (moved,) = raise_errors(replies[:1])
        if not moved:
            await self._load_cursor()
            return False
        if read_on and replies[1] and not isinstance(replies[1], Exception):
            # (none when it found nothing: poll reads again)
            self._ahead = (last, self._count or self.batch, replies[1])
        self._cursor = last
        self._entries_read = entries_read
        self._base = last + b" " + (b"" if entries_read is None else str(entries_read).encode())
        if entries_read is None:  # Redis may know it now (the group at the stream's end)
            await self._load_entries_read()
        return True

    async def _load_entries_read(self) -> None:
        """The group's entries-read counter at the cursor, when the group does not know it:
        exact at the stream's end, or before its first entry (no entry ever deleted inside
        it), else still unknown."""
        (info,) = await self.queue.execute([["XINFO", "STREAM", self.keys.events]], pooled=True)
        if isinstance(info, Exception):
            return  # no stream yet
        fields = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2], strict=False))
        added, length = fields.get(b"entries-added"), fields.get(b"length")
        last, first = fields.get(b"last-generated-id"), fields.get(b"first-entry")
        deleted = fields.get(b"max-deleted-entry-id") or b"0-0"
        if added is None or length is None or last is None:
            return
        cursor = _order(self._cursor)
        if cursor >= _order(last):
            self._entries_read = int(added)
        elif not first or (
            cursor < _order(first[0]) and _order(deleted) < _order(first[0])
        ):
            self._entries_read = int(added) - int(length)

    def _fact_reads(
        self, part: list[tuple[str, str, dict[str, Any]]]
    ) -> tuple[list[str], list[list[Any]]]:
        """The contacts of a part of a batch, and the reads of what its steps need of them
        (``_facts`` takes the replies)."""
        wanted = sorted({cid for cid, _, _ in part})
        enqueued = {cid for cid, type_, _ in part if type_ == "enqueued"}
        commands: list[list[Any]] = []
        for cid in wanted:
            names = [*FACTS]
            if cid in enqueued:
                names.append("contact")
            commands.append(["HMGET", self.keys.contact(cid), *names])
        return wanted, commands

    def _facts(self, wanted: list[str], replies: list[Any]) -> dict[str, dict[str, Any]]:
        """Contact id -> what its steps need, from ``_fact_reads``' replies (none for a
        contact that expired, or never was)."""
        out: dict[str, dict[str, Any]] = {}
        for cid, values in zip(wanted, replies, strict=True):
            if values[0] is None or values[1] is None:
                continue
            out[cid] = {
                "received": int(values[0]),
                "due": int(values[1]),
                "kind": _text(values[2]) or "response",
                "channel": _text(values[3]),
                "contact": values[4] if len(values) > 4 else None,
            }
        return out

    def _step(
        self, cid: str, type_: str, event: dict[str, Any], fact: dict[str, Any]
    ) -> Step | None:
        from gateway.contact.clock import parse_time

        return step_of(
            self.keys, self.short_abandon_ms, cid, type_, parse_time(event["at"]),
            event.get("met"), event.get("elapsed_ms"), received=fact["received"],
            due=fact["due"], kind=fact["kind"], channel=fact["channel"],
        )


def _order(entry_id: Any) -> tuple[int, int]:
    """An entry id's order: (ms, sequence)."""
    raw = entry_id.encode() if isinstance(entry_id, str) else bytes(entry_id)
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
