"""Service levels per channel, from the contacts and events streams (``gateway report``).

Each contact received in the window is counted once, by what settled its deadline:
- ``within``: its settling event (``answered`` for an answer deadline, ``responded`` for a
  response deadline) came at or before the deadline;
- ``breached``: it was settled late, or a ``breached`` event was written, or the deadline has
  passed with nothing settling it (a watcher that was down does not hide a breach);
- ``abandoned``: the caller hung up before the deadline; ``closed``: closed before the deadline
  without a response; ``open``: nothing yet and not yet due.
``within_pct`` is within / volume (of received), ``within_settled_pct`` within / settled (of
answered or replied: what most call-centre software shows). Times are from the edge stamp to
the settling event; the percentiles are nearest-rank (p90 of 10 values is the 9th smallest).
A contact counts in the row of its deadline's rule, as its medium declares it (voice calls and
callbacks are separate rows). A medium may add its own section (``Medium.report``, a
``MediumReport``: the voice connection rate, average speed of answer, callbacks). The table and
the page are in ``gateway.cases.i18n``'s words.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import html
import io
import math
import sys
import unicodedata
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

import orjson

from gateway.adapters import load_media
from gateway.cases.i18n import Locale, from_environment
from gateway.contact.clock import (
    MICROS_PER_SECOND,
    SYSTEM_CLOCK,
    Micros,
    check_timezone,
    format_time,
    parse_time,
)
from gateway.contact.media import Media
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient, decode_fields
from gateway.records import Contact, Event
from gateway.server.config import Settings, SlaSection, parse_duration

SETTLING = {"answer": "answered", "response": "responded"}
HOUR_US = 3600 * MICROS_PER_SECOND


@dataclass(slots=True)
class ChannelFigures:
    """Figures of one channel (and, with ``--by hour``, one hour) over the window."""

    channel: str
    hour: str | None = None
    volume: int = 0
    settled: int = 0
    """Answered (voice) or responded (other media)."""
    within: int = 0
    """Settled at or before the deadline."""
    breached: int = 0
    abandoned: int = 0
    closed: int = 0
    open: int = 0
    """Not settled and not yet due."""
    connection_rate: float | None = None
    """Voice only: answered / offered calls, in percent."""
    times_ms: list[int] = field(default_factory=list, repr=False)

    @property
    def within_pct(self) -> float | None:
        return None if not self.volume else 100.0 * self.within / self.volume

    @property
    def within_settled_pct(self) -> float | None:
        return None if not self.settled else 100.0 * self.within / self.settled

    def percentile(self, q: float) -> int | None:
        """Nearest-rank percentile of the settling times."""
        if not self.times_ms:
            return None
        ordered = sorted(self.times_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

    @property
    def average_ms(self) -> int | None:
        return None if not self.times_ms else round(sum(self.times_ms) / len(self.times_ms))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_ms")
        if self.hour is None:
            d.pop("hour")
        d.update(
            within_pct=self.within_pct,
            within_settled_pct=self.within_settled_pct,
            average_ms=self.average_ms,
            p50_ms=self.percentile(0.5),
            p90_ms=self.percentile(0.9),
            p99_ms=self.percentile(0.99),
        )
        return d


def hour_of(us: Micros) -> str:
    """The UTC hour a time falls in, ``2026-11-25T08:00Z``."""
    return format_time(us - us % HOUR_US)[:13] + ":00Z"


class MediumReport(Protocol):
    """A medium's own section of the report (``Medium.report``), beside the rows every medium
    has: built from the contacts and events of the window, shown as lines and as HTML."""

    def build(
        self,
        contacts: list[Contact],
        events: list[Event],
        *,
        since: Micros,
        until: Micros,
        sla: SlaSection,
        media: Media,
    ) -> dict[str, Any]: ...

    def row_rate(self, section: dict[str, Any]) -> float | None:
        """A connection rate (percent) for the medium's row, or None."""
        ...

    def lines(self, section: dict[str, Any], loc: Locale) -> list[str]: ...

    def html(self, section: dict[str, Any], loc: Locale) -> str: ...


def sections(media: Media) -> dict[str, MediumReport]:
    """The media that add a section of their own, by name."""
    return {m.name: cast(MediumReport, m.report) for m in media if m.report is not None}


