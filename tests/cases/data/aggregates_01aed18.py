"""Service-level counters kept current in Redis, so a dashboard refresh never scans the streams.

Every gateway instance reads ``{p}:events`` in one consumer group (``gateway-aggregate``): each
event goes to one instance, and a dead instance's pending entries are claimed by another. For
each event the ``aggregate.lua`` script moves its contact to a better-ranked outcome, once:

    open (0) < closed (1) < abandoned, short (2) < breached (3) < within, late (4)

which is the order in which ``gateway.cases.report.compute`` decides what settled a contact: a reply
wins over a breach, a breach over an abandon, and so on. The counters are kept in the bucket
of the minute and of the hour the contact *arrived* in (``{p}:agg:m:<s>``, ``{p}:agg:h:<s>``),
field ``<label>:<outcome>``, with ``<label>:volume``, and the settling times in bins
(``<label>:t:<seconds>``, ``<label>:tsum`` in ms). A window is summed from at most 24 hour
buckets and 120 minute buckets. The contact hash remembers the outcome (field ``agg``), so a
redelivered entry changes nothing. Besides: open contacts per label by deadline, calls
waiting by arrival, breaches and repeat contacts by time (sorted sets, trimmed to a day).

A new contact's first step ("open": its volume, the ``agg`` field, the open, waiting and
repeat sets) is taken by ``intake.lua`` itself, atomically with the contact's write, on every
path that writes one (Intake, the spool's replay); its ``enqueued`` event says so (field
``counted``, the repeat count) and carries the contact's surge keys (field ``surge``, computed
at intake by ``SurgeWatch.keys_of``). The aggregator skips such an event without reading
anything, and counts the surge keys of a batch together, once a contact: the first to take
the hash's ``surge`` mark (``HDEL``) counts it. An ``enqueued`` event without
``counted`` (an instance of an older version wrote it: a rolling upgrade) takes the old path:
the contact is read, decoded and stepped here.

The loop reads at most ``batch`` (200) events at a time, and waits ``pause_s`` (250 ms) after
a batch that was not full: a batch holds the event loop for a few milliseconds at most, and
at moderate rates the aggregator polls a few times a second, not dozens (each poll is a few
writes, each an fsync of the append-only file under ``appendfsync always``, which the intake
writes queue behind).

Breaches are counted when the deadline watcher writes them (within its interval of the
deadline), where ``gateway report`` also counts a deadline passed with nothing as breached.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.exceptions import ResponseError

from gateway.adapters import load_media
from gateway.cases.report import label_of
from gateway.cases.surge import SurgeWatch, Tagged
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.queueing.keys import AGG_BUCKET_TTL_S, Keys
from gateway.queueing.store import RedisQueue, raise_errors
from gateway.records import Contact
from gateway.server.config import SlaSection
from gateway.server.supervise import Backoff, Supervisor

log = logging.getLogger(__name__)

GROUP = "gateway-aggregate"
MINUTE_S = 60
HOUR_S = 3600
DAY_S = 86400
BUCKET_TTL_S = AGG_BUCKET_TTL_S
WAIT_LIMIT_S = HOUR_S
"""A call still 'waiting' after this long lost its hang-up (AMI down): it is left out."""
SETTLING = {"answer": "answered", "response": "responded"}
RANKS = {"open": 0, "closed": 1, "abandoned": 2, "short": 2, "breached": 3, "within": 4, "late": 4}
OUTCOMES = ("within", "late", "breached", "abandoned", "short", "closed")


def time_bin(ms: int) -> int:
    """The bin (its upper edge in seconds) of a settling time: to the second below 5 min, to
    10 s below 1 h, to the minute beyond."""
    s = ms / 1000
    if s <= 300:
        return math.ceil(s)
    if s <= 3600:
        return math.ceil(s / 10) * 10
    return math.ceil(s / 60) * 60


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


@dataclass(frozen=True, slots=True)
class Step:
    """One event's effect, ready for the script."""

    keys: list[str]
    args: list[Any]


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
    calls = []
    for i in range(0, len(steps), STEPS_PER_CALL):
        chunk = steps[i : i + STEPS_PER_CALL]
        calls.append(([k for s in chunk for k in s.keys], [a for s in chunk for a in s.args]))
    flags: list[bool] = []
    for r in raise_errors(await queue.run_scripts("aggregate", calls)) if calls else ():
        flags.extend(bool(int(f)) for f in r)
    return flags


