"""Intake: dedupe, repeat counting, deadlines, atomic writes, the spool and its replay."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal

import pytest
from redis.exceptions import ResponseError

from gateway.adapters import IntakeUnavailable, RateLimited
from gateway.cases.dashboard.aggregates import read_window
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK
from gateway.queueing.spool import Spool, SpoolError
from gateway.queueing.store import SCRIPT_CONTACTS
from gateway.records import Contact, Event, Inbound, Sender
from gateway.server.lock import DataDirBusy
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.harness import settings_for


def inbound(channel="sms", external_id="m1", sender="+8613800138000", **kw) -> Inbound:
    return Inbound(
        channel=channel,
        adapter=kw.pop("adapter", "test"),
        external_id=external_id,
        sender=Sender(sender),
        recipient="12345",
        received_at=kw.pop("received_at", SYSTEM_CLOCK.now_us()),
        text=kw.pop("text", "hello"),
        **kw,
    )


async def test_concurrent_duplicates_give_exactly_one_stream_entry(start_gateway):
    gw = await start_gateway()
    receipts = await asyncio.gather(
        *(gw.intake.submit(inbound(external_id="same")) for _ in range(200))
    )
    ids = {r.contact_id for r in receipts}
    assert len(ids) == 1
    assert sorted(r.status for r in receipts).count("enqueued") == 1
    assert len(await gw.read_contacts()) == 1
    events = await gw.read_events()
    assert [e.type for e in events] == ["enqueued"]


async def test_a_senders_contacts_are_written_in_the_order_they_came(start_gateway):
    """One sender's contacts A then B, B submitted a turn of the loop after A, which waits
    behind another sender's contact sent at once: B is not written before A's batch (a
    write from B's own step would have been), so B counts A as a repeat."""
    gw = await start_gateway(redis={"write_timeout": "5s"})
    warm = await gw.intake.submit(inbound(external_id="warm", sender="+8613800000001"))
    assert warm.status == "enqueued"
    await asyncio.sleep(0)

    async def later(x: Inbound):
        await asyncio.sleep(0)
        return await gw.intake.submit(x)

    other = inbound(external_id="p", sender="+8613800000002")
    a = inbound(external_id="a")
    b = inbound(external_id="b", received_at=a.received_at + 1)
    _, ra, rb = await asyncio.gather(
        gw.intake.submit(other), gw.intake.submit(a), later(b)
    )
    assert [c.external_id for c in await gw.read_contacts()] == ["warm", "p", "a", "b"]
    assert (ra.repeat.count, rb.repeat.count) == (0, 1)


async def test_same_external_id_on_two_adapters_is_two_contacts(start_gateway):
    gw = await start_gateway()
    a = await gw.intake.submit(inbound(adapter="kannel"))
    b = await gw.intake.submit(inbound(adapter="twilio"))
    assert a.contact_id != b.contact_id
    assert len(await gw.read_contacts()) == 2


async def test_repeat_counts_earlier_contacts_of_the_sender_within_the_window(start_gateway):
    gw = await start_gateway(intake={"repeat_window": "1h"})
    now = SYSTEM_CLOCK.now_us()
    hour = 3600 * MICROS_PER_SECOND
    old = await gw.intake.submit(inbound(external_id="old", received_at=now - 2 * hour))
    r1 = await gw.intake.submit(inbound(external_id="1", received_at=now - 10 * MICROS_PER_SECOND))
    r2 = await gw.intake.submit(inbound(external_id="2", received_at=now))
    other = await gw.intake.submit(
        inbound(external_id="3", sender="+8613900000000", received_at=now)
    )
    assert old.repeat.count == 0
    assert r1.repeat.count == 0  # the first one is outside the one-hour window
    assert r2.repeat.count == 1
    assert r2.repeat.window == 3600
    assert other.repeat.count == 0
    contacts = {c.external_id: c for c in await gw.read_contacts()}
    assert contacts["2"].repeat.count == 1


async def test_the_repeat_set_and_the_rate_counter_expire_and_shed_what_left_the_window(
    start_gateway,
):
    """The sender's set is read by its window alone; members that left the window are taken
    off by the next contact that has a count to make, and every key the sender's contacts
    make expires (the rate counter is made with its expiry by the window's first contact)."""
    gw = await start_gateway(
        intake={"repeat_window": "1h"}, limits={"sender_contacts": 5, "sender_window": "1h"}
    )
    now = SYSTEM_CLOCK.now_us()
    hour = 3600 * MICROS_PER_SECOND
    counts = [
        (await gw.intake.submit(inbound(external_id=name, received_at=at))).repeat.count
        for name, at in (("old", now - 2 * hour), ("1", now - 10 * MICROS_PER_SECOND),
                         ("2", now))
    ]
    assert counts == [0, 0, 1]
    names = [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":*", count=1000)]
    (sender,) = [n for n in names if b":sender:" in n and b":rate:" not in n]
    assert await gw.redis.zcard(sender) == 2  # "old" was taken off by the counted contact
    (rate,) = [n for n in names if b":rate:sender:" in n]
    assert int(await gw.redis.get(rate)) == 3
    (first,) = [n for n in names if b":first:" in n]
    for name in (sender, rate, first):
        assert 0 < await gw.redis.pttl(name) <= 3600 * 1000