def label_of(channel: str, kind: str) -> str:
    """``Media.label_of``: the row a contact counts in, by channel and deadline kind."""
    return load_media().label_of(channel, kind)


def row_of(contact: Contact) -> str:
    return load_media().row_of(contact.channel, contact.deadline.policy)


def _index(events: Iterable[Event]) -> dict[str, dict[str, Event]]:
    by_contact: dict[str, dict[str, Event]] = {}
    for event in events:
        seen = by_contact.setdefault(event.contact_id, {})
        first = seen.get(event.type)
        if first is None or event.at < first.at:
            seen[event.type] = event
    return by_contact


def compute(
    contacts: Iterable[Contact], events: Iterable[Event], now_us: Micros, by: str = "channel"
) -> dict[str, ChannelFigures]:
    """Figures per channel (``by="hour"``: per hour and channel), keyed by label."""
    by_contact = _index(events)
    figures: dict[str, ChannelFigures] = {}
    for contact in contacts:
        hour = hour_of(contact.received_at) if by == "hour" else None
        row = row_of(contact)
        label = f"{hour} {row}" if hour else row
        fig = figures.setdefault(label, ChannelFigures(row, hour))
        fig.volume += 1
        seen = by_contact.get(contact.id, {})
        due = contact.deadline.due_at
        settle = seen.get(SETTLING[contact.deadline.kind])
        if settle is not None:
            fig.settled += 1
            fig.times_ms.append(max(0, (settle.at - contact.received_at) // 1000))
            if settle.at <= due:
                fig.within += 1
            else:
                fig.breached += 1
        elif "breached" in seen:
            fig.breached += 1
        elif contact.deadline.kind == "answer" and "abandoned" in seen:
            fig.abandoned += 1
        elif "closed" in seen and seen["closed"].at <= due:
            fig.closed += 1
        elif due < now_us:
            fig.breached += 1
        else:
            fig.open += 1
    return figures


def deadlines_s(sla: SlaSection) -> dict[str, float]:
    """Each row's deadline in seconds (voice: the answer deadline), from the media's rules and
    the ``[sla]`` overrides."""
    return load_media().row_deadlines(sla.deadlines)


def build(
    contacts: list[Contact],
    events: list[Event],
    *,
    since_us: Micros,
    until_us: Micros,
    sla: SlaSection,
    by: str = "channel",
) -> dict[str, Any]:
    """The whole report as a JSON-ready mapping: rows, the media's own sections (each under
    its medium's name, with ``<name>_lines``; None and [] without contacts of it) and chart
    series."""
    media = load_media()
    contacts = [c for c in contacts if since_us <= c.received_at < until_us]
    figures = compute(contacts, events, until_us, by)
    own: dict[str, Any] = {}
    en = Locale("en", "UTC")
    for name, section in sections(media).items():
        own[name], own[f"{name}_lines"] = None, []
        if not any(c.channel == name for c in contacts):
            continue
        figs = section.build(
            contacts, events, since=since_us, until=until_us, sla=sla, media=media
        )
        own[name], own[f"{name}_lines"] = figs, section.lines(figs, en)
        rate = section.row_rate(figs)
        if by == "channel" and name in figures and rate is not None:
            figures[name].connection_rate = rate
    by_contact = _index(events)
    volume: dict[str, dict[str, int]] = {}
    start = since_us - since_us % HOUR_US
    for h in range(start, until_us, HOUR_US):
        volume[hour_of(h)] = {}
    answer_ms: list[int] = []
    response_ms: dict[str, list[int]] = {}
    for c in contacts:
        per_hour = volume.setdefault(hour_of(c.received_at), {})
        per_hour[c.channel] = per_hour.get(c.channel, 0) + 1
        kind = c.deadline.kind
        name = row_of(c)
        times = answer_ms if kind == "answer" else response_ms.setdefault(name, [])
        settle = by_contact.get(c.id, {}).get(SETTLING[kind])
        if settle is not None:
            times.append(max(0, (settle.at - c.received_at) // 1000))
    return {
        "since": format_time(since_us),
        "until": format_time(until_us),
        "by": by,
        "channels": [figures[k].as_dict() for k in sorted(figures)],
        **own,
        "series": {
            "volume_per_hour": volume,
            "answer_times_ms": sorted(answer_ms),
            "response_times_ms": {k: sorted(v) for k, v in sorted(response_ms.items())},
            "deadlines_s": deadlines_s(sla),
        },
    }


CHUNK = 5000


async def _entries(client: RedisClient, stream: str, start: str) -> list[dict[bytes, bytes]]:
    """Every entry from ``start`` on, read in chunks so no single reply is huge."""
    out: list[dict[bytes, bytes]] = []
    while True:
        batch = await client.xrange(stream, min=start, count=CHUNK)
        out.extend(fields for _, fields in batch)
        if len(batch) < CHUNK:
            return out
        last = batch[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))


def _decode(
    raw_contacts: list[dict[bytes, bytes]], raw_events: list[dict[bytes, bytes]], since_us: Micros
) -> tuple[list[Contact], list[Event]]:
    contacts = [Contact.from_dict(decode_fields(f)) for f in raw_contacts]
    events = [Event.from_dict(decode_fields(f)) for f in raw_events]
    return [c for c in contacts if c.received_at >= since_us], events


async def load(
    client: RedisClient, keys: Keys, since_us: Micros
) -> tuple[list[Contact], list[Event]]:
    """Read the contacts received since ``since_us`` and the events since then.

    Decoding runs in a worker thread: a day of contacts is a lot of JSON, and the gateway's
    loop (intake, webhooks) must not stall while a dashboard refreshes.
    """
    start = f"{since_us // 1000}-0"
    raw_contacts = await _entries(client, keys.contacts, start)
    raw_events = await _entries(client, keys.events, start)
    return await asyncio.to_thread(_decode, raw_contacts, raw_events, since_us)


COLUMNS = (
    "channel",
    "volume",
    "settled",
    "within",
    "within_pct",
    "within_settled_pct",
    "breached",
    "abandoned",
    "closed",
    "open",
    "connection_rate",
    "average_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
)
PERCENT_COLUMNS = frozenset({"within_pct", "within_settled_pct", "connection_rate"})


def cell(loc: Locale, column: str, v: Any) -> str:
    """One figure as a supervisor reads it: channel names, % signs, human durations."""
    if v is None:
        return loc.t("dash")
    if column == "channel":
        return loc.channel(str(v))
    if column == "hour":
        return loc.time(parse_time(str(v).replace("Z", ":00.000000Z")), seconds=False)
    if column in PERCENT_COLUMNS:
        return loc.pct(float(v))
    if column.endswith("_ms"):
        return loc.duration(float(v))
    return str(v)


def columns_of(report: dict[str, Any]) -> tuple[str, ...]:
    return ("hour", *COLUMNS) if report.get("by") == "hour" else COLUMNS


def title(report: dict[str, Any], loc: Locale, key: str = "report.title") -> str:
    window = loc.t(
        "window",
        since=loc.time(parse_time(report["since"]), seconds=False),
        until=loc.time(parse_time(report["until"]), seconds=False),
        tz=loc.timezone,
    )
    return f"{loc.t(key)} {window}"


def section_lines(report: dict[str, Any], loc: Locale) -> list[str]:
    """The media's own sections as lines (a blank line between two)."""
    out: list[str] = []
    for name, section in sections(load_media()).items():
        figs = report.get(name)
        if figs:
            out.extend([""] if out else [])
            out.extend(section.lines(figs, loc))
    return out


def section_html(report: dict[str, Any], loc: Locale) -> str:
    return "".join(
        section.html(report[name], loc)
        for name, section in sections(load_media()).items()
        if report.get(name)
    )


def render(report: dict[str, Any], fmt: str, loc: Locale | None = None) -> str:
    """Render as a text table, JSON, CSV or a standalone HTML page with charts.

    JSON and CSV keep the machine names (field names, UTC, milliseconds); the table and the
    page are for people: in ``loc``'s language and time zone.
    """
    loc = loc or Locale()
    rows = report["channels"]
    columns = columns_of(report)
    if fmt == "json":
        return orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    if fmt == "html":
        return render_html(report, loc)
    heads = [loc.t(f"col.{c}") for c in columns]
    cells = [[cell(loc, c, r.get(c)) for c in columns] for r in rows]
    widths = [max(_width(h), *(_width(line[i]) for line in cells)) for i, h in enumerate(heads)]
    lines = [title(report, loc)]
    lines.append("  ".join(_pad(h, w) for h, w in zip(heads, widths, strict=True)))
    for line in cells:
        lines.append("  ".join(_pad(v, w) for v, w in zip(line, widths, strict=True)))
    extra = section_lines(report, loc)
    if extra:
        lines.append("")
        lines.extend(extra)
    return "\n".join(lines) + "\n"


def _width(text: str) -> int:
    """Columns a terminal gives ``text``: CJK characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1 for ch in text)


def _pad(text: str, width: int) -> str:
    return " " * (width - _width(text)) + text


def table_html(report: dict[str, Any], loc: Locale | None = None) -> str:
    """The figures as an HTML table (the dashboard shows the same one).

    Each cell carries the machine value in ``data-value`` and the supervisor's text inside.
    """
    loc = loc or Locale()
    columns = columns_of(report)
    head = "".join(_th(loc, c) for c in columns)
    body = []
    for row in report["channels"]:
        cells = "".join(
            f'<td class="{c}" data-value="{html.escape(_raw(row.get(c)))}">'
            f"{html.escape(cell(loc, c, row.get(c)))}</td>"
            for c in columns
        )
        body.append(f'<tr data-channel="{html.escape(row["channel"])}">{cells}</tr>')
    rows = "".join(body)
    return f'<table id="figures"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


COLUMN_DEFINITIONS = {
    "volume": "volume",
    "settled": "within",
    "within": "within",
    "within_pct": "within_pct",
    "within_settled_pct": "within_pct",
    "breached": "breached",
    "abandoned": "abandoned",
    "closed": "abandoned",
    "open": "abandoned",
    "connection_rate": "connection_rate",
    "average_ms": "times",
    "p50_ms": "times",
    "p90_ms": "times",
    "p99_ms": "times",
}


def _th(loc: Locale, column: str) -> str:
    """A column head; its definition is a hover and a click away (``#def-<key>``)."""
    label = html.escape(loc.t(f"col.{column}"))
    key = COLUMN_DEFINITIONS.get(column)
    if key is None:
        return f'<th class="{column}">{label}</th>'
    text = html.escape(loc.definition(key))
    return f'<th class="{column}" title="{text}"><a href="#def-{key}">{label}</a></th>'


def _raw(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def definitions_html(loc: Locale) -> str:
    """Every definition behind the figures, folded (one click away)."""
    items = "".join(
        f'<dt id="def-{k}">{html.escape(k)}</dt><dd>{html.escape(text)}</dd>'
        for k, text in loc.definitions()
    )
    return (
        f'<details id="definitions"><summary>{html.escape(loc.t("definitions"))}</summary>'
        f"<dl>{items}</dl></details>"
    )


def render_html(report: dict[str, Any], loc: Locale | None = None) -> str:
    """A standalone page: figures table, voice figures and inline SVG charts (no CDN)."""
    from gateway.cases.dashboard.charts import STYLE, charts_html

    loc = loc or Locale()
    head = title(report, loc)
    return (
        f'<!doctype html><html lang="{loc.html_lang}"><head><meta charset="utf-8">'
        f"<title>{html.escape(head)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(head)}</h1>{table_html(report, loc)}{section_html(report, loc)}"
        f"{charts_html(report, loc)}{definitions_html(loc)}</body></html>\n"
    )


async def _run(settings: Settings, since_s: float, fmt: str, by: str, loc: Locale) -> str:
    from gateway.queueing.access import open_queue

    now = SYSTEM_CLOCK.now_us()
    since_us = now - int(since_s * MICROS_PER_SECOND)
    async with open_queue(settings) as (client, keys, _):
        contacts, events = await load(client, keys, since_us)
    report = build(contacts, events, since_us=since_us, until_us=now + 1, sla=settings.sla, by=by)
    return render(report, fmt, loc)


def main(settings: Settings, args: argparse.Namespace) -> int:
    """``gateway report``."""
    since = parse_duration(args.since)
    by = getattr(args, "by", "channel")
    section = settings.dashboard
    lang = from_environment(getattr(args, "lang", None) or section.language)
    loc = Locale(lang, getattr(args, "tz", None) or section.timezone)
    try:
        check_timezone(loc.timezone)
    except ValueError as exc:
        sys.stderr.write(f"gateway report: --tz: {exc}\n")
        return 2
    sys.stdout.write(asyncio.run(_run(settings, since, args.format, by, loc)))
    return 0


__all__ = ["ChannelFigures", "MediumReport", "build", "compute", "load", "main", "render"]
