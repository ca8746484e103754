"""Surge warning (实时舆情预警): the gateway watches its own edge volume and writes a ``surge``
event on ``{p}:events`` (so push subscribers get it too) when contacts rise well above their
usual level.

Counting (by the aggregator of ``gateway/cases/dashboard/aggregates.py``, as it reads each
``enqueued`` event; the keys are computed at intake, ``RedisQueue.surge_keys``, and travel in
the event; ``tally`` sums a batch's, which ``advance.lua`` writes with the aggregator's cursor
move): each contact adds one to a few **keys** in the hash of the minute it arrived in
(``{p}:surge:b:<minute>``, kept ``history_days`` + 1 day):

- ``all``; ``channel:<medium>``; ``recipient:<dialled number or mailbox>``;
- ``topic:<name>`` for each configured topic whose words appear in the subject or text;
- ``place:<lat>,<lon>`` on a grid of ``grid`` degrees (Open311 and app locations) and
  ``place:<district>`` for each configured district named in the text or address;
- ``sensitive:<word>`` for each configured sensitive word.

and keeps the latest contact ids per key and minute as samples.

Evaluating (one instance: the holder of lease ``surge``, every ``interval``): for each key, the
count ``c`` over the last ``window`` minutes against the usual level ``λ``, the larger of

- the same window on each of the past ``history_days`` days (their mean), and
- the ``recent`` minutes before the window (scaled to the window),
- and a floor of ``min_rate`` per minute,

is a surge when ``c >= min_count``, ``c >= ratio * λ`` and the Poisson tail
``P(X >= c | λ) < alpha``. A steady load gives ``c`` near ``λ`` and raises none. A key's surge
is written once per period of two windows (``SET NX`` on ``{p}:surge:e:<key>:<period start>``),
even if two instances evaluate during a lease take-over, and not again within two windows of
the last one. Sensitive words need no rise: any contact with one
raises a surge of its word. A citizen's ``repeat``-th contact within the
repeat window (one phone number across calls and SMS is one citizen) raises one at once,
once per citizen and day. Nothing is evaluated until the counters span ``warmup``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError, ResponseError

from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros, format_time
from gateway.queueing.coordination import Fence, Leases
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisQueue, raise_errors
from gateway.records import Contact, Event, Inbound
from gateway.server.config import SurgeSection
from gateway.server.logs import mask
from gateway.server.supervise import Supervisor

log = logging.getLogger(__name__)

MINUTE_S = 60
SAMPLES = 5
SAMPLES_TTL_S = 2 * 86400
LEASE = "surge"
MARKED_FOR_S = 300
MARKED_MAX = 100_000
"""Citizens' repeat marks an instance remembers (``SurgeWatch.repeats_of``): for
``MARKED_FOR_S``, at most this many (~15 MB)."""


def _shown(key: str) -> str:
    """A surge key as logged: a recipient's number is not."""
    return "recipient" if key.startswith("recipient:") else key


def _day(at: Micros) -> int:
    """The start (s) of the UTC day of ``at``."""
    return at // MICROS_PER_SECOND // 86400 * 86400


def poisson_tail(c: int, lam: float) -> float:
    """``P(X >= c)`` for X ~ Poisson(lam), summed upward from ``c`` in log space."""
    if c <= 0:
        return 1.0
    if lam <= 0:
        return 0.0
    log_term = -lam + c * math.log(lam) - math.lgamma(c + 1)
    total = 0.0
    k = c
    while True:
        term = math.exp(log_term)
        total += term
        k += 1
        log_term += math.log(lam) - math.log(k)
        if term < 1e-17 * max(total, 1e-300) or k > c + 100_000:
            break
    return min(1.0, total)


@dataclass(frozen=True, slots=True)
class Tagged:
    """A new contact as the surge counters see it: its keys, computed where it was whole."""

    contact_id: str
    received_at: Micros
    keys: list[str]
    repeat: int
    """Its repeat count (earlier contacts of its sender in the repeat window)."""


@dataclass(frozen=True, slots=True)
class Tally:
    """A batch of new contacts as the counters take it."""

    counted: dict[tuple[int, str], list[Any]]
    """(minute, key) -> the ids counted under it, in order (the count and the samples)."""
    first: Micros | None
    """The earliest arrival (``{p}:surge:first``, set if not yet)."""
    repeats: list[Any]
    """The contacts that may raise a repeat surge."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One key found surging in one window."""

    key: str
    count: int
    baseline: float
    p_value: float
    window_start_s: int