async def test_a_senders_first_contact_in_the_window_is_kept_in_a_string_alone(start_gateway):
    """The common case, a sender's first contact in the window, makes one string with its
    expiry (``Keys.sender_first``: its stamp) and reads or makes no sorted set; a later one
    counts it, goes into the set and moves the string's expiry to one window from itself, so
    the string lives as long as any contact of the set is in the window (the first contact
    that finds no string counts 0 without reading the set)."""
    gw = await start_gateway(intake={"repeat_window": "1h"})
    now = SYSTEM_CLOCK.now_us()
    pseudonym = gw.queue.pseudonym("+8613800138000")
    sender, first = gw.keys.sender(pseudonym), gw.keys.sender_first(pseudonym)
    r0 = await gw.intake.submit(inbound(external_id="0", received_at=now - 3))
    assert r0.repeat.count == 0
    assert not await gw.redis.exists(sender)
    assert await gw.redis.get(first) == str(now - 3).encode()
    assert 3590 * 1000 < await gw.redis.pttl(first) <= 3600 * 1000
    await gw.redis.pexpire(first, 60 * 1000)  # as if most of its window had passed
    r1 = await gw.intake.submit(inbound(external_id="1", received_at=now - 2))
    assert r1.repeat.count == 1
    assert await gw.redis.zcard(sender) == 1
    # the string now expires one window after the set's latest contact, as the set does
    assert 3590 * 1000 < await gw.redis.pttl(first) <= 3600 * 1000
    assert await gw.redis.get(first) == str(now - 3).encode()
    r2 = await gw.intake.submit(inbound(external_id="2", received_at=now - 1))
    assert r2.repeat.count == 2
    assert await gw.redis.zcard(sender) == 2
    by_id = {c.external_id: c.repeat.count for c in await gw.read_contacts()}
    assert by_id == {"0": 0, "1": 1, "2": 2}


