"""A rolling upgrade: instances of the previous version (``intake.lua`` as of c8387e3, kept in
``data/``: it reads the sender's repeat set and counts the sender's rate for every contact)
and of this one (a sender's first contact in the window, the one that finds no
``Keys.sender_first`` string, counts 0 without reading the set and makes no rate counter; a
later one moves the string's expiry on) write into one Redis.
Their contacts share the sender's repeat set and string, the rate counters, the dedupe keys,
the indexes and the dashboard's volumes: each version counts every contact the other wrote,
but for a string that expired while contacts an old instance put in the set are still in the
window (docs/operations.md), and what either wrote reads back the same."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.cases.dashboard.aggregates import read_window
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK
from gateway.queueing.keys import AGG_BUCKET_TTL_S
from gateway.queueing.store import Prepared, RedisQueue
from gateway.records import Inbound, Sender

OLD_SCRIPT = (Path(__file__).parent / "data" / "intake_c8387e3.lua").read_text()
MINUTE = 60 * MICROS_PER_SECOND


def _inbound(external_id: str, received_at: int) -> Inbound:
    return Inbound(
        channel="sms", adapter="test", external_id=external_id,
        sender=Sender("+8613912345678"), recipient="12345", received_at=received_at,
        text="路灯坏了",
    )


async def _old_write(queue: RedisQueue, sha: str, p: Prepared) -> Any:
    """Write ``p`` the way the previous version did: the same call (keys and arguments)."""
    now = SYSTEM_CLOCK.now_us()
    own_keys, args = queue._encode(p, now, "2026-12-01T00:00:00.000000Z", limited=True)
    # its rate counters took three arguments each (not whether the counter is the sender's)
    own = args[:12] + [a for i in range(12, len(args), 4) for a in args[i : i + 3]]
    keys = [*queue._fixed, *own_keys]
    args = [1, queue.dedupe_ttl, queue.repeat_window_s * MICROS_PER_SECOND, queue.retention_s,
            AGG_BUCKET_TTL_S, len(own_keys), len(own), *own]
    (reply,) = await queue.redis.evalsha(sha, len(keys), *keys, *args)
    return reply


async def test_old_and_new_intake_scripts_count_each_others_contacts(start_gateway):
    gw = await start_gateway(
        intake={"repeat_window": "1h"}, limits={"sender_contacts": 10, "sender_window": "1h"}
    )
    queue = gw.queue
    sha = await gw.redis.script_load(OLD_SCRIPT)
    base = SYSTEM_CLOCK.now_us() // MINUTE * MINUTE  # one minute's bucket
    a, b, c, d, e, f = (gw.intake.prepare(_inbound(name, base + n))
                        for n, name in enumerate("abcdef", start=1))
    first = await _old_write(queue, sha, a)  # an old instance
    (second,) = await queue.write_batch([b], limited=True)  # a new one
    third = await _old_write(queue, sha, c)
    (fourth,) = await queue.write_batch([d], limited=True)
    # the repeat count goes on across versions
    assert [first[2], second.repeat_count, third[2], fourth.repeat_count] == [0, 1, 2, 3]
    # An old instance's repeat does not move the string's expiry on: the string can expire
    # (here deleted) while contacts of the set are still in the window, and a new instance's
    # next contact then counts 0 (an old one counts the set: 4); the next counts on.
    await gw.redis.delete(gw.keys.sender_first(queue.pseudonym("+8613912345678")))
    (fifth,) = await queue.write_batch([e], limited=True)
    sixth = await _old_write(queue, sha, f)
    assert [fifth.repeat_count, sixth[2]] == [0, 4]
    # a retry of an old instance's contact through a new one (and back) is a duplicate
    (again,) = await queue.write_batch([a], limited=True)
    assert not again.created and again.contact_id == a.id
    assert (await _old_write(queue, sha, b))[:2] == [0, b.id.encode()]
    # the sender's rate counter (one, unless an hour's window turned meanwhile), counted by
    # both: every contact but e, the new instance's contact that made the string again (it
    # makes no counter: the sender's next contact counts it, when a new instance takes it)
    rates = [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":rate:*")]
    assert sum([int(await gw.redis.get(name)) for name in rates]) == 5
    every = (a, b, c, d, e, f)
    ids = sorted(p.id.encode() for p in every)
    for key in (gw.keys.deadlines, gw.keys.warnings, gw.keys.agg_open("sms")):
        assert sorted(await gw.redis.zrange(key, 0, -1)) == ids
    # a third contact of one sender or later is a repeat, listed by either version
    repeats = await gw.redis.zrange(gw.keys.agg_repeats, 0, -1)
    assert sorted(repeats) == sorted(p.id.encode() for p in (c, d, f))
    counts = await read_window(gw.redis, gw.keys, base, base + MINUTE)
    assert {k: v.volume for k, v in counts.items()} == {"sms": 6}
    # each reads back the same way: the contact and its enqueued event
    for p in every:
        contact = await queue.get(p.id)
        assert contact is not None and contact.id == p.id
        # (the surge evaluation runs on its own clock and may flag the sender's contacts)
        types = [event.type for event in await queue.events(p.id)]
        assert [t for t in types if t != "surge"] == ["enqueued"]
