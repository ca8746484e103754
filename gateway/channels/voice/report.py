"""Voice service levels from Contact and Event records (GB/T 33358-2016).

- offered: voice calls (not callback contacts) received in the period, minus short abandons;
- answered / abandoned: calls with an ``answered`` / ``abandoned`` event;
- answered within the answer deadline (15 s by default): ``answered`` events with ``met``, as a
  share of answered calls and of offered calls;
- connection rate: answered / offered, against the target (95 % over 24 h);
- average speed of answer: mean of ``elapsed_ms`` (answer time minus edge stamp) of answered calls;
- short abandons: calls abandoned within ``short_abandon_s`` of arrival are left out of offered
  and abandoned when the setting is above zero (default 0: none are left out);
- callbacks: callback contacts made of abandoned calls, and how many were returned (responded).
"""

from __future__ import annotations

import html
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from gateway.adapters import load_media
from gateway.cases.i18n import Locale
from gateway.contact.clock import Micros, format_time, parse_time
from gateway.contact.media import Media
from gateway.records import Contact, Event
from gateway.server.config import Settings, SlaSection


@dataclass(frozen=True, slots=True)
class VoiceReport:
    """Voice figures for one period."""

    since: Micros
    until: Micros
    offered: int
    answered: int
    abandoned: int
    short_abandoned: int
    unresolved: int
    answered_within: int
    answered_within_pct: float | None
    """Share of answered calls answered within the deadline (Asterisk's SL)."""
    answered_within_offered_pct: float | None
    connection_rate: float | None
    connection_target: float
    connection_met: bool | None
    average_speed_of_answer_s: float | None
    answer_deadline_s: float
    short_abandon_s: float
    callbacks: int
    callbacks_returned: int
    worst_24h_rate: float | None = None
    """Lowest connection rate over the 24 h windows of a longer period, one per hour."""
    worst_24h_since: Micros | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["since"] = format_time(self.since)
        d["until"] = format_time(self.until)
        if self.worst_24h_since is not None:
            d["worst_24h_since"] = format_time(self.worst_24h_since)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VoiceReport:
        """Rebuild a report from :meth:`to_dict` (times back to microseconds)."""
        values = dict(d)
        for key in ("since", "until", "worst_24h_since"):
            if isinstance(values.get(key), str):
                values[key] = parse_time(values[key])
        return cls(**values)

    def lines(self, loc: Locale | None = None) -> list[str]:
        """Human-readable lines for ``gateway report``, in ``loc``'s language and zone."""
        loc = loc or Locale("en", "UTC")

        def pct(value: float | None) -> str:
            return loc.pct(value, fraction=True)

        asa = self.average_speed_of_answer_s
        verdict = {None: "voice.no_calls", True: "voice.met", False: "voice.not_met"}
        target = loc.t(
            "voice.target", target=loc.pct(self.connection_target, fraction=True, digits=0)
        )
        deadline = loc.seconds(self.answer_deadline_s)
        within = (
            f"{self.answered_within}"
            f" ({loc.t('voice.of_answered', pct=pct(self.answered_within_pct))},"
            f" {loc.t('voice.of_offered', pct=pct(self.answered_within_offered_pct))})"
        )
        rows = [
            (loc.t("voice.offered"), str(self.offered)),
            (loc.t("voice.answered"), str(self.answered)),
            (loc.t("voice.abandoned"), str(self.abandoned)),
            (loc.t("voice.answered_within", deadline=deadline), within),
            (
                loc.t("voice.connection_rate"),
                f"{pct(self.connection_rate)} ({target}: {loc.t(verdict[self.connection_met])})",
            ),
            (loc.t("voice.asa"), loc.duration(None if asa is None else asa * 1000)),
            (
                loc.t("voice.callbacks"),
                loc.t("voice.of", done=self.callbacks_returned, total=self.callbacks),
            ),
        ]
        if self.worst_24h_rate is not None and self.worst_24h_since is not None:
            since = _when_us(self.worst_24h_since)
            rows.append(
                (
                    loc.t("voice.worst_24h"),
                    loc.t("voice.worst_from", rate=pct(self.worst_24h_rate), since=loc.time(since)),
                )
            )
        if self.short_abandon_s > 0:
            limit = loc.seconds(self.short_abandon_s)
            rows.append((loc.t("voice.short_abandoned", limit=limit), str(self.short_abandoned)))
        if self.unresolved:
            rows.append((loc.t("voice.unresolved"), str(self.unresolved)))
        window = loc.t(
            "window", since=loc.time(self.since), until=loc.time(self.until), tz=loc.timezone
        )
        return [f"{loc.t('voice.heading')}  {window}"] + [f"  {k}  {v}" for k, v in rows]


