"""The wallboard's counters over a real Redis: kept by the aggregator from the events stream,
once per contact however often an entry is read, in the order the report decides outcomes;
calls waiting; only configured channels (or channels with contacts) shown."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp

from gateway.cases.dashboard.aggregates import (
    RANKS,
    Step,
    apply,
    read_window,
    time_bin,
    window_buckets,
)
from gateway.cases.report import build
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.queueing.keys import AGG_BUCKET_TTL_S, Keys
from gateway.server.config import SlaSection
from gateway.testing import eventually
from tests.cases import dataset
from tests.cases.conftest import API, TOKENS
from tests.cases.test_dashboard import _aggregated

S = dataset.S


async def live(gw: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"http://127.0.0.1:{gw.http_port}/dashboard/live?lang=en",
            headers={"Authorization": f"Bearer {TOKENS['reader']}"},
        ) as r:
            assert r.status == 200
            body: dict[str, Any] = await r.json()
            return body


async def test_counters_agree_with_the_report_and_survive_redelivery(start_gateway: Any) -> None:
    gw = await start_gateway(api=API, sla={"voice_answer": "15s", "sms_response": "3m"})
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    await dataset.write(gw.redis, gw.keys, contacts, events)
    await eventually(lambda: _aggregated(gw, len(contacts) + len(events)))  # enqueued + events
    first = await live(gw)
    sla = SlaSection(deadlines={"voice_answer": 15, "sms_response": 180, "email_response": 86400})
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now + 1, sla=sla)
    for row in report["channels"]:
        assert first["figures"]["rolling"][row["channel"]] == row, row["channel"]
    # every entry read again (a consumer died before its XACK): nothing counts twice
    entries = await gw.redis.xrange(gw.keys.events)
    await gw.cases.aggregator.process(entries)
    gw.cases.wallboard._cache = None
    again = await live(gw)
    assert again["figures"]["rolling"] == first["figures"]["rolling"]
    # nor for surges: each contact once under 'all'
    total = 0
    async for key in gw.redis.scan_iter(match=f"{{{gw.keys.prefix}}}:surge:b:*"):
        total += int(await gw.redis.hget(key, "all") or 0)
    assert total == len(contacts)


async def test_outcomes_move_only_forward(start_gateway: Any) -> None:
    gw = await start_gateway(api=API)
    now = SYSTEM_CLOCK.now_us()
    sms = dataset.contact("late", "sms", now - 400 * S)
    call = dataset.contact("call", "voice", now - 60 * S)
    events = [
        dataset.settle(sms, "breached", 180),  # the watcher's breach, then a late reply
        dataset.settle(sms, "responded", 300),
        dataset.plain(call, "abandoned", 20),  # an abandon, then an answer (the answer wins)
        dataset.settle(call, "answered", 25),
    ]
    await dataset.write(gw.redis, gw.keys, [sms, call], events)
    await eventually(lambda: _aggregated(gw, 6))
    rows = (await live(gw))["figures"]["rolling"]
    assert (rows["sms"]["breached"], rows["sms"]["settled"], rows["sms"]["within"]) == (1, 1, 0)
    assert (rows["voice"]["abandoned"], rows["voice"]["settled"]) == (0, 1)
    assert rows["voice"]["connection_rate"] == 100.0


async def test_calls_waiting_and_the_longest_wait(start_gateway: Any) -> None:
    gw = await start_gateway(api=API)
    now = SYSTEM_CLOCK.now_us()
    waiting = [dataset.contact(f"w{i}", "voice", now - (40 - i) * S) for i in range(3)]
    answered = dataset.contact("a", "voice", now - 30 * S)
    late = dataclasses.replace(dataset.contact("b", "voice", now - 90 * S))
    events = [
        dataset.settle(answered, "answered", 4),
        dataset.settle(late, "breached", 15),  # still waiting after its deadline
    ]
    await dataset.write(gw.redis, gw.keys, [*waiting, answered, late], events)
    await eventually(lambda: _aggregated(gw, 7))
    voice = (await live(gw))["figures"]["voice"]
    assert voice["waiting"] == 4
    assert voice["longest_wait_ms"] >= 90_000  # the breached call has waited longest
    body = await live(gw)
    assert "Calls waiting" in body["html"]["tiles"]


async def test_only_configured_channels_or_channels_with_contacts(start_gateway: Any) -> None:
    gw = await start_gateway(
        api=API, adapters={"wx": {"type": "wechat", "app_id": "wx0123456789abcdef", "token": "t"}}
    )
    body = await live(gw)
    assert body["figures"]["channels"] == ["chat"]
    assert body["figures"]["voice"] is None and body["html"]["tiles"] == ""
    assert 'data-chart="answer"' not in body["html"]["charts"]
    await dataset.write(
        gw.redis, gw.keys, [dataset.contact("m", "email", SYSTEM_CLOCK.now_us())], []
    )
    await eventually(lambda: _aggregated(gw, 1))
    gw.cases.wallboard._cache = None
    assert (await live(gw))["figures"]["channels"] == ["chat", "email"]


def test_time_bins_and_window_buckets() -> None:
    assert [time_bin(ms) for ms in (0, 1, 3000, 3001, 300_000, 300_001, 3_600_000, 3_600_001)] == [
        0, 1, 3, 4, 300, 310, 3600, 3660,
    ]  # fmt: skip
    keys = Keys("p")
    day = window_buckets(keys, 1_000_000_030, 1_000_000_030 + 86400)
    assert len(day) <= 24 + 120
    assert sum(60 if ":m:" in k else 3600 for k in day) == 86400 + 60  # to the minute


async def test_read_window_sums_hours_and_minutes(redis_client: Any, prefix: str) -> None:
    keys = Keys(prefix)
    await redis_client.hset(keys.agg_bucket("h", 7200), mapping={"sms:volume": 5, "sms:within": 2})
    await redis_client.hset(keys.agg_bucket("m", 10800), mapping={"sms:volume": 1})
    await redis_client.hset(keys.agg_bucket("m", 7140), mapping={"sms:volume": 100})  # before
    counts = await read_window(redis_client, keys, 7200 * S, 10860 * S)
    assert counts["sms"].volume == 6 and counts["sms"].get("within") == 2


async def test_what_a_dead_instance_read_is_taken_over(start_gateway: Any) -> None:
    from gateway.cases.dashboard.aggregates import GROUP

    gw = await start_gateway(api=API)
    aggregator = gw.cases.aggregator
    await aggregator.stop()  # this instance's loop; the group stays
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    await dataset.write(gw.redis, gw.keys, contacts, events)
    # another instance read every entry, then died before acknowledging any
    taken = await gw.redis.xreadgroup(GROUP, "dead", {gw.keys.events: ">"}, count=1000)
    assert len(taken[0][1]) == len(contacts) + len(events)
    assert (await read_window(gw.redis, gw.keys, now - 3 * dataset.HOUR, now)) == {}
    aggregator.claim_idle_ms = 0
    aggregator.batch = 4  # several rounds of XAUTOCLAIM
    await aggregator.claim_stale()
    counts = await read_window(gw.redis, gw.keys, now - 3 * dataset.HOUR, now)
    assert {k: c.volume for k, c in counts.items()} == {"voice": 5, "sms": 5, "email": 1}
    pending = await gw.redis.xpending(gw.keys.events, GROUP)
    assert pending["pending"] == 0


async def test_two_instances_share_the_events_and_count_each_once(start_gateway: Any) -> None:
    one = await start_gateway(api=API, sla={"voice_answer": "15s", "sms_response": "3m"})
    two = await start_gateway(api=API, sla={"voice_answer": "15s", "sms_response": "3m"})
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    await dataset.write(one.redis, one.keys, contacts, events)
    await eventually(lambda: _aggregated(one, len(contacts) + len(events)))
    counts = await read_window(one.redis, one.keys, now - 3 * dataset.HOUR, now)
    assert {k: c.volume for k, c in counts.items()} == {"voice": 5, "sms": 5, "email": 1}
    assert counts["voice"].settled == 4 and counts["sms"].get("within") == 1
    assert (await live(one))["figures"]["rolling"] == (await live(two))["figures"]["rolling"]


async def test_many_steps_in_one_call_leave_what_one_step_a_call_leaves(
    start_gateway: Any,
) -> None:
    """``aggregate.lua`` sums a call's counter moves per bucket and field and sends its set
    removals and breach entries at the end: every counter, set and hash is what the same steps
    one call each leave (a contact stepped three times in one call, a breach then a late
    reply, a call that waits then is answered), in far fewer commands."""
    gw = await start_gateway(api=API)
    now = SYSTEM_CLOCK.now_us()
    minute = now // 3_600_000_000 * 3_600_000_000 + 600_000_000  # ten minutes into an hour

    def steps(keys: Keys) -> list[Step]:
        def step(cid: str, received: int, label: str, outcome: str, bin_: str = "",
                 ms: int = 0, call: bool = False, ends: bool = False,
                 first: bool = False) -> Step:
            r = received // 1_000_000
            return Step(
                keys=[keys.contact(cid), keys.agg_bucket("m", r - r % 60),
                      keys.agg_bucket("h", r - r % 3600), keys.agg_open(label),
                      keys.agg_waiting, keys.agg_breaches],
                args=[cid, label, outcome, RANKS[outcome], received + 180_000_000,
                      AGG_BUCKET_TTL_S, bin_, ms, now, received, "1" if call else "0",
                      "1" if ends else "0", "1" if first else "0"],
            )

        early = minute - 120_000_000  # another minute's bucket, the same hour's
        return [
            step("a", minute, "sms", "open", first=True),
            step("a", minute, "sms", "closed"),
            step("b", minute + 1, "sms", "open", first=True),
            step("a", minute, "sms", "within", "30", 25_000),
            step("b", minute + 1, "sms", "breached"),
            step("c", minute + 2, "voice", "open", call=True, first=True),
            step("b", minute + 1, "sms", "late", "300", 290_000),
            step("c", minute + 2, "voice", "within", "5", 4_000, call=True, ends=True),
            step("d", early, "sms", "open", first=True),
            step("d", early, "sms", "within", "30", 21_000),
            step("a", minute, "sms", "closed"),  # a lower rank: nothing moves
        ]

    async def hincrbys() -> int:
        stats = await gw.redis.info("commandstats")
        return int(stats.get("cmdstat_hincrby", {}).get("calls", 0))

    async def contents(keys: Keys) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async for raw in gw.redis.scan_iter(match=keys.tag + ":*"):
            name = raw.decode()
            kind = (await gw.redis.type(name)).decode()
            value = (await gw.redis.hgetall(name) if kind == "hash"
                     else await gw.redis.zrange(name, 0, -1, withscores=True))
            out[name[len(keys.tag):]] = (kind, value, await gw.redis.ttl(name) > 0)
        return out

    apart, together = Keys("apart"), Keys("together")
    before = await hincrbys()
    for s in steps(apart):
        await apply(gw.queue, [s])
    one_each = await hincrbys() - before
    before = await hincrbys()
    flags = await apply(gw.queue, steps(together))
    in_one = await hincrbys() - before
    assert flags == [True, False, True, False, False, True, False, False, True, False, False]
    assert await contents(together) == await contents(apart)
    # one a step and bucket and field moved, against one a bucket and field (the old-style
    # first steps' volumes, 4 contacts x 2 buckets, are counted as they come)
    assert (one_each, in_one) == (8 + 32, 8 + 10 + 3 + 10)