async def test_a_senders_first_contact_makes_no_rate_counter_and_the_next_counts_it(
    start_gateway,
):
    """The contact that makes the sender's 'first' string had no contact of its sender in the
    repeat window (longer than the rate window), so it is within the limit and makes no rate
    counter; the sender's next contact in the rate window counts it (the string's PTTL says
    the sender's latest contact came in the window): the limit holds as before. Another
    sender's first contact in the window is counted by nobody, until its next."""
    gw = await start_gateway(
        intake={"repeat_window": "2h"}, limits={"sender_contacts": 2, "sender_window": "1h"}
    )
    now = SYSTEM_CLOCK.now_us()

    async def rates() -> list[int]:
        names = [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":rate:sender:*")]
        return [int(await gw.redis.get(name)) for name in names]

    first = await gw.intake.submit(inbound(external_id="1", received_at=now))
    assert first.repeat.count == 0 and await rates() == []
    await gw.intake.submit(inbound(external_id="other", sender="+8613900000000",
                                   received_at=now))
    assert await rates() == []
    second = await gw.intake.submit(inbound(external_id="2", received_at=now + 1))
    assert second.repeat.count == 1
    counts = await rates()
    # the sender's two, unless the hour's window turned between them (then one in the new)
    assert counts in ([2], [1])
    if counts == [2]:
        with pytest.raises(RateLimited):
            await gw.intake.submit(inbound(external_id="3", received_at=now + 2))
    # a duplicate of the first is still a duplicate, not counted
    again = await gw.intake.submit(inbound(external_id="1", received_at=now))
    assert again.status == "duplicate" and again.contact_id == first.contact_id


async def test_one_script_call_per_batch_writes_each_contact_alone(start_gateway):
    """``intake.lua`` takes a batch's contacts in one call (``SCRIPT_CONTACTS`` a call) and
    adds their index entries and volumes at the end: a contact the server refuses fails
    alone, a duplicate in the same batch is a duplicate, and every written contact has its
    deadline, warning and open entries and its volume, in a batch longer than one call."""
    gw = await start_gateway()
    minute = 60 * MICROS_PER_SECOND
    now = SYSTEM_CLOCK.now_us() // minute * minute  # every contact in one minute's bucket
    poisoned = "+8613911112222"
    # the sender's 'first' key holds a hash: its contact's script step fails (WRONGTYPE)
    await gw.redis.hset(gw.keys.sender_first(gw.queue.pseudonym(poisoned)), "x", "y")
    items = [
        inbound(external_id=f"b{i}", sender=f"+86138{i:08d}", received_at=now + i)
        for i in range(SCRIPT_CONTACTS + 6)
    ]
    items[3] = inbound(external_id="poisoned", sender=poisoned, received_at=now)
    items[5] = items[4]  # a peer's retry in the same batch
    batch = [gw.intake.prepare(item) for item in items]
    results = await gw.queue.write_batch(batch)
    assert isinstance(results[3], ResponseError) and "WRONGTYPE" in str(results[3])
    assert not results[5].created and results[5].contact_id == batch[4].id
    written = [r.contact_id for n, r in enumerate(results) if n not in (3, 5)]
    assert all(r.created for n, r in enumerate(results) if n not in (3, 5))
    assert len(written) == len(items) - 2
    for key in (gw.keys.deadlines, gw.keys.warnings, gw.keys.agg_open("sms")):
        assert sorted(m.decode() for m in await gw.redis.zrange(key, 0, -1)) == sorted(written)
    assert {c.id for c in await gw.read_contacts()} == set(written)
    counts = await read_window(gw.redis, gw.keys, now - 60 * MICROS_PER_SECOND,
                               now + 60 * MICROS_PER_SECOND)
    assert {k: c.volume for k, c in counts.items()} == {"sms": len(written)}
    # the hour bucket counted them too, and both buckets expire
    for key in [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":agg:[mh]:*")]:
        assert await gw.redis.hget(key, "sms:volume") == str(len(written)).encode()
        assert await gw.redis.ttl(key) > 0


async def test_a_contact_refused_before_it_is_written_gives_back_its_dedupe_key_and_counters(
    start_gateway,
):
    """A contact whose step fails before its stream entry (here the sender's 'first' key holds
    a hash: WRONGTYPE) leaves nothing that can be read, so it must leave no dedupe claim and
    no rate count either: the peer's retry, once the key is repaired, is written, not answered
    "a duplicate" of a contact that does not exist (nor "too many")."""
    gw = await start_gateway(limits={"sender_contacts": 1})
    poisoned = "+8613911112222"
    key = gw.keys.sender_first(gw.queue.pseudonym(poisoned))
    await gw.redis.hset(key, "x", "y")
    prepared = gw.intake.prepare(inbound(external_id="p1", sender=poisoned))
    [failed] = await gw.queue.write_batch([prepared], limited=True)
    assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)
    await gw.redis.delete(key)
    [retried] = await gw.queue.write_batch([prepared], limited=True)
    assert not isinstance(retried, Exception), retried
    assert retried.created and retried.contact_id == prepared.id
    assert [c.id for c in await gw.read_contacts()] == [prepared.id]


