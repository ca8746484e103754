"""The dashboard's first step taken by ``intake.lua`` with the contact's write: every path that
writes a new contact (Intake, the spool's replay) counts it exactly once, the aggregator skips
its ``enqueued`` event without reading the contact, surge keys travel in the event and count
once however often the entry is read, and events of an older version still count (a rolling
upgrade)."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.cases.dashboard.aggregates import read_window
from gateway.cases.report import build
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.records import Contact, Event, Inbound, Sender
from gateway.server.config import SlaSection
from gateway.testing import eventually
from tests.cases import dataset
from tests.cases.conftest import API
from tests.cases.test_dashboard import _aggregated
from tests.cases.test_wallboard import live

S = dataset.S
QUIET = {"enabled": False}
"""No deadline watcher: it would breach the dataset's overdue contacts behind the test."""


def inbound(c: Contact, sender: str, text: str = "") -> Inbound:
    return Inbound(
        channel=c.channel,
        adapter="test",
        external_id=c.id,
        sender=Sender(sender),
        recipient=c.recipient,
        received_at=c.received_at,
        text=text,
    )


async def through_intake(gw: Any, now: int) -> tuple[list[Contact], list[Event]]:
    """The hand-computed set's contacts through Intake (each from its own sender), its events
    on the ids Intake gave them, written as the event writers do."""
    contacts, events = dataset.build(now)
    ids = {}
    for n, c in enumerate(contacts):
        receipt = await gw.intake.submit(inbound(c, f"+86139000000{n:02d}", "家里停水了"))
        assert receipt.status == "enqueued"
        ids[c.id] = receipt.contact_id
    moved = [dataclasses.replace(e, contact_id=ids[e.contact_id]) for e in events]
    for e in moved:
        await gw.redis.xadd(
            gw.keys.events, {"event": e.to_json(), "contact_id": e.contact_id, "type": e.type}
        )
    return await gw.read_contacts(), moved


async def surge_total(gw: Any, key: str = "all") -> int:
    total = 0
    async for name in gw.redis.scan_iter(match=f"{{{gw.keys.prefix}}}:surge:b:*"):
        total += int(await gw.redis.hget(name, key) or 0)
    return total


async def reads(gw: Any) -> int:
    """HGET and HMGET calls the server has run so far (what reading a contact back costs)."""
    stats = await gw.redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("hget", "hmget"))


async def test_intake_counted_contacts_agree_with_the_report_and_count_once(
    start_gateway: Any,
) -> None:
    gw = await start_gateway(
        api=API, sla={"voice_answer": "15s", "sms_response": "3m"}, watcher=QUIET
    )
    now = SYSTEM_CLOCK.now_us()
    contacts, events = await through_intake(gw, now)
    await eventually(lambda: _aggregated(gw, len(contacts) + len(events)))
    first = await live(gw)
    sla = SlaSection(deadlines={"voice_answer": 15, "sms_response": 180, "email_response": 86400})
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now + 1, sla=sla)
    for row in report["channels"]:
        assert first["figures"]["rolling"][row["channel"]] == row, row["channel"]
    assert first["figures"]["voice"]["waiting"] == 0  # every call answered or abandoned
    assert await surge_total(gw) == len(contacts)
    assert await surge_total(gw, "topic:停水") == len(contacts)  # keys of the text, at intake

    # the enqueued events read again: nothing read back, nothing counted twice
    entries = await gw.redis.xrange(gw.keys.events)
    enqueued = [(e, f) for e, f in entries if f[b"type"] == b"enqueued"]
    assert len(enqueued) == len(contacts) and all(b"counted" in f for _, f in enqueued)
    before = await reads(gw)
    await gw.cases.aggregator.process(enqueued)
    assert await reads(gw) == before  # no HMGET, no HGET of a contact
    # ... and every entry again (a consumer died before its XACK)
    await gw.cases.aggregator.process(entries)
    gw.cases.wallboard._cache = None
    assert (await live(gw))["figures"]["rolling"] == first["figures"]["rolling"]
    assert await surge_total(gw) == len(contacts)


