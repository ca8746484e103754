"""Service levels per channel, from the contacts and events streams (``gateway report``)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from gateway.clock import MICROS_PER_SECOND, SYSTEM_CLOCK, Micros
from gateway.config import Settings, parse_duration
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient, decode_fields
from gateway.records import Contact, Event

SETTLING = {"answer": "answered", "response": "responded"}


@dataclass(slots=True)
class ChannelFigures:
    """Figures of one channel over the window."""

    channel: str
    volume: int = 0
    settled: int = 0
    """Answered (voice) or responded (other media)."""
    within: int = 0
    """Settled before the deadline."""
    breached: int = 0
    """Deadline passed unsettled (a ``breached`` event, or settled late, or still open past it)."""
    open: int = 0
    """Not settled and not yet due."""
    times_ms: list[int] = field(default_factory=list, repr=False)

    @property
    def within_pct(self) -> float | None:
        return None if not self.volume else 100.0 * self.within / self.volume

    def percentile(self, q: float) -> int | None:
        if not self.times_ms:
            return None
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def average_ms(self) -> int | None:
        return None if not self.times_ms else sum(self.times_ms) // len(self.times_ms)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_ms")
        d.update(
            within_pct=self.within_pct,
            average_ms=self.average_ms,
            p50_ms=self.percentile(0.5),
            p90_ms=self.percentile(0.9),
            p99_ms=self.percentile(0.99),
        )
        return d


def compute(
    contacts: Iterable[Contact], events: Iterable[Event], now_us: Micros
) -> dict[str, ChannelFigures]:
    """Per-channel figures for ``contacts``, settled by the matching ``events``."""
    by_contact: dict[str, dict[str, Event]] = {}
    for event in events:
        by_contact.setdefault(event.contact_id, {}).setdefault(event.type, event)
    figures: dict[str, ChannelFigures] = {}
    for contact in contacts:
        fig = figures.setdefault(contact.channel, ChannelFigures(contact.channel))
        fig.volume += 1
        seen = by_contact.get(contact.id, {})
        settle = seen.get(SETTLING[contact.deadline.kind])
        if settle is not None:
            fig.settled += 1
            elapsed = (settle.at - contact.received_at) // 1000
            fig.times_ms.append(max(0, elapsed))
            if settle.at <= contact.deadline.due_at:
                fig.within += 1
            else:
                fig.breached += 1
        elif "breached" in seen or contact.deadline.due_at < now_us:
            fig.breached += 1
        else:
            fig.open += 1
    return figures


async def load(
    client: RedisClient, keys: Keys, since_us: Micros
) -> tuple[list[Contact], list[Event]]:
    """Read the contacts received since ``since_us`` and the events since then."""
    start = f"{since_us // 1000}-0"
    contacts = [
        Contact.from_dict(decode_fields(f))
        for _, f in await client.xrange(keys.contacts, min=start)
    ]
    contacts = [c for c in contacts if c.received_at >= since_us]
    events = [
        Event.from_dict(decode_fields(f)) for _, f in await client.xrange(keys.events, min=start)
    ]
    return contacts, events


COLUMNS = (
    "channel",
    "volume",
    "settled",
    "within",
    "within_pct",
    "breached",
    "open",
    "average_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
)


def render(figures: dict[str, ChannelFigures], fmt: str) -> str:
    """Render as a text table, JSON or CSV."""
    rows = [figures[c].as_dict() for c in sorted(figures)]
    if fmt == "json":
        return orjson.dumps({"channels": rows}, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    lines = ["  ".join(f"{c:>10}" for c in COLUMNS)]
    for row in rows:
        cells = []
        for c in COLUMNS:
            v = row[c]
            cells.append(
                f"{v:>10.1f}" if isinstance(v, float) else f"{'-' if v is None else v:>10}"
            )
        lines.append("  ".join(cells))
    return "\n".join(lines) + "\n"


async def _run(settings: Settings, since_s: float, fmt: str) -> str:
    from gateway.cli import open_queue

    now = SYSTEM_CLOCK.now_us()
    async with open_queue(settings) as (client, keys, _):
        contacts, events = await load(client, keys, now - int(since_s * MICROS_PER_SECOND))
    return render(compute(contacts, events, now), fmt)


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``gateway report``."""
    since = parse_duration(args.since)
    sys.stdout.write(asyncio.run(_run(settings, since, args.format)))
    return 0