async def test_a_contact_refused_before_its_stream_entry_leaves_no_first_contact_of_its_sender(
    start_gateway,
):
    """The sender's 'first' key made by a contact whose step then fails (here the contacts
    stream is a string: WRONGTYPE) is taken back, so the retry is not counted a repeat of a
    contact that was never written."""
    gw = await start_gateway(intake={"repeat_window": "1h"})
    await gw.redis.set(gw.keys.contacts, "x")
    prepared = gw.intake.prepare(inbound(external_id="p1"))
    [failed] = await gw.queue.write_batch([prepared])
    assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)
    assert not await gw.redis.exists(gw.keys.sender_first(gw.queue.pseudonym("+8613800138000")))
    await gw.redis.delete(gw.keys.contacts)
    [retried] = await gw.queue.write_batch([prepared])
    assert not isinstance(retried, Exception), retried
    assert retried.created and retried.repeat_count == 0


@pytest.mark.parametrize("offset_us", [7, 93, 50])
async def test_contacts_sharing_one_stamp_count_in_the_order_written(start_gateway, offset_us):
    """One polling batch shares one edge stamp. Stamps are exact microseconds: the script once
    formatted them with 14 digits, so equal stamps counted 0, 0, 0 or 0, 1, 2 by chance
    (rounded down or up); they count 0, 1, 2, and the window edge is exact too."""
    gw = await start_gateway(intake={"repeat_window": "1h"})
    stamp = (SYSTEM_CLOCK.now_us() // 100) * 100 + offset_us
    window = 3600 * MICROS_PER_SECOND
    edge = await gw.intake.submit(inbound(external_id="edge", received_at=stamp - window))
    counts = [
        (await gw.intake.submit(inbound(external_id=f"b{i}", received_at=stamp))).repeat.count
        for i in range(3)
    ]
    assert edge.repeat.count == 0
    assert counts == [1, 2, 3]  # exactly on the window's edge still counts
    beyond = await gw.intake.submit(
        inbound(external_id="later", received_at=stamp + 1)
    )
    assert beyond.repeat.count == 3  # one microsecond on, the edge contact fell out


@pytest.mark.parametrize(
    ("channel", "kind", "policy", "seconds"),
    [
        ("voice", "answer", "voice_answer", 15),
        ("sms", "response", "sms_response", 180),
        ("chat", "response", "chat_response", 180),
        ("web", "response", "web_response", 180),
        ("email", "response", "email_response", 86400),
    ],
)
async def test_deadline_follows_gb_t_33358_defaults(start_gateway, channel, kind, policy, seconds):
    gw = await start_gateway()
    item = inbound(channel=channel)
    receipt = await gw.intake.submit(item)
    assert receipt.deadline.kind == kind
    assert receipt.deadline.policy == policy
    assert receipt.deadline.due_at == item.received_at + seconds * MICROS_PER_SECOND
    (contact,) = await gw.read_contacts()
    assert contact.deadline == receipt.deadline
    assert contact.received_at == item.received_at <= contact.enqueued_at
    score = await gw.redis.zscore(gw.keys.deadlines, contact.id)
    assert int(score) == receipt.deadline.due_at


async def test_sla_overrides_from_config(start_gateway):
    gw = await start_gateway(sla={"sms_response": "10m", "voice_answer": "20s"})
    item = inbound(channel="sms")
    receipt = await gw.intake.submit(item)
    assert receipt.deadline.due_at - item.received_at == 600 * MICROS_PER_SECOND
    callback = await gw.intake.submit(
        inbound(channel="voice", external_id="cb", meta={"callback": True})
    )
    assert callback.deadline.policy == "voice_callback"
    assert callback.deadline.kind == "response"


async def test_stamp_records_once_and_settles_the_deadline(start_gateway):
    gw = await start_gateway()
    item = inbound(channel="voice")
    receipt = await gw.intake.submit(item)
    at = item.received_at + 4 * MICROS_PER_SECOND
    first = await gw.queue.stamp(receipt.contact_id, "answered", at, "asterisk")
    second = await gw.queue.stamp(receipt.contact_id, "answered", at + 1, "asterisk")
    assert first is not None and second is None
    assert first.elapsed_ms == 4000 and first.met is True
    assert await gw.redis.zscore(gw.keys.deadlines, receipt.contact_id) is None
    assert await gw.queue.stamp("no-such-contact", "answered", at, "asterisk") is None
    assert [e.type for e in await gw.read_events()] == ["enqueued", "answered"]


async def test_a_stamp_whose_event_is_refused_leaves_nothing_and_its_retry_is_stamped(
    start_gateway,
):
    """``stamp.lua`` appends the event before it writes the stamp: a call whose XADD the
    server refuses (here the events stream is a string: WRONGTYPE) leaves no stamp and its
    deadline in place, so the retry writes the event (before, its stamp was set first and the
    retry was taken for a second stamp: the event was never written)."""
    gw = await start_gateway()
    item = inbound(channel="voice")
    receipt = await gw.intake.submit(item)
    at = item.received_at + 4 * MICROS_PER_SECOND
    await gw.redis.rename(gw.keys.events, "saved-events")
    await gw.redis.set(gw.keys.events, "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await gw.queue.stamp(receipt.contact_id, "answered", at, "asterisk")
    assert await gw.redis.zscore(gw.keys.deadlines, receipt.contact_id) is not None
    await gw.redis.delete(gw.keys.events)
    await gw.redis.rename("saved-events", gw.keys.events)
    stamped = await gw.queue.stamp(receipt.contact_id, "answered", at, "asterisk")
    assert stamped is not None and stamped.type == "answered"
    assert await gw.redis.zscore(gw.keys.deadlines, receipt.contact_id) is None
    assert [e.type for e in await gw.queue.events(receipt.contact_id)] == ["enqueued", "answered"]


async def test_script_is_atomic_when_the_connection_dies_mid_write(start_gateway, redis_client):
    """Connections are killed while batches are in flight; every receipt's contact is there once."""
    gw = await start_gateway()

    async def killer():
        for _ in range(20):
            await asyncio.sleep(0.002)
            await redis_client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")

    items = [inbound(external_id=f"k{i}") for i in range(400)]
    kill = asyncio.create_task(killer())
    receipts = await asyncio.gather(*(gw.intake.submit(i) for i in items))
    await kill
    await eventually(lambda: gw.spool.depth == 0)  # whatever was spooled is replayed
    contacts = await gw.read_contacts()
    by_external = {}
    for c in contacts:
        assert c.external_id not in by_external, "a contact was written twice"
        by_external[c.external_id] = c
    assert set(by_external) == {i.external_id for i in items}
    for item, receipt in zip(items, receipts, strict=True):
        assert by_external[item.external_id].id == receipt.contact_id
    # each contact has its dedupe key, contact hash and deadline: the script never half-ran
    for c in contacts:
        assert await gw.redis.exists(gw.keys.contact(c.id))
        assert await gw.redis.zscore(gw.keys.deadlines, c.id) is not None
    enqueued = [e for e in await gw.read_events() if e.type == "enqueued"]
    assert len(enqueued) == len(items)


async def test_redis_stopped_contacts_spool_and_replay_without_loss(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    before = [inbound(external_id=f"b{i}") for i in range(20)]
    for item in before:
        assert (await gw.intake.submit(item)).status == "enqueued"
    own_redis.stop_sync()
    during = [inbound(external_id=f"d{i}") for i in range(50)]
    receipts = await asyncio.gather(*(gw.intake.submit(i) for i in during))
    assert {r.status for r in receipts} == {"spooled"}
    dup = await gw.intake.submit(inbound(external_id="d0"))
    assert dup.status == "duplicate" and dup.contact_id == receipts[0].contact_id
    assert gw.spool.depth == 50
    own_redis.start_sync()
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
    assert gw.spool.depth == 0
    contacts = await gw.read_contacts()
    assert len(contacts) == 70
    assert len({c.external_id for c in contacts}) == 70
    by_external = {c.external_id: c for c in contacts}
    for item, receipt in zip(during, receipts, strict=True):
        contact = by_external[item.external_id]
        assert contact.id == receipt.contact_id
        assert contact.received_at == item.received_at
        assert contact.enqueued_at > contact.received_at
    after = await gw.intake.submit(inbound(external_id="after"))
    assert after.status == "enqueued"


async def test_a_frozen_redis_spools_every_waiting_batch_by_its_deadline(start_gateway, own_redis):
    """Redis stops answering with its connections open (SIGSTOP): the batch in flight and the
    batches queued behind it each fail at their own deadline (``write_timeout`` from their
    oldest contact), not at the client's socket timeout, and every contact is spooled, then
    written once when Redis answers again."""
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "1s", "max_batch": 4})
    assert (await gw.intake.submit(inbound(external_id="warm"))).status == "enqueued"
    pid = own_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        items = [inbound(external_id=f"f{i}") for i in range(20)]  # five batches, all in flight
        receipts = await asyncio.gather(*(gw.intake.submit(i) for i in items))
        assert {r.status for r in receipts} == {"spooled"}
        assert gw.spool.depth == 20 and not gw.intake.redis_up
    finally:
        os.kill(pid, signal.SIGCONT)
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
    contacts = await gw.read_contacts()
    expected = ["warm", *(i.external_id for i in items)]
    assert sorted(c.external_id for c in contacts) == sorted(expected)
    by_external = {c.external_id: c.id for c in contacts}
    assert all(
        by_external[i.external_id] == r.contact_id for i, r in zip(items, receipts, strict=True)
    )


async def test_spool_survives_a_gateway_restart(tmp_path, own_redis, prefix):
    settings, configs = settings_for(
        tmp_path / "gw", own_redis.url, prefix, redis={"write_timeout": "2s"}
    )
    gw = Gateway(settings, configs)
    await gw.start()
    own_redis.stop_sync()
    receipts = [await gw.intake.submit(inbound(external_id=f"r{i}")) for i in range(10)]
    assert {r.status for r in receipts} == {"spooled"}
    await gw.stop()
    own_redis.start_sync()
    gw2 = Gateway(settings, configs)
    await gw2.start()
    try:
        await eventually(lambda: gw2.spool.depth == 0)
        contacts = await gw2.read_contacts()
        assert sorted(c.id for c in contacts) == sorted(r.contact_id for r in receipts)
    finally:
        await gw2.stop()


async def test_corrupt_spool_record_is_quarantined_and_the_rest_replayed(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    own_redis.stop_sync()
    for i in range(5):
        assert (await gw.intake.submit(inbound(external_id=f"q{i}"))).status == "spooled"
    (segment,) = gw.spool.segments(include_active=True)
    data = segment.read_bytes().split(b"\n")
    data[2] = data[2][:20] + b"X" + data[2][21:]  # flip one byte of the third record
    segment.write_bytes(b"\n".join(data))
    own_redis.start_sync()
    await eventually(lambda: not gw.spool.segments(include_active=True))
    contacts = await gw.read_contacts()
    assert sorted(c.external_id for c in contacts) == ["q0", "q1", "q3", "q4"]
    quarantined = list(gw.spool.quarantine_dir.iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes().count(b"\n") == 1


def test_spool_that_is_a_file_refuses_startup(tmp_path):
    blocker = tmp_path / "spool"
    blocker.write_text("not a folder")
    with pytest.raises(SpoolError):
        Spool(blocker).check_writable()


async def test_neither_redis_nor_spool_raises_intake_unavailable(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "200ms"})
    own_redis.stop_sync()
    gw.spool.dir.rename(gw.spool.dir.with_name("gone"))
    gw.spool.dir.write_text("a file where the spool folder was")
    await gw.spool.rotate()
    with pytest.raises(IntakeUnavailable):
        await gw.intake.submit(inbound(external_id="lost"))


async def test_a_record_redis_refuses_for_good_is_quarantined_not_blocking(
    start_gateway, own_redis
):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    # a key of the wrong type makes the intake script fail for exactly one contact
    await gw.queue.load_pseudonym_key()  # dedupe keys are named by the id's pseudonym
    await gw.redis.hset(gw.keys.dedupe("test", gw.queue.pseudonym("p2")), "not", "a string")
    own_redis.stop_sync()
    for i in range(5):
        assert (await gw.intake.submit(inbound(external_id=f"p{i}"))).status == "spooled"
    own_redis.start_sync()
    await eventually(lambda: not gw.spool.segments(include_active=True) and gw.spool.depth == 0)
    assert sorted(c.external_id for c in await gw.read_contacts()) == ["p0", "p1", "p3", "p4"]
    (refused,) = gw.spool.quarantine_dir.glob("refused-*.log")
    assert refused.read_bytes().count(b"\n") == 1 and b'"p2"' in refused.read_bytes()


async def test_events_and_stamps_wait_in_the_spool_behind_their_contact(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    own_redis.stop_sync()
    item = inbound(channel="voice", external_id="call-1")
    receipt = await gw.intake.submit(item)
    assert receipt.status == "spooled"
    answered_at = item.received_at + 9 * MICROS_PER_SECOND
    provisional = await gw.intake.stamp(receipt.contact_id, "answered", answered_at, "asterisk")
    assert provisional is not None and provisional.elapsed_ms is None
    await gw.intake.emit(Event(receipt.contact_id, "closed", answered_at + 1, "asterisk"))
    own_redis.start_sync()
    await eventually(lambda: gw.spool.depth == 0 and not gw.spool.segments(include_active=True))
    events = [e for e in await gw.read_events() if e.contact_id == receipt.contact_id]
    assert [e.type for e in events] == ["enqueued", "answered", "closed"]
    answered = events[1]
    assert answered.elapsed_ms == 9000 and answered.met is True
    assert await gw.redis.zscore(gw.keys.deadlines, receipt.contact_id) is None
    # a second stamp of the same type after replay is refused: once per contact
    assert (
        await gw.intake.stamp(receipt.contact_id, "answered", answered_at + 5, "asterisk") is None
    )


async def test_a_second_gateway_on_the_same_data_folder_refuses_to_start(
    tmp_path, redis_url, prefix
):
    settings, configs = settings_for(tmp_path / "shared", redis_url, prefix)
    first = Gateway(settings, configs)
    await first.start()
    try:
        with pytest.raises(DataDirBusy, match="in use by another gateway"):
            await Gateway(settings, configs).start()
        assert (await first.intake.submit(inbound())).status == "enqueued"
    finally:
        await first.stop()
    second = Gateway(settings, configs)  # free again once the first one stopped
    await second.start()
    await second.stop()


async def test_a_caller_that_gives_up_does_not_cancel_the_write(start_gateway):
    gw = await start_gateway()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await gw.intake.submit(inbound(external_id="impatient"))
    await eventually(gw.read_contacts)
    assert [c.external_id for c in await gw.read_contacts()] == ["impatient"]


async def test_a_caller_that_gives_up_while_redis_is_away_still_has_its_contact_spooled(
    start_gateway, own_redis
):
    """The write of a caller that gave up goes on without it: when it fails (Redis stopped),
    the contact is spooled, then replayed, as if the caller had waited."""
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "2s"})
    own_redis.stop_sync()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await gw.intake.submit(inbound(external_id="impatient"))
    await eventually(lambda: gw.spool.depth == 1)
    assert gw.spool.depth == 1 and not gw.intake.redis_up
    own_redis.start_sync()
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
    assert [c.external_id for c in await gw.read_contacts()] == ["impatient"]


async def test_one_unencodable_contact_is_refused_alone(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    deep: dict = {}
    for _ in range(300):
        deep = {"x": deep}
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"

    async def post(body):
        async with aiohttp_client_session.post(url, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    results = await asyncio.gather(
        post({"text": "bad", "meta": deep}), *(post({"text": f"good {i}"}) for i in range(5))
    )
    assert results[0][0] == 400 and "nested deeper" in results[0][1]["detail"]
    assert [r[1]["status"] for r in results[1:]] == ["enqueued"] * 5
    assert gw.intake.redis_up


async def test_the_same_event_written_twice_is_appended_once(start_gateway):
    gw = await start_gateway()
    receipt = await gw.intake.submit(inbound())
    event = Event(receipt.contact_id, "delivered", SYSTEM_CLOCK.now_us(), "kannel")
    await gw.intake.emit(event)
    await gw.intake.emit(event)  # e.g. a write that timed out after landing, then replayed
    await gw.intake.emit(dataclasses.replace(event, at=event.at + 1))  # a second delivery
    types = [e.type for e in await gw.read_events()]
    assert types == ["enqueued", "delivered", "delivered"]
    assert len(await gw.queue.events(receipt.contact_id)) == 3


async def test_an_event_whose_append_is_refused_leaves_no_digest_and_its_retry_is_written(
    start_gateway,
):
    """``emit.lua`` appends the event before it writes the event's digest: a call whose XADD
    the server refuses (here the events stream is a string: WRONGTYPE) leaves no digest, so
    the retry is written (before, the digest was set first and the retry was taken for the
    same event written twice: the event was never written)."""
    gw = await start_gateway()
    receipt = await gw.intake.submit(inbound())
    event = Event(receipt.contact_id, "delivered", SYSTEM_CLOCK.now_us(), "kannel")
    await gw.redis.rename(gw.keys.events, "saved-events")
    await gw.redis.set(gw.keys.events, "x")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await gw.queue.emit(event)
    await gw.redis.delete(gw.keys.events)
    await gw.redis.rename("saved-events", gw.keys.events)
    await gw.queue.emit(event)
    assert [e.type for e in await gw.queue.events(receipt.contact_id)] == ["enqueued", "delivered"]


async def test_the_stream_entries_are_the_records_own_encodings(start_gateway):
    """The intake write builds the contact's and its ``enqueued`` event's JSON without making
    the records: byte for byte what ``Contact`` and ``Event`` encode."""
    gw = await start_gateway()
    items = [
        inbound(external_id=f"e{i}", text="路灯坏了 \"quoted\"", subject="主题",
                meta={"a": [1, "二"]}, origin_at=SYSTEM_CLOCK.now_us() - 5_000_000)
        for i in range(3)
    ]
    receipts = await asyncio.gather(*(gw.intake.submit(i) for i in items))
    assert {r.status for r in receipts} == {"enqueued"}
    events = [  # the dashboard may add a repeat surge's event: the three senders are one
        f[b"event"] for _, f in await gw.redis.xrange(gw.keys.events)
        if Event.from_json(f[b"event"]).type == "enqueued"
    ]
    contacts = [f[b"contact"] for _, f in await gw.redis.xrange(gw.keys.contacts)]
    assert len(events) == len(contacts) == 3
    for raw in events:
        assert raw == Event.from_json(raw).to_json()
    for raw in contacts:
        assert raw == Contact.from_json(raw).to_json()
