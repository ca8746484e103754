"""Consumer library: groups, ack, and reclaiming what a dead consumer held."""

from __future__ import annotations

import asyncio

from gateway.queueing import ContactConsumer, EventConsumer, post_reply
from gateway.queueing.consumer import ReplyConsumer
from gateway.records import Reply
from tests.queueing.test_intake import inbound


async def test_two_consumers_share_the_stream_and_a_dead_ones_entries_are_reclaimed(start_gateway):
    gw = await start_gateway()
    for i in range(10):
        await gw.intake.submit(inbound(external_id=f"c{i}"))
    prefix = gw.keys.prefix
    alive = ContactConsumer(gw.redis, "cases", "alive", prefix=prefix)
    dying = ContactConsumer(gw.redis, "cases", "dying", prefix=prefix)
    await alive.ensure_group()
    await dying.ensure_group()  # a second call is harmless
    held = await dying.read(count=4, block_ms=100)
    assert len(held) == 4 and all(d.record is not None for d in held)
    got = await alive.read(count=100, block_ms=100)
    assert len(got) == 6
    await alive.ack(*(d.entry_id for d in got))
    assert await alive.pending_count() == 4
    # "dying" never acks; after the idle bound "alive" takes its entries over
    assert await alive.reclaim(min_idle_ms=60_000) == []
    await asyncio.sleep(0.06)
    reclaimed = await alive.reclaim(min_idle_ms=50)
    assert sorted(d.entry_id for d in reclaimed) == sorted(d.entry_id for d in held)
    assert {d.record.external_id for d in reclaimed} == {d.record.external_id for d in held}
    await alive.ack(*(d.entry_id for d in reclaimed))
    assert await alive.pending_count() == 0
    seen = {d.record.external_id for d in got + reclaimed}
    assert seen == {f"c{i}" for i in range(10)}


async def test_events_consumer_reads_typed_events(start_gateway):
    gw = await start_gateway()
    receipt = await gw.intake.submit(inbound())
    consumer = EventConsumer(gw.redis, "reports", "r1", prefix=gw.keys.prefix)
    await consumer.ensure_group()
    (delivery,) = await consumer.read(block_ms=100)
    assert delivery.record.type == "enqueued"
    assert delivery.record.contact_id == receipt.contact_id


async def test_undecodable_entry_is_delivered_with_its_error(start_gateway):
    gw = await start_gateway()
    await gw.redis.xadd(gw.keys.replies, {"reply": b"{not json"})
    await post_reply(gw.redis, Reply(contact_id="x", text="hi", id="r1"), prefix=gw.keys.prefix)
    consumer = ReplyConsumer(gw.redis, "probe", "p", prefix=gw.keys.prefix)
    await consumer.ensure_group()
    bad, good = await consumer.read(block_ms=100)
    assert bad.record is None and bad.error
    assert good.record == Reply(contact_id="x", text="hi", id="r1")