async def test_spooled_and_replayed_contacts_count_once_with_their_repeats(
    start_gateway: Any, own_redis: Any
) -> None:
    gw = await start_gateway(
        api=API, watcher=QUIET, url=own_redis.url, redis={"write_timeout": "300ms"}
    )
    now = SYSTEM_CLOCK.now_us()
    same = "+8613912345678"
    own_redis.stop_sync()  # new contacts go to the spool
    spooled = [
        await gw.intake.submit(inbound(dataset.contact(f"s{i}", "sms", now + i), same))
        for i in range(3)
    ]
    assert {r.status for r in spooled} == {"spooled"}
    own_redis.start_sync()
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)  # replayed
    # a replay whose first write landed (its answer lost): the dedupe key makes it a no-op
    prepared = gw.intake.prepare(inbound(dataset.contact("v", "voice", now + 5), same))
    (written,) = await gw.queue.write_batch([prepared])
    (again,) = await gw.queue.write_batch([prepared])
    assert written.created and not again.created and again.contact_id == prepared.id
    total = len(spooled) + 1
    await eventually(lambda: _aggregated(gw, total + 1))  # and the repeat surge's event
    counts = await read_window(gw.redis, gw.keys, now - 60 * S, now + 60 * S)
    assert {k: c.volume for k, c in counts.items()} == {"sms": 3, "voice": 1}
    assert await gw.redis.zcard(gw.keys.agg_open("sms")) == 3
    assert await gw.redis.zrange(gw.keys.agg_waiting, 0, -1) == [prepared.id.encode()]
    # the third and fourth contact of one citizen are repeats; the third raised a surge
    repeats = await gw.redis.zrange(gw.keys.agg_repeats, 0, -1)
    assert repeats == [spooled[2].contact_id.encode(), prepared.id.encode()]
    assert await surge_total(gw) == total
    surges = [f for _, f in await gw.redis.xrange(gw.keys.events) if f[b"type"] == b"surge"]
    assert len(surges) == 1
    for cid in [r.contact_id for r in spooled] + [prepared.id]:
        fields = await gw.redis.hmget(gw.keys.contact(cid), ["agg", "surge"])
        assert fields == [b"open:0", None]  # counted, its surge mark taken


async def test_old_style_events_still_count_beside_counted_ones(start_gateway: Any) -> None:
    """A rolling upgrade: an instance of the older version wrote its contact and an
    ``enqueued`` event without the ``counted`` field; one batch holds both kinds."""
    gw = await start_gateway(api=API, watcher=QUIET)
    await gw.cases.aggregator.stop()  # the batch is processed here, twice
    await gw.cases.aggregator.ensure_group()
    now = SYSTEM_CLOCK.now_us()
    old = dataset.contact("old", "email", now)
    await dataset.write(gw.redis, gw.keys, [old], [])
    new = await gw.intake.submit(inbound(dataset.contact("new", "sms", now), "+8613911112222"))
    entries = await gw.redis.xrange(gw.keys.events)
    assert [b"counted" in f for _, f in entries] == [False, True]
    for _ in range(2):
        await gw.cases.aggregator.process(entries)
    counts = await read_window(gw.redis, gw.keys, now - 60 * S, now + 60 * S)
    assert {k: c.volume for k, c in counts.items()} == {"email": 1, "sms": 1}
    for cid in (old.id, new.contact_id):
        assert await gw.redis.hget(gw.keys.contact(cid), "agg") == b"open:0"
    assert await surge_total(gw) == 2