def voice_report(
    contacts: Iterable[Contact],
    events: Iterable[Event],
    *,
    since: Micros,
    until: Micros,
    answer_deadline_s: float = 15.0,
    connection_target: float = 0.95,
    short_abandon_s: float = 0.0,
) -> VoiceReport:
    """Compute the voice figures for contacts received in ``[since, until)``."""
    calls: dict[str, Contact] = {}
    callbacks: dict[str, Contact] = {}
    for c in contacts:
        if c.channel != "voice" or not since <= c.received_at < until:
            continue
        (callbacks if c.meta.get("callback") else calls)[c.id] = c
    answered: dict[str, Event] = {}
    abandoned: dict[str, Event] = {}
    responded: set[str] = set()
    for e in events:
        if e.contact_id in calls:
            if e.type == "answered":
                first = answered.get(e.contact_id)
                if first is None or e.at < first.at:
                    answered[e.contact_id] = e
            elif e.type == "abandoned":
                abandoned.setdefault(e.contact_id, e)
        elif e.contact_id in callbacks and e.type == "responded":
            responded.add(e.contact_id)
    for cid in answered:
        abandoned.pop(cid, None)  # an answer wins over a late or duplicated abandon
    short_ids: set[str] = set()
    if short_abandon_s > 0:
        limit_us = int(short_abandon_s * 1_000_000)
        for cid, e in list(abandoned.items()):
            if e.at - calls[cid].received_at < limit_us:
                del abandoned[cid]
                short_ids.add(cid)
    short = len(short_ids)
    offered = len(calls) - short
    limit_ms = answer_deadline_s * 1000
    waits = [_elapsed_ms(calls[cid], e) for cid, e in answered.items()]
    within = sum(
        1
        for (cid, e), wait in zip(answered.items(), waits, strict=True)
        if (e.met if e.met is not None else wait <= limit_ms)
    )
    n_answered = len(answered)
    rate = n_answered / offered if offered else None
    worst_rate, worst_since = _worst_day(
        sorted(c.received_at for cid, c in calls.items() if cid not in short_ids),
        sorted(calls[cid].received_at for cid in answered),
        since,
        until,
    )
    return VoiceReport(
        since=since,
        until=until,
        offered=offered,
        answered=n_answered,
        abandoned=len(abandoned),
        short_abandoned=short,
        unresolved=offered - n_answered - len(abandoned),
        answered_within=within,
        answered_within_pct=within / n_answered if n_answered else None,
        answered_within_offered_pct=within / offered if offered else None,
        connection_rate=rate,
        connection_target=connection_target,
        connection_met=None if rate is None else rate >= connection_target,
        average_speed_of_answer_s=(sum(waits) / len(waits) / 1000) if waits else None,
        answer_deadline_s=answer_deadline_s,
        short_abandon_s=short_abandon_s,
        callbacks=len(callbacks),
        callbacks_returned=len(responded),
        worst_24h_rate=worst_rate,
        worst_24h_since=worst_since,
    )


_DAY_US = 86_400 * 1_000_000
_HOUR_US = 3_600 * 1_000_000


def _worst_day(
    offered: list[Micros], answered: list[Micros], since: Micros, until: Micros
) -> tuple[float | None, Micros | None]:
    """The lowest answered/offered over the period's 24 h windows, one starting every hour."""
    if until - since <= _DAY_US:
        return None, None
    worst: tuple[float, Micros] | None = None
    start = since
    while start + _DAY_US <= until:
        end = start + _DAY_US
        n = bisect_left(offered, end) - bisect_left(offered, start)
        if n:
            rate = (bisect_left(answered, end) - bisect_left(answered, start)) / n
            if worst is None or rate < worst[0]:
                worst = (rate, start)
        start += _HOUR_US
    return (None, None) if worst is None else worst


