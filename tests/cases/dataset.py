"""A hand-computed set of contacts and events, and the figures it must give (see EXPECTED)."""

from __future__ import annotations

from typing import Any

from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.queueing.keys import Keys
from gateway.records import Contact, Deadline, Event, Repeat, Sender

S = MICROS_PER_SECOND
HOUR = 3600 * S
DEADLINES = {"voice": 15, "sms": 180, "email": 86400}


def contact(cid: str, channel: str, received: Micros) -> Contact:
    kind = "answer" if channel == "voice" else "response"
    return Contact(
        id=cid,
        channel=channel,  # type: ignore[arg-type]
        adapter="test",
        external_id=cid,
        sender=Sender("+8613800138000" if channel != "email" else "a@example.org"),
        recipient="12345",
        subject=None,
        text="",
        language=None,
        attachments=(),
        thread=None,
        received_at=received,
        origin_at=None,
        enqueued_at=received,
        deadline=Deadline(kind, received + DEADLINES[channel] * S, f"{channel}_x"),
        repeat=Repeat(0, 0),
        confidential=False,
        meta={},
    )


def settle(c: Contact, type_: str, after_s: float) -> Event:
    at = c.received_at + int(after_s * S)
    return Event(
        c.id,
        type_,  # type: ignore[arg-type]
        at,
        "test",
        due_at=c.deadline.due_at,
        elapsed_ms=(at - c.received_at) // 1000,
        met=at <= c.deadline.due_at,
    )


def plain(c: Contact, type_: str, after_s: float) -> Event:
    return Event(c.id, type_, c.received_at + int(after_s * S), "test")  # type: ignore[arg-type]


def build(now: Micros) -> tuple[list[Contact], list[Event]]:
    """Two hours ago, aligned to the hour: voice at +10 min, email +20 min, sms +70 min."""
    h = now - now % HOUR - 2 * HOUR
    v = [contact(f"v{i}", "voice", h + 600 * S + i * S) for i in range(1, 6)]
    s = [contact(f"s{i}", "sms", h + 4200 * S + i * S) for i in range(1, 5)]
    # not yet due, and inside the current hour even in its first minute
    s.append(contact("s5", "sms", now - max(1, min(60 * S, (now % HOUR) // 2))))
    e = [contact("e1", "email", h + 1200 * S)]
    events = [
        settle(v[0], "answered", 5),
        settle(v[1], "answered", 12),
        settle(v[2], "answered", 20),  # late
        plain(v[3], "abandoned", 8),
        settle(v[4], "answered", 3),
        settle(s[0], "responded", 60),
        settle(s[1], "responded", 200),  # late
        settle(s[2], "breached", 180),  # the watcher's, no response ever
        plain(s[3], "closed", 30),
        settle(e[0], "responded", 1800),
    ]
    events.sort(key=lambda ev: ev.at)
    return v + e + s, events


EXPECTED: dict[str, dict[str, Any]] = {
    "voice": {
        "volume": 5,
        "settled": 4,
        "within": 3,
        "within_pct": 60.0,
        "breached": 1,
        "abandoned": 1,
        "closed": 0,
        "open": 0,
        "connection_rate": 80.0,
        "average_ms": 10000,
        "p50_ms": 5000,
        "p90_ms": 20000,
        "p99_ms": 20000,
    },
    "sms": {
        "volume": 5,
        "settled": 2,
        "within": 1,
        "within_pct": 20.0,
        "breached": 2,
        "abandoned": 0,
        "closed": 1,
        "open": 1,
        "connection_rate": None,
        "average_ms": 130000,
        "p50_ms": 60000,
        "p90_ms": 200000,
        "p99_ms": 200000,
    },
    "email": {
        "volume": 1,
        "settled": 1,
        "within": 1,
        "within_pct": 100.0,
        "breached": 0,
        "abandoned": 0,
        "closed": 0,
        "open": 0,
        "connection_rate": None,
        "average_ms": 1800000,
        "p50_ms": 1800000,
        "p90_ms": 1800000,
        "p99_ms": 1800000,
    },
}
"""Worked by hand: voice answer times 3, 5, 12, 20 s (20 s is late, one call abandoned):
3 within of 5, 4 answered of 5 offered = 80 %, mean 10 s, nearest-rank p50 = 2nd of 4 = 5 s.
SMS: 60 s within, 200 s late, one breached by the watcher, one closed early, one still open."""


async def write(client: Any, keys: Keys, contacts: list[Contact], events: list[Event]) -> None:
    """Put the set on the streams the way Intake and the event writers do (``intake.lua``: the
    stream entry, the contact's hash and its ``enqueued`` event)."""
    for c in contacts:
        await client.xadd(keys.contacts, {"contact": c.to_json(), "id": c.id, "channel": c.channel})
        await client.hset(
            keys.contact(c.id),
            mapping={
                "contact": c.to_json(),
                "received_us": c.received_at,
                "due_us": c.deadline.due_at,
                "kind": c.deadline.kind,
                "channel": c.channel,
            },
        )
        await client.expire(keys.contact(c.id), 86400)
        enqueued = Event(c.id, "enqueued", c.enqueued_at, "test")
        await client.xadd(
            keys.events, {"event": enqueued.to_json(), "contact_id": c.id, "type": "enqueued"}
        )
    for e in events:
        await client.xadd(
            keys.events, {"event": e.to_json(), "contact_id": e.contact_id, "type": e.type}
        )
