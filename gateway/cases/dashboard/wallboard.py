"""What the wall screen shows: "are we meeting the standard right now", from the counters of
``aggregates.py`` (never a scan of the streams), as numbers (JSON) and as HTML in a language.

Every figure is computed once here (``snapshot``) and drawn by ``fragments``; the table rows
have the shape of ``gateway report``'s and are drawn by the same ``table_html``.
"""

from __future__ import annotations

import asyncio
import html
from collections import Counter
from typing import Any

import orjson

from gateway.adapters import load_media
from gateway.cases.dashboard.aggregates import (
    DAY_S,
    HOUR_S,
    WAIT_LIMIT_S,
    Counts,
    read_hours,
    read_window,
)
from gateway.cases.dashboard.charts import answer_chart, response_chart, volume_chart
from gateway.cases.i18n import Locale
from gateway.cases.report import deadlines_s, definitions_html, table_html
from gateway.contact.clock import MICROS_PER_SECOND, Clock, format_time, parse_time
from gateway.queueing.keys import Keys
from gateway.records import Contact
from gateway.server.config import Settings
from gateway.server.logs import mask

CACHE_S = 1.0
"""One snapshot serves every viewer for this long."""
LIST_LIMIT = 50


def _dec(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Wallboard:
    """Snapshots of the service levels, shared by every viewer for ``CACHE_S``."""

    def __init__(
        self, redis: Any, keys: Keys, clock: Clock, settings: Settings, channels: set[str]
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self.settings = settings
        self.sla = settings.sla
        self.configured = channels
        """Channels of the configured adapters: shown even when quiet; others only with
        contacts in the window (``POST /v1/intake`` takes any channel)."""
        self.deadlines = deadlines_s(settings.sla)
        self.media = load_media()
        self.calls = self.media.answer_row()
        """The row whose deadline is an answer (voice): the waiting and connection tiles."""
        self._cache: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def snapshot(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            if self._cache is None or loop.time() - self._cache[0] > CACHE_S:
                self._cache = (loop.time(), await self._snapshot())
            return self._cache[1]

    def _labels(self, *windows: dict[str, Counts]) -> list[str]:
        seen = set(self.configured)
        for counts in windows:
            seen.update(label for label, c in counts.items() if c.volume)
        return sorted(seen, key=self.media.order)

    async def _snapshot(self) -> dict[str, Any]:
        now = self.clock.now_us()
        day_ago = now - DAY_S * MICROS_PER_SECOND
        loc = Locale("en", self.settings.dashboard.timezone)
        midnight = loc.midnight_us(now)
        rolling, today = await asyncio.gather(
            read_window(self.redis, self.keys, day_ago, now),
            read_window(self.redis, self.keys, midnight, now),
        )
        labels = self._labels(rolling, today)
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(k.agg_waiting, "-inf", now - WAIT_LIMIT_S * MICROS_PER_SECOND)
        pipe.zcard(k.agg_waiting)
        pipe.zrange(k.agg_waiting, 0, 0, withscores=True)
        for label in labels:
            soon = now + int(self._warn_span_s(label) * MICROS_PER_SECOND)
            # overdue for two days and never marked (no watcher ran): not open any more
            pipe.zremrangebyscore(k.agg_open(label), "-inf", now - 2 * DAY_S * MICROS_PER_SECOND)
            pipe.zcard(k.agg_open(label))
            pipe.zcount(k.agg_open(label), "-inf", soon)
            pipe.zrange(k.agg_open(label), 0, 4, withscores=True)
        pipe.zrevrangebyscore(
            k.agg_breaches, "+inf", now - HOUR_S * MICROS_PER_SECOND, start=0, num=LIST_LIMIT
        )
        pipe.zcount(k.agg_breaches, now - HOUR_S * MICROS_PER_SECOND, "+inf")
        pipe.zrevrangebyscore(k.agg_repeats, "+inf", day_ago, start=0, num=20, withscores=True)
        pipe.zrevrangebyscore(k.surges, "+inf", now - HOUR_S * MICROS_PER_SECOND, start=0, num=20)
        replies = list(await pipe.execute())
        _, waiting, first_waiting = replies[:3]
        replies = replies[3:]
        open_rows = []
        for label in labels:
            _, total, soon, nearest = replies[:4]
            replies = replies[4:]
            open_rows.append(
                {
                    "channel": label,
                    "open": int(total),
                    "due_soon": int(soon),
                    "warning_s": self._warn_span_s(label),
                    "next": [
                        {
                            "id": _dec(m),
                            "due_at": format_time(int(s)),
                            "left_ms": (int(s) - now) // 1000,
                        }
                        for m, s in nearest
                    ],
                }
            )
        breach_ids, breach_count, repeats, surges = replies
        breaches = await self._contacts([_dec(m) for m in breach_ids])
        repeat_list = await self._contacts([_dec(m) for m, _ in repeats])
        hours = await read_hours(self.redis, self.keys, day_ago, now)
        calls = self.calls or ""
        voice_rolling = rolling.get(calls, Counts())
        voice_today = today.get(calls, Counts())
        return {
            "now": format_time(now),
            "since_24h": format_time(day_ago),
            "today_since": format_time(midnight),
            "timezone": self.settings.dashboard.timezone,
            "channels": labels,
            "rolling": {label: rolling.get(label, Counts()).row(label) for label in labels},
            "today": {label: today.get(label, Counts()).row(label) for label in labels},
            "voice": None
            if calls not in labels
            else {
                "waiting": int(waiting),
                "longest_wait_ms": (now - int(first_waiting[0][1])) // 1000
                if first_waiting
                else None,
                "answer_deadline_s": self.deadlines[calls],
                "connection_target": float(self.sla.connection_target),
                "rolling": _voice(voice_rolling),
                "today": _voice(voice_today),
            },
            "open": open_rows,
            "breaches_last_hour": int(breach_count),
            "breaches": [
                {
                    "id": c.id,
                    "channel": c.channel,
                    "received_at": format_time(c.received_at),
                    "due_at": format_time(c.deadline.due_at),
                }
                for c in breaches
            ],
            "repeats": [
                {
                    "id": c.id,
                    "channel": c.channel,
                    "sender": mask(c.sender.address),
                    "count": c.repeat.count + 1,
                    "received_at": format_time(c.received_at),
                }
                for c in repeat_list
            ],
            "surges": [orjson.loads(s) for s in surges],
            "volume_per_hour": {
                format_time(h * MICROS_PER_SECOND)[:13] + ":00Z": per for h, per in hours.items()
            },
            "times": {
                label: {str(e): n for e, n in sorted(rolling[label].bins.items())}
                for label in labels
                if label in rolling
            },
        }

    def _warn_span_s(self, label: str) -> float:
        """'Due soon': less time left than between the warning and the deadline."""
        return self.deadlines.get(label, 0.0) * (1 - float(self.sla.warning_fraction))

    async def _contacts(self, ids: list[str]) -> list[Contact]:
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for cid in ids:
            pipe.hget(self.keys.contact(cid), "contact")
        return [Contact.from_json(raw) for raw in await pipe.execute() if raw]

    # ------------------------------------------------------------------ drawing

    def fragments(self, snap: dict[str, Any], loc: Locale) -> dict[str, str]:
        """The page's parts as HTML, by element id."""
        now = parse_time(snap["now"])
        window = loc.t(
            "window",
            since=loc.time(parse_time(snap["since_24h"]), seconds=False),
            until=loc.time(now, seconds=False),
            tz=loc.timezone,
        )
        rolling = {"by": "channel", "channels": [snap["rolling"][c] for c in snap["channels"]]}
        today = {"by": "channel", "channels": [snap["today"][c] for c in snap["channels"]]}
        return {
            "window": html.escape(window),
            "tiles": self._tiles(snap, loc),
            "rolling": f"<h2>{html.escape(loc.t('section.rolling'))}</h2>"
            + table_html(rolling, loc).replace('id="figures"', 'id="figures" data-window="24h"', 1),
            "today": f"<h2>{html.escape(loc.t('section.today', date=loc.date(now)))}</h2>"
            + table_html(today, loc).replace('id="figures"', 'id="figures-today"', 1),
            "open": self._open(snap, loc),
            "breaches": self._breaches(snap, loc),
            "repeats": self._repeats(snap, loc),
            "surges": self._surges(snap, loc),
            "charts": self._charts(snap, loc),
            "definitions": definitions_html(loc),
        }

    def _tiles(self, snap: dict[str, Any], loc: Locale) -> str:
        v = snap["voice"]
        if v is None:
            return ""
        deadline = loc.seconds(v["answer_deadline_s"])
        target = v["connection_target"]
        tiles = [
            ("waiting", loc.t("tile.waiting"), str(v["waiting"]), ""),
            ("longest_wait", loc.t("tile.longest_wait"), loc.duration(v["longest_wait_ms"]), ""),
        ]
        today = v["today"]
        tiles.append(
            (
                "answered_within_today",
                loc.t("tile.answered_within_today", deadline=deadline),
                loc.pct(today["within_of_offered"], fraction=True),
                " ".join(
                    (
                        loc.t("tile.of_offered"),
                        loc.t("tile.counts", num=today["within"], den=today["offered"]),
                        "·",
                        loc.t("tile.of_answered"),
                        loc.pct(today["within_of_answered"], fraction=True),
                        f"({loc.t('tile.counts', num=today['within'], den=today['answered'])})",
                    )
                ),
            )
        )
        for key, win in (("connection_24h", v["rolling"]), ("connection_today", today)):
            rate = win["connection_rate"]
            verdict = (
                "" if rate is None else loc.t("tile.met" if rate >= target else "tile.not_met")
            )
            tiles.append(
                (
                    key,
                    loc.t(f"tile.{key}"),
                    loc.pct(rate, fraction=True),
                    f"{loc.t('tile.counts', num=win['answered'], den=win['offered'])} · "
                    f"{loc.t('tile.target', target=loc.pct(target, fraction=True, digits=0))}"
                    f" {verdict}",
                )
            )
        definitions = {
            "waiting": "answered_within",
            "longest_wait": "answered_within",
            "answered_within_today": "answered_within",
            "connection_24h": "connection_rate",
            "connection_today": "connection_rate",
        }
        parts = []
        for cls, label, value, note in tiles:
            state = ""
            if cls.startswith("connection") and note:
                rate = (v["rolling"] if cls == "connection_24h" else today)["connection_rate"]
                state = "" if rate is None else (" ok" if rate >= target else " bad")
            parts.append(
                f'<div class="tile{state}" id="tile-{cls}">'
                f'<div class="label"><a href="#def-{definitions[cls]}" '
                f'title="{html.escape(loc.definition(definitions[cls]))}">{html.escape(label)}</a>'
                "</div>"
                f'<div class="value">{html.escape(value)}</div>'
                f'<div class="note">{html.escape(note)}</div></div>'
            )
        return "".join(parts)

    def _open(self, snap: dict[str, Any], loc: Locale) -> str:
        rows = []
        for o in snap["open"]:
            nxt = o["next"][0] if o["next"] else None
            left = ""
            if nxt is not None:
                ms = nxt["left_ms"]
                left = (
                    loc.t("open.left", left=loc.duration(ms))
                    if ms >= 0
                    else loc.t("open.overdue", late=loc.duration(-ms))
                )
                left = (
                    f'<a href="#" data-contact="{html.escape(nxt["id"])}">{html.escape(left)}</a>'
                )
            rows.append(
                f'<tr data-channel="{html.escape(o["channel"])}">'
                f"<td>{html.escape(loc.channel(o['channel']))}</td>"
                f'<td class="open">{o["open"]}</td><td class="due_soon">{o["due_soon"]}</td>'
                f"<td>{left}</td></tr>"
            )
        soon = loc.t("open.soon")
        head = (
            f"<tr><th>{html.escape(loc.t('col.channel'))}</th><th>{html.escape(loc.t('open.count'))}"
            f"</th><th>{html.escape(soon)}</th><th>{html.escape(loc.t('open.next'))}</th></tr>"
        )
        return (
            f"<h2>{html.escape(loc.t('section.open'))}</h2>"
            f'<table id="open"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
        )

    def _breaches(self, snap: dict[str, Any], loc: Locale) -> str:
        items = [
            _link(
                b["id"],
                f"{loc.channel(b['channel'])} · "
                f"{loc.t('breach.received')} {loc.clock(parse_time(b['received_at']))} · "
                f"{loc.t('breach.at')} {loc.clock(parse_time(b['due_at']))}",
            )
            for b in snap["breaches"]
        ]
        body = "".join(items) or f"<li>{html.escape(loc.t('none'))}</li>"
        return (
            f"<h2>{html.escape(loc.t('section.breaches'))} "
            f'<b id="breach-count">{snap["breaches_last_hour"]}</b></h2>'
            f'<ul id="breach-list">{body}</ul>'
        )

    def _repeats(self, snap: dict[str, Any], loc: Locale) -> str:
        items = [
            _link(
                r["id"],
                f"{r['sender']} · {loc.t('repeat.count')} {r['count']} · "
                f"{loc.channel(r['channel'])} {loc.clock(parse_time(r['received_at']))}",
            )
            for r in snap["repeats"]
        ]
        body = "".join(items) or f"<li>{html.escape(loc.t('none'))}</li>"
        return f'<h2>{html.escape(loc.t("section.repeats"))}</h2><ul id="repeat-list">{body}</ul>'

    def _surges(self, snap: dict[str, Any], loc: Locale) -> str:
        items = []
        for s in snap["surges"]:
            d = s.get("detail", {})
            kind = loc.t(f"surge.kind.{d.get('kind', 'all')}")
            samples = " ".join(
                f'<a href="#" data-contact="{html.escape(c)}">{i + 1}</a>'
                for i, c in enumerate(d.get("samples", []))
            )
            items.append(
                f'<li class="surge" data-surge="{html.escape(str(d.get("key", "")))}">'
                f"<b>{html.escape(kind)}: {html.escape(str(d.get('value', '')))}</b> · "
                f"{html.escape(loc.t('surge.count'))} {d.get('count')} · "
                f"{html.escape(loc.t('surge.baseline'))} {float(d.get('baseline', 0)):.1f} · "
                f"{html.escape(loc.t('surge.since'))} "
                f"{html.escape(loc.clock(parse_time(s['at'])))} · "
                f"{html.escape(loc.t('surge.samples'))} {samples}</li>"
            )
        body = "".join(items) or f"<li>{html.escape(loc.t('none'))}</li>"
        return f'<h2>{html.escape(loc.t("section.surges"))}</h2><ul id="surge-list">{body}</ul>'

    def _charts(self, snap: dict[str, Any], loc: Locale) -> str:
        figures = [volume_chart(snap["volume_per_hour"], loc)]
        times = snap["times"]
        for label in snap["channels"]:
            hist = Counter({int(e) * 1000: n for e, n in times.get(label, {}).items()})
            if label == self.calls:
                figures.append(answer_chart(hist, self.deadlines[label], loc))
            else:
                figures.append(
                    response_chart(label, hist, self.deadlines.get(label, 0.0), loc)
                    + f"<figcaption>{html.escape(loc.t('chart.why'))}</figcaption>"
                )
        return "".join(f"<figure>{f}</figure>" for f in figures)


def _link(contact_id: str, text: str) -> str:
    """A list item that opens the contact behind it (the page fetches ``/v1/contacts/{id}``)."""
    cid = html.escape(contact_id)
    return (
        f'<li data-contact-id="{cid}"><a href="#" data-contact="{cid}">{html.escape(text)}</a></li>'
    )


def _voice(c: Counts) -> dict[str, Any]:
    offered = c.volume - c.get("short")
    answered = c.settled
    within = c.get("within")
    return {
        "offered": offered,
        "answered": answered,
        "within": within,
        "within_of_offered": within / offered if offered else None,
        "within_of_answered": within / answered if answered else None,
        "connection_rate": answered / offered if offered else None,
    }