class SurgeWatch:
    """Counts contacts per key (any instance) and evaluates them (the lease holder)."""

    def __init__(self, queue: RedisQueue, clock: Clock, section: SurgeSection, source: str) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.keys: Keys = queue.keys
        self.clock = clock
        self.section = section
        self.source = source
        self.window_min = max(1, int(section.window // MINUTE_S))
        self.recent_min = max(1, int(section.recent // MINUTE_S))
        self.ttl_s = int((section.history_days + 1) * 86400)
        self._topics = {
            name: [w.lower() for w in words] for name, words in section.topics.items() if words
        }
        every = sorted({w for words in self._topics.values() for w in words})
        self._any_topic = re.compile("|".join(map(re.escape, every))).search if every else None
        """Finds whether any topic's word is in a text at all: one scan where most texts name
        no topic (a search per word, a dozen by default, cost four times as much); a text
        that names one is then looked at topic by topic."""
        self._districts = [d for d in section.districts if d]
        self._sensitive = [w.lower() for w in section.sensitive if w]
        self._history: dict[tuple[int, int], dict[str, float]] = {}
        self._marked: set[str] = set()
        self._marked_since = 0
        self.evaluations = 0
        self._supervisor: Supervisor | None = None
        self._stopping = False

    # ------------------------------------------------------------------ counting

    def keys_of(self, contact: Contact | Inbound) -> list[str]:
        """The surge keys a contact counts under (computed at intake, from the ``Inbound``:
        ``RedisQueue.surge_keys``)."""
        out = ["all", f"channel:{contact.channel}"]
        if contact.recipient:
            out.append(f"recipient:{contact.recipient.lower()}")
        subject = contact.subject
        text = f"{subject} {contact.text}" if subject and contact.text else subject or contact.text
        lowered = text.lower()
        within = lowered.__contains__
        if self._any_topic is not None and self._any_topic(lowered):
            for name, words in self._topics.items():
                if any(map(within, words)):
                    out.append(f"topic:{name}")
        location = contact.meta.get("location") if isinstance(contact.meta, dict) else None
        address = ""
        if isinstance(location, dict):
            lat, lon = location.get("lat"), location.get("lon")
            if isinstance(lat, (int, float)) and isinstance(lon, (int, float)):
                out.append(f"place:{self._cell(float(lat))},{self._cell(float(lon))}")
            address = str(location.get("address") or "")
        for district in self._districts:
            if district in text or district in address:
                out.append(f"place:{district}")
        out.extend(f"sensitive:{word}" for word in filter(within, self._sensitive))
        return out

    def _cell(self, degrees: float) -> str:
        grid = float(self.section.grid)
        digits = max(0, -math.floor(math.log10(grid))) if grid < 1 else 0
        return f"{math.floor(degrees / grid) * grid:.{digits}f}"

    async def count(self, contacts: Iterable[Contact]) -> list[Event]:
        """Count a batch of new contacts; return the repeat surges written for them."""
        batch = list(contacts)
        tagged = [Tagged(c.id, c.received_at, self.keys_of(c), c.repeat.count) for c in batch]
        return await self.count_tagged(tagged, {c.id: c for c in batch})

    def tally(self, rows: Iterable[tuple[Any, Micros, list[str], int]]) -> Tally:
        """What a batch of new contacts adds to the counters, each ``(contact id, received_at,
        keys, repeat count)`` (``count_tagged`` writes it; the aggregator's ``advance.lua``
        writes it with its cursor's move). The ids are kept as given (str or bytes)."""
        counted: dict[tuple[int, str], list[Any]] = {}
        first: Micros | None = None
        repeats: list[Any] = []
        repeat = self.section.repeat
        for cid, received, keys, count in rows:
            minute = received // MICROS_PER_SECOND
            minute -= minute % MINUTE_S
            for key in keys:
                ids = counted.get((minute, key))
                if ids is None:
                    counted[(minute, key)] = [cid]
                else:
                    ids.append(cid)
            if first is None or received < first:
                first = received
            if repeat and count + 1 >= repeat:
                repeats.append(cid)
        return Tally(counted, first, repeats)

    async def count_tagged(
        self, tagged: Iterable[Tagged], known: dict[str, Contact] | None = None
    ) -> list[Event]:
        """Count a batch of new contacts by their keys (computed at intake and carried in the
        ``enqueued`` event); return the repeat surges written for them. A repeat surge needs
        its contact (the sender): taken from ``known``, else read (rare)."""
        tally = self.tally((t.contact_id, t.received_at, t.keys, t.repeat) for t in tagged)
        commands: list[list[Any]] = []
        for (minute, key), ids in tally.counted.items():
            commands.append(["HINCRBY", self.keys.surge_bucket(minute), key, len(ids)])
            name = self.keys.surge_samples(key, minute)
            commands.append(["LPUSH", name, *ids[-SAMPLES:]])
            commands.append(["LTRIM", name, 0, SAMPLES - 1])
            commands.append(["EXPIRE", name, SAMPLES_TTL_S])
        for minute in {m for m, _ in tally.counted}:
            commands.append(["EXPIRE", self.keys.surge_bucket(minute), self.ttl_s])
        if tally.first is not None:
            commands.append(["SET", self.keys.surge_first, tally.first, "NX"])
        if commands:
            raise_errors(await self.queue.execute(commands))
        return await self.repeats_of(tally.repeats, known)

    async def repeats_of(
        self,
        repeats: list[str],
        known: dict[str, Contact] | None = None,
        *,
        senders: Mapping[str, tuple[bytes | str, Micros]] | None = None,
    ) -> list[Event]:
        """Write the repeat surges of these contacts (once per citizen and day), return them;
        each contact taken from ``known``, else read (one round trip for the batch), unless
        ``senders`` names its sender's pseudonym and arrival (a repeat's ``enqueued`` event
        does) and that citizen's mark of the day is remembered: then it raises nothing and
        is not read.

        Each citizen's first contact of the batch is one ``surge.lua`` call, all of them in
        one round trip: the day's mark set (``SET NX``) and, only if set there, the event
        written, atomically, so a call lost on its way loses no other citizen's surge and
        leaves no mark without its event. The marks this instance has set or found are
        remembered a few minutes (``MARKED_FOR_S``, never past the clock's day): a citizen
        who writes again and again, or a flood from one address, then costs no call at all
        (nor, when its event names the sender, a read of the contact). Under a surge of
        repeats (an outage, many citizens on their third contact) the aggregator made a round
        trip or three a contact, one after another, and fell seconds behind the events."""
        if not repeats:
            return []
        now = self.clock.now_us()
        now_s = now // MICROS_PER_SECOND
        if (
            now_s // 86400 != self._marked_since // 86400
            or not 0 <= now_s - self._marked_since < MARKED_FOR_S  # a clock set back too
            or len(self._marked) >= MARKED_MAX
        ):
            # a mark is set with two days' expiry on or after its own day, so one remembered
            # for a contact of this day or the day before is in Redis at least until the
            # clock's day ends, unless Redis lost it (a failover): forgetting every few minutes
            # bounds what that can hide (an older day's mark may expire sooner: remembered, it
            # only hides a second surge of that day)
            self._marked.clear()
            self._marked_since = now_s
        known = dict(known or {})
        unknown = [cid for cid in repeats if cid not in known]
        if senders and self._marked:  # a citizen already raised today: nothing to read
            unknown = [cid for cid in unknown if not self._remembered(senders.get(cid))]
        if unknown:  # one round trip for the batch's
            replies = await self.queue.execute(
                [["HGET", self.keys.contact(cid), "contact"] for cid in unknown]
            )
            for cid, raw in zip(unknown, replies, strict=True):
                if isinstance(raw, bytes):  # else expired meanwhile
                    known[cid] = Contact.from_json(raw)
        if not known:
            return []
        await self.queue.load_pseudonym_key()
        pending: dict[str, Event] = {}  # a mark -> the surge of its citizen's first contact
        for cid in repeats:
            c = known.get(cid)
            if c is None:
                continue
            # no number in a key name: the sender's pseudonym
            mark = self._mark(self.queue.pseudonym(c.sender.address), c.received_at)
            if mark not in self._marked and mark not in pending:
                pending[mark] = self._repeat(c, _day(c.received_at), now)
        if not pending:
            return []
        k = self.keys
        cut = now - 86400 * MICROS_PER_SECOND
        replies = await self.queue.run_scripts("surge", [
            (
                [k.events, k.contact(event.contact_id), mark, k.surges],
                [event.contact_id, event.to_json(), 2 * 86400, now, cut],
            )
            for mark, event in pending.items()
        ])
        written, failed = [], None
        for (mark, event), reply in zip(pending.items(), replies, strict=True):
            if isinstance(reply, Exception):  # not remembered: a later contact tries again
                failed = failed or reply
                continue
            self._marked.add(mark)
            if reply:  # the mark set here: the first of this citizen's day
                written.append(event)
        if failed is not None:  # raised once the others are counted
            raise failed
        return written

    def _mark(self, pseudonym: str, received: Micros) -> str:
        """The key marking a citizen's repeat surge of the day of ``received``."""
        return self.keys.surge_emitted(f"repeat:{pseudonym}", _day(received))

    def _remembered(self, sender: tuple[bytes | str, Micros] | None) -> bool:
        """Whether the day's mark of this (pseudonym, arrival) is remembered as set."""
        if sender is None:
            return False
        pseudonym, received = sender
        if isinstance(pseudonym, bytes):
            pseudonym = pseudonym.decode()
        return self._mark(pseudonym, received) in self._marked

    def _repeat(self, c: Contact, day: int, now: Micros) -> Event:
        """The repeat surge of ``c``, its citizen's contact of ``day`` (s) that raises it."""
        return Event(
            contact_id=c.id,
            type="surge",
            at=now,
            source=self.source,
            detail={
                "kind": "repeat",
                "key": f"repeat:{mask(c.sender.address)}",
                "value": mask(c.sender.address),
                "count": c.repeat.count + 1,
                "baseline": 0.0,
                "p_value": 0.0,
                "window_s": 86400,
                "window_start": format_time(day * MICROS_PER_SECOND),
                "samples": [c.id],
                "channels": [c.channel],
            },
        )

    # ------------------------------------------------------------------ evaluating

    def start(self, leases: Leases, supervisor: Supervisor) -> None:
        """Evaluate while this instance holds lease ``surge`` (supervised)."""
        self._supervisor = supervisor
        self._stopping = False

        async def run() -> None:
            await leases.exclusive(LEASE, self._held)

        supervisor.spawn("surge", run, required=False, backoff=(0.5, 30.0))

    async def stop(self) -> None:
        self._stopping = True  # the loop ends even if a client call swallows the cancellation
        if self._supervisor is not None:
            await self._supervisor.stop("surge")

    async def _held(self, fence: Fence) -> None:
        log.info("surge: evaluating here (lease fence %d)", fence.token)
        while not self._stopping:
            try:
                await self.evaluate()
            except (RedisError, OSError) as exc:
                log.warning("surge: %r", exc)
            await asyncio.sleep(float(self.section.interval))

    async def evaluate(self, now: Micros | None = None) -> list[Event]:
        """Check every key once now; write and return the surges found."""
        now = self.clock.now_us() if now is None else now
        self.evaluations += 1
        now_s = now // MICROS_PER_SECOND
        current = now_s - now_s % MINUTE_S
        start = current - (self.window_min - 1) * MINUTE_S
        first = await self.redis.get(self.keys.surge_first)
        if first is None or now - int(first) < float(self.section.warmup) * MICROS_PER_SECOND:
            return []
        window = await self._sum(range(start, current + 1, MINUTE_S))
        if not window:
            return []
        recent_start = start - self.recent_min * MINUTE_S
        recent = await self._sum(range(recent_start, start, MINUTE_S))
        history = await self._history_rates(start)
        found: list[Finding] = []
        for key, c in window.items():
            if key.startswith("sensitive:"):
                if c >= 1:
                    found.append(Finding(key, c, 0.0, 0.0, start))
                continue
            rate = max(
                history.get(key, 0.0),
                recent.get(key, 0) / self.recent_min,
                float(self.section.min_rate),
            )
            lam = rate * self.window_min
            if c < self.section.min_count or c < float(self.section.ratio) * lam:
                continue
            p = poisson_tail(c, lam)
            if p < float(self.section.alpha):
                found.append(Finding(key, c, lam, p, start))
        written, failed = [], None
        for f in found:
            try:
                event = await self._write(f, now)
            except ResponseError as exc:  # refused for that key alone: not marked, tried again
                log.debug("surge: %s not written: %r", _shown(f.key), exc)
                failed = failed or exc
                continue
            if event is not None:
                written.append(event)
        if failed is not None:  # raised once the others are written
            raise failed
        return written

    async def _sum(self, minutes: Iterable[int]) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for m in minutes:
            pipe.hgetall(self.keys.surge_bucket(m))
        total: dict[str, int] = {}
        for raw in await pipe.execute():
            for k, v in raw.items():
                name = k.decode() if isinstance(k, bytes) else str(k)
                total[name] = total.get(name, 0) + int(v)
        return total

    async def _history_rates(self, start: int) -> dict[str, float]:
        """Mean count per minute of each key in the same window on the past days that have
        any count (cached per window start)."""
        cache_key = (start, self.window_min)
        hit = self._history.get(cache_key)
        if hit is not None:
            return hit
        days = 0
        sums: dict[str, int] = {}
        for d in range(1, int(self.section.history_days) + 1):
            day_start = start - d * 86400
            counts = await self._sum(range(day_start, day_start + self.window_min * MINUTE_S, 60))
            if counts:
                days += 1
                for k, v in counts.items():
                    sums[k] = sums.get(k, 0) + v
        rates = {k: v / days / self.window_min for k, v in sums.items()} if days else {}
        if len(self._history) > 8:
            self._history.clear()
        self._history[cache_key] = rates
        return rates

    async def _write(self, f: Finding, now: Micros) -> Event | None:
        """Write ``f``'s surge once per key and period of two windows (its mark, ``SET NX``:
        across instances), and not within two windows of the last one (a burst going on
        across a period's end: the previous period's mark holds its surge's time). The marks
        and the samples are read first; then one ``surge.lua`` call checks the previous mark
        again, sets this period's and writes the event, its index in the first sample's hash
        (while that contact is retained) and the dashboard's list, so a call lost on its way
        leaves no mark without its event and a later evaluation writes it."""
        period = int(self.window_min * MINUTE_S * 2)
        now_s = now // MICROS_PER_SECOND
        bucket = now_s - now_s % period
        previous, mark = (self.keys.surge_emitted(f.key, b) for b in (bucket - period, bucket))
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(previous)  # both checked again by the script, atomically
        pipe.exists(mark)
        minutes = range(f.window_start_s, f.window_start_s + self.window_min * MINUTE_S, 60)
        for m in reversed(minutes):
            pipe.lrange(self.keys.surge_samples(f.key, m), 0, SAMPLES - 1)
        last, marked, *lists = await pipe.execute()
        if marked or (last is not None and now - int(last) < period * MICROS_PER_SECOND):
            return None
        samples: list[str] = []
        for ids in lists:
            for raw in ids:
                cid = raw.decode() if isinstance(raw, bytes) else str(raw)
                if cid not in samples and len(samples) < SAMPLES:
                    samples.append(cid)
        if not samples:
            return None
        kind, _, value = f.key.partition(":")
        event = Event(
            contact_id=samples[0],
            type="surge",
            at=now,
            source=self.source,
            detail={
                "kind": kind,
                "key": f.key,
                "value": value or kind,
                "count": f.count,
                "baseline": round(f.baseline, 3),
                "p_value": f.p_value,
                "window_s": self.window_min * MINUTE_S,
                "window_start": format_time(f.window_start_s * MICROS_PER_SECOND),
                "samples": samples,
            },
        )
        k = self.keys
        (reply,) = await self.queue.run_scripts("surge", [(
            [k.events, k.contact(event.contact_id), mark, k.surges, previous],
            [
                event.contact_id,
                event.to_json(),
                2 * period,
                now,
                now - 86400 * MICROS_PER_SECOND,
                now,
                period * MICROS_PER_SECOND,
            ],
        )])
        if isinstance(reply, Exception):
            raise reply
        if not reply:  # another instance's surge meanwhile (a lease take-over)
            return None
        log.warning(
            "surge: %s %s contacts in %d min (usual %.1f, p=%.2g)",
            _shown(f.key),
            f.count,
            self.window_min,
            f.baseline,
            f.p_value,
        )
        return event