class Aggregator:
    """Follows ``{p}:events`` in the ``gateway-aggregate`` group and keeps the counters."""

    def __init__(
        self,
        queue: RedisQueue,
        clock: Clock,
        sla: SlaSection,
        instance: str,
        *,
        surge: SurgeWatch | None = None,
        batch: int = 200,
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
        """Events read at once: the loop is held for one batch's processing (a few ms)."""
        self.pause_s = 0.25
        """After a batch that was not full, wait this long before reading again (the figures
        lag by as much; a wallboard snapshot is a second old anyway)."""
        self._supervisor: Supervisor | None = None
        self._stopping = False
        self._group_ready = False
        self.processed = 0
        self.claim_idle_ms = 60_000
        """Entries another consumer read and left unacknowledged this long are taken over."""

    def start(self, supervisor: Supervisor) -> None:
        """Run in every instance (the consumer group shares the events out), supervised."""
        self._stopping = False
        self._supervisor = supervisor
        supervisor.spawn("aggregator", self._run, required=False, backoff=(0.5, 10.0))

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            await self._supervisor.stop("aggregator")

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.events, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

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
                n = await self.poll(block_ms=1000)
                backoff.reset()
                if 0 < n < self.batch:  # fewer, larger batches: the cost per poll is shared
                    await asyncio.sleep(self.pause_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._group_ready = False
                log.warning("aggregator: %r, retrying in %.1f s", exc, await backoff.sleep())

    async def claim_stale(self) -> None:
        """Take over entries a dead instance read and never acknowledged (all of them)."""
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
                await self.process([(e, f) for e, f in entries if f])
            if start in (b"0-0", "0-0") or not entries:
                return

    async def poll(self, block_ms: int | None = None) -> int:
        """Read and apply one batch; return how many events it held."""
        reply = await self.redis.xreadgroup(
            GROUP, self.instance, {self.keys.events: ">"}, count=self.batch, block=block_ms
        )
        if not reply:
            return 0
        entries = reply[0][1]
        await self.process(entries)
        return len(entries)

    async def catch_up(self) -> int:
        """Apply everything not yet read (tests, benchmarks); return how many events."""
        if not self._group_ready:
            await self.ensure_group()
        total = 0
        while True:
            n = await self.poll()
            total += n
            if n == 0:
                return total

    async def process(self, entries: list[tuple[Any, dict[bytes, bytes]]]) -> None:
        """Apply a batch of event entries, then acknowledge them.

        An ``enqueued`` event that ``intake.lua`` marked ``counted`` took its step with the
        contact's write: nothing is read for it, only its surge keys (carried in the event)
        are counted, once a contact (the first HDEL of the hash's ``surge`` mark). An
        ``enqueued`` event without the mark (written by an older version) takes the old path:
        the contact is read, decoded and stepped like any other event.
        """
        parsed: list[tuple[str, str, dict[str, Any]]] = []
        tagged: list[Tagged] = []
        counting = self.surge is not None
        for _, fields in entries:
            kind = fields.get(b"type")
            if kind == b"enqueued" and b"counted" in fields:
                raw = fields.get(b"surge")
                if raw is not None and counting:
                    received, *names = orjson.loads(raw)
                    cid = fields[b"contact_id"].decode()
                    tagged.append(Tagged(cid, received, names, int(fields[b"counted"])))
                continue
            if kind in STEPPED:
                cid = _text(fields.get(b"contact_id"))
                parsed.append((cid, _text(kind), orjson.loads(fields[b"event"])))
        extra: list[list[Any]] = []
        contacts: list[Contact] = []
        # in parts of STEP_CHUNK events, each with its two round trips: the loop and Valkey
        # are not held for a whole batch of deadline events in one piece
        for start in range(0, len(parsed), STEP_CHUNK):
            part = parsed[start : start + STEP_CHUNK]
            steps: list[Step] = []
            new: dict[int, Contact] = {}
            """Step index -> the contact of an old-style ``enqueued`` step (surges: once)."""
            facts = await self._facts({cid for cid, _, _ in part}, part)
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
            flags = await apply(self.queue, steps)
            # a redelivered batch counts none of its contacts for surges again
            contacts += [c for i, c in new.items() if flags[i]]
        if tagged:  # the same for counted contacts: the first to take the mark counts them
            # one plain HDEL a contact in one round trip: each is atomic on its own, and a
            # script's call of the same HDEL cost Valkey three times as much
            head = self.keys.contact_head  # Keys.contact, its head made once a batch
            marks = raise_errors(await self.queue.execute(
                [["HDEL", head + t.contact_id, "surge"] for t in tagged]
            ))
            tagged = [t for t, mark in zip(tagged, marks, strict=True) if mark]
        now = self.clock.now_us()
        day_ago = now - DAY_S * MICROS_PER_SECOND
        extra.append(["ZREMRANGEBYSCORE", self.keys.agg_repeats, "-inf", day_ago])
        extra.append(["ZREMRANGEBYSCORE", self.keys.agg_breaches, "-inf", day_ago])
        if entries:  # the surges of this batch are marked counted: a redelivery adds none
            extra.append(["XACK", self.keys.events, GROUP, *[e for e, _ in entries]])
        raise_errors(await self.queue.execute(extra))
        if self.surge is not None and (contacts or tagged):
            tagged += [
                Tagged(c.id, c.received_at, self.surge.keys_of(c), c.repeat.count)
                for c in contacts
            ]
            await self.surge.count_tagged(tagged, {c.id: c for c in contacts})
        self.processed += len(entries)

    async def _facts(
        self, ids: Iterable[str], parsed: list[tuple[str, str, dict[str, Any]]]
    ) -> dict[str, dict[str, Any]]:
        wanted = sorted(ids)
        enqueued = {cid for cid, type_, _ in parsed if type_ == "enqueued"}
        commands: list[list[Any]] = []
        for cid in wanted:
            names = ["received_us", "due_us", "kind", "channel"]
            if cid in enqueued:
                names.append("contact")
            commands.append(["HMGET", self.keys.contact(cid), *names])
        out: dict[str, dict[str, Any]] = {}
        replies = raise_errors(await self.queue.execute(commands))
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

        kind, received, due = fact["kind"], fact["received"], fact["due"]
        label = label_of(fact["channel"], kind)
        at = parse_time(event["at"])
        elapsed_ms = max(0, (at - received) // 1000)
        outcome = None
        bin_ = ""
        if type_ == "enqueued":
            outcome = "open"
        elif type_ == SETTLING.get(kind):
            met = event.get("met")
            outcome = "within" if (met if met is not None else at <= due) else "late"
            if event.get("elapsed_ms") is not None:
                elapsed_ms = int(event["elapsed_ms"])
            bin_ = str(time_bin(elapsed_ms))
        elif type_ == "breached":
            outcome = "breached"
        elif type_ == "abandoned" and kind == "answer":
            short = self.short_abandon_ms > 0 and elapsed_ms < self.short_abandon_ms
            outcome = "short" if short else "abandoned"
        elif type_ == "closed" and at <= due:
            outcome = "closed"
        is_call = kind == "answer"  # a call: an answer deadline (the voice medium's)
        ends_wait = is_call and type_ in ("answered", "abandoned", "closed")
        if outcome is None and not ends_wait:
            return None
        outcome = outcome or "open"
        received_s = received // MICROS_PER_SECOND
        k = self.keys
        return Step(
            keys=[
                k.contact(cid),
                k.agg_bucket("m", received_s - received_s % MINUTE_S),
                k.agg_bucket("h", received_s - received_s % HOUR_S),
                k.agg_open(label),
                k.agg_waiting,
                k.agg_breaches,
            ],
            args=[
                cid,
                label,
                outcome,
                RANKS[outcome],
                due,
                BUCKET_TTL_S,
                bin_,
                elapsed_ms,
                at,
                received,
                "1" if is_call else "0",
                "1" if ends_wait else "0",
                "1" if type_ == "enqueued" else "0",
            ],
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
