"""Voice service levels from Contact and Event records."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.channels.voice.report import voice_report
from gateway.records import Contact, Deadline, Event, Repeat, Sender

T0 = 1_795_594_483_000_000
S = 1_000_000


def call(n: int, *, at: int = T0, callback: bool = False, channel: str = "voice") -> Contact:
    meta: dict[str, Any] = {"callback": True} if callback else {}
    return Contact(
        id=f"c{n}", channel=channel, adapter="asterisk", external_id=f"{n}",  # type: ignore[arg-type]
        sender=Sender("+8613800138000"), recipient="12345", subject=None, text="",
        language="zh", attachments=(), thread=None, received_at=at, origin_at=None,
        enqueued_at=at, deadline=Deadline("answer", at + 15 * S, "voice_answer"),
        repeat=Repeat(0, 0), confidential=False, meta=meta,
    )


def answered(n: int, after_s: float, *, at: int = T0) -> Event:
    elapsed = int(after_s * 1000)
    return Event(f"c{n}", "answered", at + int(after_s * S), "asterisk", at + 15 * S,
                 elapsed, elapsed <= 15_000)


def abandoned(n: int, after_s: float, *, at: int = T0) -> Event:
    return Event(f"c{n}", "abandoned", at + int(after_s * S), "asterisk",
                 elapsed_ms=int(after_s * 1000))


def test_figures() -> None:
    contacts = [call(i) for i in range(1, 11)] + [
        call(50, callback=True),
        call(51, callback=True),
        call(60, channel="sms"),
        call(70, at=T0 - 30 * 3600 * S),  # outside the period
    ]
    events = [
        answered(1, 3), answered(2, 5), answered(3, 10), answered(4, 14.9), answered(5, 16),
        answered(6, 40), answered(7, 7),
        answered(7, 9),  # duplicate: the first counts
        abandoned(8, 2), abandoned(9, 30),
        abandoned(1, 60),  # a late abandon of an answered call does not count
        Event("c50", "responded", T0 + 600 * S, "agent"),
        answered(70, 1, at=T0 - 30 * 3600 * S),
    ]
    r = voice_report(contacts, events, since=T0 - 24 * 3600 * S, until=T0 + 3600 * S)
    assert r.offered == 10
    assert r.answered == 7
    assert r.abandoned == 2
    assert r.unresolved == 1
    assert r.answered_within == 5
    assert r.answered_within_pct == pytest.approx(5 / 7)
    assert r.answered_within_offered_pct == pytest.approx(0.5)
    assert r.connection_rate == pytest.approx(0.7)
    assert r.connection_met is False
    assert r.average_speed_of_answer_s == pytest.approx((3 + 5 + 10 + 14.9 + 16 + 40 + 7) / 7)
    assert r.callbacks == 2 and r.callbacks_returned == 1
    assert r.short_abandoned == 0
    text = "\n".join(r.lines())
    assert "Connection rate  70.0% (target 95%: NOT met)" in text
    assert r.to_dict()["since"].endswith("Z")


def test_short_abandon_exclusion_is_explicit() -> None:
    contacts = [call(i) for i in range(1, 5)]
    events = [answered(1, 3), answered(2, 4), answered(3, 5), abandoned(4, 2.5)]
    kept = voice_report(contacts, events, since=T0, until=T0 + S * 3600)
    assert (kept.offered, kept.abandoned, kept.connection_rate) == (4, 1, 0.75)
    left_out = voice_report(contacts, events, since=T0, until=T0 + S * 3600, short_abandon_s=5)
    assert (left_out.offered, left_out.abandoned, left_out.short_abandoned) == (3, 0, 1)
    assert left_out.connection_rate == 1.0
    assert left_out.connection_met is True
    assert "Short abandons (< 5 s, left out)  1" in "\n".join(left_out.lines())


def test_no_calls() -> None:
    r = voice_report([], [], since=T0, until=T0 + S)
    assert r.offered == 0 and r.connection_rate is None and r.connection_met is None
    assert r.average_speed_of_answer_s is None
    assert "no calls" in "\n".join(r.lines())


def test_settings_drive_the_figures() -> None:
    from gateway.channels.voice.report import voice_report_for
    from gateway.server.config import parse_settings

    settings, _ = parse_settings(
        {"sla": {"voice_answer": "10s", "connection_target": 0.8, "short_abandon": "3s"}}
    )
    contacts = [call(i) for i in range(1, 5)]
    events = [answered(1, 3), answered(2, 12), answered(3, 5), abandoned(4, 2.5)]
    r = voice_report_for(settings, contacts, events, since=T0, until=T0 + 3600 * S)
    assert r.answer_deadline_s == 10
    assert r.answered_within == 3  # the events' own met (their deadline) wins over the setting
    assert (r.offered, r.short_abandoned, r.connection_met) == (3, 1, True)


def test_worst_24_hours_over_a_longer_period() -> None:
    day = 24 * 3600 * S
    # day 1: 10 calls all answered; day 2 (from hour 30): 10 calls, 8 answered
    contacts = [call(i, at=T0 + i * 60 * S) for i in range(10)]
    contacts += [call(100 + i, at=T0 + 30 * 3600 * S + i * 60 * S) for i in range(10)]
    events = [answered(i, 5, at=T0 + i * 60 * S) for i in range(10)]
    events += [answered(100 + i, 5, at=T0 + 30 * 3600 * S + i * 60 * S) for i in range(8)]
    r = voice_report(contacts, events, since=T0, until=T0 + 3 * day)
    assert r.connection_rate == pytest.approx(18 / 20)
    assert r.worst_24h_rate == pytest.approx(0.8)
    assert r.worst_24h_since is not None
    assert T0 + 7 * 3600 * S <= r.worst_24h_since <= T0 + 30 * 3600 * S
    assert "Worst 24 h  80.0% from" in "\n".join(r.lines())
    assert voice_report(contacts, events, since=T0, until=T0 + day).worst_24h_rate is None


def test_report_round_trips_through_its_dict() -> None:
    from gateway.channels.voice.report import VoiceReport
    from gateway.contact.clock import parse_time

    day = 24 * 3600 * S
    contacts = [call(i, at=T0 + i * 3600 * S) for i in range(30)]
    events = [answered(i, 5, at=T0 + i * 3600 * S) for i in range(25)]
    r = voice_report(contacts, events, since=T0, until=T0 + 2 * day)
    d = r.to_dict()
    assert VoiceReport.from_dict(d) == r
    # what gateway.cases.report does with the JSON form: since/until back, the rest as is
    v = dict(d)
    v["since"], v["until"] = parse_time(v["since"]), parse_time(v["until"])
    assert VoiceReport(**v).lines() == r.lines()