async def test_a_repeat_names_its_sender_and_a_citizen_already_raised_costs_no_read(
    start_gateway: Any,
) -> None:
    """A repeat's ``enqueued`` event (the sender's third contact in the window or later)
    carries its sender's pseudonym (field ``sender``, after ``keys``); once the citizen's
    surge of the day is written and remembered, the aggregator
    counts the citizen's later contacts without reading them (it read each one, a 2 KB
    JSON decoded, to find the sender), on the reader's own path (``poll``: the entries as
    read) and on the one for entries as redis-py gives them."""
    gw = await start_gateway(api=API, watcher=QUIET)
    agg = gw.cases.aggregator
    await agg.stop()  # the batches are read here
    await agg.ensure_group()
    now = SYSTEM_CLOCK.now_us()
    same = "+8613912345678"

    async def submit(n: int, at: int) -> list[str]:
        ids = []
        for i in range(n):
            c = dataset.contact(f"r{at}-{i}", "sms", now + at + i)
            receipt = await gw.intake.submit(inbound(c, same, "路灯坏了"))
            assert receipt.status == "enqueued"
            ids.append(receipt.contact_id)
        return ids

    first = await submit(3, 0)
    entries = await gw.redis.xrange(gw.keys.events)
    fields = [list(f) for _, f in entries]
    for row in fields[:2]:  # the first and second contact: no repeat yet
        assert row == [b"event", b"contact_id", b"type", b"counted", b"keys"]
    assert fields[2] == [b"event", b"contact_id", b"type", b"counted", b"keys", b"sender"]
    pseudonym = gw.queue.pseudonym(same).encode()
    assert [f.get(b"sender") for _, f in entries] == [None, None, pseudonym]
    assert [f[b"counted"] for _, f in entries] == [b"0", b"1", b"2"]
    assert await agg.poll() == 3  # the third contact raises the citizen's repeat surge
    surges = [f for _, f in await gw.redis.xrange(gw.keys.events) if f[b"type"] == b"surge"]
    assert [f[b"contact_id"] for f in surges] == [first[2].encode()]
    assert await agg.poll() == 1  # the surge's own event

    more = await submit(3, 100)  # as read by the reader itself (a flat list of fields)
    before = await reads(gw)
    assert await agg.poll() == 3
    assert await reads(gw) == before  # no HGET of a contact
    later = await submit(3, 200)  # as redis-py gives them (a dict of fields)
    past = await gw.redis.xrange(gw.keys.events, min=f"({agg._cursor.decode()}")
    assert [f[b"contact_id"] for _, f in past] == [c.encode() for c in later]
    await agg.process(past)
    assert await reads(gw) == before
    assert await surge_total(gw) == len(first) + len(more) + len(later)
    assert await gw.redis.zcard(gw.keys.agg_repeats) == 7  # every contact from the third on
    surges = [f for _, f in await gw.redis.xrange(gw.keys.events) if f[b"type"] == b"surge"]
    assert len(surges) == 1

    # an instance that remembers nothing (here: this one with its memo cleared) reads the
    # contact: the mark in Redis decides
    gw.cases.surge._marked.clear()
    await submit(1, 300)
    before = await reads(gw)
    assert await agg.poll() == 1
    assert await reads(gw) == before + 1
    assert len([f for _, f in await gw.redis.xrange(gw.keys.events)
                if f[b"type"] == b"surge"]) == 1


async def test_a_remembered_citizen_beside_another_and_on_the_next_day_loses_no_surge(
    start_gateway: Any,
) -> None:
    """What the sender saves is only a read: a remembered citizen's repeats beside another
    citizen's first repeat of the day in one batch (the other's contact read, its surge
    raised), and the remembered citizen's contact of the next day (its mark of that day not
    remembered: read and raised)."""
    gw = await start_gateway(api=API, watcher=QUIET)
    agg = gw.cases.aggregator
    await agg.stop()
    await agg.ensure_group()
    now = SYSTEM_CLOCK.now_us()
    a, b = "+8613912340001", "+8613912340002"

    async def submit(name: str, sender: str, at: int) -> None:
        c = dataset.contact(name, "sms", at)
        assert (await gw.intake.submit(inbound(c, sender, "路灯坏了"))).status == "enqueued"

    async def surges() -> list[bytes]:
        entries = await gw.redis.xrange(gw.keys.events)
        return [f[b"contact_id"] for _, f in entries if f[b"type"] == b"surge"]

    for i in range(3):
        await submit(f"a{i}", a, now + i)
    while await agg.poll():
        pass
    assert len(await surges()) == 1
    for i in range(3):
        await submit(f"b{i}", b, now + 10 + i)
        await submit(f"a{i + 3}", a, now + 20 + i)
    before = await reads(gw)
    assert await agg.poll() == 6
    assert await reads(gw) == before + 1  # b's third contact only
    assert len(await surges()) == 2
    await submit("a-next", a, now + 86400 * S + 5)
    before = await reads(gw)
    while await agg.poll():
        pass
    assert await reads(gw) == before + 1
    assert len(await surges()) == 3