def _when_us(value: object) -> Micros:
    """A time as microseconds, from microseconds or an RFC 3339 string."""
    return parse_time(value) if isinstance(value, str) else int(value)  # type: ignore[call-overload]


def _elapsed_ms(contact: Contact, event: Event) -> float:
    if event.elapsed_ms is not None:
        return float(event.elapsed_ms)
    return max(0, event.at - contact.received_at) / 1000


def voice_report_for(
    settings: Settings,
    contacts: Iterable[Contact],
    events: Iterable[Event],
    *,
    since: Micros,
    until: Micros,
) -> VoiceReport:
    """``voice_report`` with the ``[sla]`` section's deadline, target and short-abandon setting."""
    return _for_sla(settings.sla, load_media(), contacts, events, since=since, until=until)


def _for_sla(
    sla: SlaSection,
    media: Media,
    contacts: Iterable[Contact],
    events: Iterable[Event],
    *,
    since: Micros,
    until: Micros,
) -> VoiceReport:
    return voice_report(
        contacts,
        events,
        since=since,
        until=until,
        answer_deadline_s=media.seconds("voice_answer", sla.deadlines),
        connection_target=float(sla.connection_target),
        short_abandon_s=float(sla.short_abandon),
    )


def voice_html(v: dict[str, Any] | None, loc: Locale) -> str:
    """The voice figures as a list (empty without voice calls in the window)."""
    if not v:
        return ""
    deadline = loc.seconds(v["answer_deadline_s"])
    rate = v.get("connection_rate")
    target = loc.pct(v["connection_target"], fraction=True, digits=0)
    verdict = {None: "voice.no_calls", True: "voice.met", False: "voice.not_met"}[
        v.get("connection_met")
    ]
    items = [
        ("offered", loc.t("voice.offered"), str(v["offered"]), ""),
        ("answered", loc.t("voice.answered"), str(v["answered"]), ""),
        ("abandoned", loc.t("voice.abandoned"), str(v["abandoned"]), ""),
        (
            "answered_within",
            loc.t("voice.answered_within_rate", deadline=deadline),
            loc.pct(v.get("answered_within_offered_pct"), fraction=True),
            loc.t("voice.of_answered", pct=loc.pct(v.get("answered_within_pct"), fraction=True)),
        ),
        (
            "connection_rate",
            loc.t("voice.connection_rate"),
            loc.pct(rate, fraction=True),
            f"{loc.t('voice.target', target=target)}: {loc.t(verdict)}",
        ),
        (
            "asa",
            loc.t("voice.asa"),
            loc.duration(
                None
                if v.get("average_speed_of_answer_s") is None
                else v["average_speed_of_answer_s"] * 1000
            ),
            "",
        ),
    ]
    lis = "".join(
        f'<li>{html.escape(label)} <b class="{cls}">{html.escape(value)}</b>'
        f"{f' <span>{html.escape(note)}</span>' if note else ''}</li>"
        for cls, label, value, note in items
    )
    return f'<h2>{html.escape(loc.t("voice.heading"))}</h2><ul id="voice">{lis}</ul>'


class VoiceSection:
    """The voice medium's own figures in ``gateway report`` and on the dashboard (its
    ``Medium.report``): calls offered, answered within the deadline, connection rate."""

    def build(
        self,
        contacts: list[Contact],
        events: list[Event],
        *,
        since: Micros,
        until: Micros,
        sla: SlaSection,
        media: Media,
    ) -> dict[str, Any]:
        return _for_sla(sla, media, contacts, events, since=since, until=until).to_dict()

    def row_rate(self, section: dict[str, Any]) -> float | None:
        """The connection rate (percent) shown in the voice row."""
        rate = section.get("connection_rate")
        return None if rate is None else 100.0 * rate

    def lines(self, section: dict[str, Any], loc: Locale) -> list[str]:
        return VoiceReport.from_dict(section).lines(loc)

    def html(self, section: dict[str, Any], loc: Locale) -> str:
        return voice_html(section, loc)


SECTION = VoiceSection()
