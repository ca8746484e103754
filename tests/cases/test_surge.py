"""Surge warning over a real Redis: a steady load raises none, a synthetic burst raises one per
key and window (also with two evaluators racing), sensitive words, places and a citizen who
keeps calling and texting; the event as schemed, on the events stream and on the dashboard."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from importlib.resources import files
from typing import Any

import aiohttp
import jsonschema
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from gateway.cases.surge import MARKED_FOR_S, SurgeWatch, poisson_tail
from gateway.contact.clock import MICROS_PER_SECOND, FixedClock, format_time
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisQueue
from gateway.records import Contact, Event, Repeat
from gateway.server.config import SurgeSection
from gateway.testing import eventually
from tests.cases import dataset
from tests.cases.conftest import API, TOKENS, Receiver
from tests.cases.test_push import subscriber

MIN = 60 * MICROS_PER_SECOND
DAY = 1440 * MIN
NOW = 1_795_594_483_000_000 - 1_795_594_483_000_000 % MIN + 30 * MICROS_PER_SECOND
EVENT_SCHEMA = json.loads(files("gateway.schemas").joinpath("event.schema.json").read_text())
SECTION = SurgeSection(history_days=3, districts=("朝阳区",), sensitive=("自焚",))


def poisson(rng: random.Random, lam: float) -> int:
    """Knuth's sampler (small lam)."""
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def citizen(i: int, at: int, text: str = "路灯坏了", **meta: Any) -> Contact:
    c = dataset.contact(f"c{i}", "sms", at)
    return dataclasses.replace(
        c, text=text, sender=dataclasses.replace(c.sender, address=f"+86138{i:08d}"), meta=meta
    )


def watch(redis_client: Any, prefix: str, clock: FixedClock, section: SurgeSection) -> SurgeWatch:
    queue = RedisQueue(
        redis_client,
        Keys(prefix),
        clock,
        source="test",
        dedupe_window_s=60,
        repeat_window_s=60,
        retention_s=86400,
        maxlen=100_000,
    )
    return SurgeWatch(queue, clock, section, "test")


async def steady(surge: SurgeWatch, rng: random.Random, per_min: float, days: int) -> int:
    """Poisson traffic at ``per_min`` over the same 90 minutes on each of ``days`` past days and
    the 90 minutes up to NOW."""
    n = 0
    for day in range(days, -1, -1):
        batch = []
        for m in range(90, 0, -1):
            at = NOW - day * DAY - m * MIN
            for _ in range(poisson(rng, per_min)):
                batch.append(citizen(n, at + rng.randrange(MIN)))
                n += 1
        await surge.count(batch)
    return n


async def test_poisson_tail() -> None:
    assert poisson_tail(0, 3.0) == 1.0
    assert abs(poisson_tail(1, 2.0) - (1 - pow(2.718281828459045, -2.0))) < 1e-12
    assert poisson_tail(20, 20.0) > 0.4  # the usual level is no surge
    assert poisson_tail(60, 20.0) < 1e-10


async def test_steady_load_raises_none_and_a_burst_raises_one_per_key(
    redis_client: Any, prefix: str
) -> None:
    clock = FixedClock(NOW)
    surge = watch(redis_client, prefix, clock, SECTION)
    n = await steady(surge, random.Random(7), per_min=3.0, days=3)
    for minute in range(0, 30):  # half an hour of ordinary load, evaluated every minute
        at = NOW + minute * MIN
        await surge.count([citizen(n + i, at + i) for i in range(3)])
        n += 3
        assert await surge.evaluate(at + 30 * MICROS_PER_SECOND) == []
    # a burst: a water main breaks, 50 contacts in 5 minutes name it
    t0 = NOW + 30 * MIN
    burst = [
        citizen(n + i, t0 + i * 6 * MICROS_PER_SECOND, "小区停水了，什么时候来水")
        for i in range(50)
    ]
    await surge.count(burst)
    found = await surge.evaluate(t0 + 5 * MIN)
    kinds = {e.detail["key"]: e for e in found}
    assert "topic:停水" in kinds and "all" in kinds
    water = kinds["topic:停水"]
    assert water.detail["count"] == 50 and water.detail["baseline"] < 5
    assert set(water.detail["samples"]) <= {c.id for c in burst} and water.detail["samples"]
    jsonschema.validate(water.to_dict(), EVENT_SCHEMA)
    # once per key, however often it is evaluated while the burst lasts
    assert await surge.evaluate(t0 + 5 * MIN + 5 * MICROS_PER_SECOND) == []
    await surge.count([citizen(n + 100 + i, t0 + 6 * MIN + i, "还是停水") for i in range(30)])
    assert await surge.evaluate(t0 + 7 * MIN) == []  # the same burst, still going
    events = await redis_client.xrange(Keys(prefix).events)
    written = [json.loads(f[b"event"]) for _, f in events if f[b"type"] == b"surge"]
    assert sorted(e["detail"]["key"] for e in written) == sorted(kinds)


async def test_two_evaluators_write_each_surge_once(redis_client: Any, prefix: str) -> None:
    clock = FixedClock(NOW)
    a = watch(redis_client, prefix, clock, SECTION)
    b = watch(redis_client, prefix, clock, SECTION)
    n = await steady(a, random.Random(3), per_min=1.0, days=2)
    await a.count([citizen(n + i, NOW + i * MICROS_PER_SECOND, "燃气泄漏") for i in range(40)])
    at = NOW + 2 * MIN
    one, two = await asyncio.gather(a.evaluate(at), b.evaluate(at))
    keys = [e.detail["key"] for e in one + two]
    assert "topic:燃气" in keys and len(keys) == len(set(keys))


async def test_a_failed_write_leaves_no_mark_and_the_next_evaluation_writes_it(
    redis_client: Any, prefix: str
) -> None:
    # A surge found by the evaluator is one surge.lua call: the period's mark, the event and
    # the dashboard's list. A call that fails (here: the samples' contact keys of the wrong
    # type, which the script reads first) sets no mark, and the next evaluation writes it.
    # (Before, the mark was set first and a failed write lost the key's surge for the
    # period.) The mark holds the surge's time: in the next period, within two windows of
    # it, the same burst is not written again.
    clock = FixedClock(NOW)
    surge = watch(redis_client, prefix, clock, SECTION)
    n = await steady(surge, random.Random(3), per_min=1.0, days=2)
    period = 2 * int(SECTION.window) * MICROS_PER_SECOND
    end = NOW + 2 * period - (NOW + 2 * period) % period - 2 * MIN  # 2 min before a period ends
    start = end - 3 * MIN
    burst = [citizen(n + i, start + i * MICROS_PER_SECOND, "燃气泄漏") for i in range(40)]
    await surge.count(burst)
    for c in burst:
        await redis_client.set(Keys(prefix).contact(c.id), "not a hash")
    with pytest.raises(ResponseError):
        await surge.evaluate(end)
    assert await surges_on(redis_client, prefix) == []
    assert [k async for k in redis_client.scan_iter(match=f"{Keys(prefix).tag}:surge:e:*")] == []
    assert await redis_client.zcard(Keys(prefix).surges) == 0
    for c in burst:
        await redis_client.delete(Keys(prefix).contact(c.id))
    found = {e.detail["key"] for e in await surge.evaluate(end + 5 * MICROS_PER_SECOND)}
    assert {"all", "topic:燃气"} <= found
    assert {e["detail"]["key"] for e in await surges_on(redis_client, prefix)} == found
    assert await redis_client.zcard(Keys(prefix).surges) == len(found)
    assert await surge.evaluate(end + 10 * MICROS_PER_SECOND) == []  # marked: once a period
    assert await surge.evaluate(end + 3 * MIN) == []  # the next period: within two windows
    assert len(await surges_on(redis_client, prefix)) == len(found)


async def test_a_key_whose_write_fails_costs_the_other_keys_nothing(
    redis_client: Any, prefix: str
) -> None:
    # One key's surge refused (its sample's contact key of the wrong type): the others found
    # in the same evaluation are written, the error is raised once they are, and the refused
    # key is written by the next evaluation.
    surge = watch(redis_client, prefix, FixedClock(NOW), SECTION)
    n = await steady(surge, random.Random(3), per_min=1.0, days=2)
    end = NOW + 30 * MIN
    word = citizen(n, end - 5 * MIN, "有人要自焚")
    start = end - 3 * MIN
    burst = [citizen(n + 1 + i, start + i * MICROS_PER_SECOND, "燃气泄漏") for i in range(40)]
    await surge.count([word, *burst])
    await redis_client.set(Keys(prefix).contact(word.id), "not a hash")
    with pytest.raises(ResponseError):
        await surge.evaluate(end)
    written = {e["detail"]["key"] for e in await surges_on(redis_client, prefix)}
    assert {"all", "topic:燃气"} <= written and "sensitive:自焚" not in written
    await redis_client.delete(Keys(prefix).contact(word.id))
    again = await surge.evaluate(end + 5 * MICROS_PER_SECOND)
    assert [e.detail["key"] for e in again] == ["sensitive:自焚"]


async def test_the_script_checks_the_previous_periods_surge_itself(
    redis_client: Any, prefix: str
) -> None:
    # Two evaluators during a lease take-over across a period's end: the one in the new period
    # may have read the previous period's mark before the other set it. surge.lua reads it
    # again, in the call that would set the new mark: within the gap, nothing is written.
    surge = watch(redis_client, prefix, FixedClock(NOW), SECTION)
    k = Keys(prefix)
    previous, mark = k.surge_emitted("all", 1), k.surge_emitted("all", 2)
    await redis_client.set(previous, NOW - 10 * MICROS_PER_SECOND)

    async def write(at: int) -> Any:
        (reply,) = await surge.queue.run_scripts("surge", [(
            [k.events, k.contact("c1"), mark, k.surges, previous],
            ["c1", '{"contact_id":"c1"}', 60, at, 0, at, 20 * MIN],
        )])
        return reply

    assert not await write(NOW)
    assert await redis_client.exists(mark) == 0 and await redis_client.xlen(k.events) == 0
    assert await write(NOW + 20 * MIN)  # past the gap
    assert await redis_client.get(mark) == str(NOW + 20 * MIN).encode()


async def test_places_and_sensitive_words(redis_client: Any, prefix: str) -> None:
    clock = FixedClock(NOW)
    surge = watch(redis_client, prefix, clock, SECTION)
    n = await steady(surge, random.Random(5), per_min=1.0, days=1)
    near = [
        citizen(
            n + i,
            NOW + i * MICROS_PER_SECOND,
            "井盖丢了",
            location={"lat": 39.9087 + i * 1e-4, "lon": 116.3975},
        )
        for i in range(15)
    ]
    district = [
        citizen(n + 100 + i, NOW + i * MICROS_PER_SECOND, "朝阳区 路面塌陷") for i in range(15)
    ]
    word = [citizen(n + 200, NOW, "我要去自焚")]
    assert "place:39.90,116.39" in surge.keys_of(near[0])
    await surge.count(near + district + word)
    found = {e.detail["key"]: e for e in await surge.evaluate(NOW + MIN)}
    assert "place:39.90,116.39" in found and "place:朝阳区" in found
    assert found["sensitive:自焚"].detail["samples"] == [word[0].id]


async def test_nothing_before_the_counters_span_the_warmup(redis_client: Any, prefix: str) -> None:
    clock = FixedClock(NOW)
    surge = watch(redis_client, prefix, clock, SECTION)
    await surge.count([citizen(i, NOW + i, "停水") for i in range(100)])
    assert await surge.evaluate(NOW + MIN) == []  # a new gateway knows no usual level


async def test_no_key_name_holds_a_sender_number(start_gateway: Any) -> None:
    # the repeat surge's "once a day" key was surge:e:repeat:<number>:<day>; the repeat counter
    # (sender:<number>) and the rate limit (rate:sender:<number>:<window>) held it too
    gw = await start_gateway(api=API, limits={"sender_contacts": 100})
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    async with aiohttp.ClientSession() as s:
        for channel, sender in [("voice", "+8613912345678"), ("sms", "+8613912345678"),
                                ("sms", "+8613912345678"), ("email", "citizen@example.org"),
                                ("email", "citizen@example.org"),
                                ("email", "citizen@example.org")]:
            body = {"channel": channel, "sender": sender, "text": "还是没人来修"}
            headers = {"Authorization": f"Bearer {TOKENS['intake']}"}
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 202, await r.text()

    async def both_flagged() -> list[bytes] | None:
        names = [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":*", count=1000)]
        repeat = [n for n in names if b":surge:e:repeat:" in n]
        return names if len(repeat) == 2 else None

    names = await eventually(both_flagged)
    for kind in (b":sender:", b":rate:sender:", b":surge:e:repeat:"):
        assert [n for n in names if kind in n], kind  # the keys are there ...
    held = [n for n in names if b"12345678" in n or b"citizen" in n]
    assert held == []  # ... and none names the citizen


def repeater(i: int, at: int, count: int, address: str = "+8613912345678") -> Contact:
    """A contact of a citizen with ``count`` earlier ones in the repeat window."""
    c = citizen(i, at)
    return dataclasses.replace(
        c, sender=dataclasses.replace(c.sender, address=address), repeat=Repeat(count, 60)
    )


async def surges_on(redis_client: Any, prefix: str) -> list[dict[str, Any]]:
    entries = await redis_client.xrange(Keys(prefix).events)
    return [json.loads(f[b"event"]) for _, f in entries if f[b"type"] == b"surge"]


async def test_a_citizen_flooding_costs_one_mark_not_a_command_a_contact(
    redis_client: Any, prefix: str
) -> None:
    # Every contact from the third on may raise the citizen's repeat surge; the first of the
    # day does (SET NX), and every later one finds the mark there. An instance remembers the
    # marks it has seen for a few minutes, so a citizen who writes again and again costs no
    # command a contact for it (seen here as the mark, taken away behind the watch's back,
    # not set again), on the path with the contact at hand and on the aggregator's, which
    # reads it.
    clock = FixedClock(NOW)
    surge = watch(redis_client, prefix, clock, SECTION)
    marks = f"{Keys(prefix).tag}:surge:e:*"
    other = "+8613700000001"
    first = await surge.count(
        [repeater(1, NOW, 2), repeater(2, NOW + 1, 3), repeater(3, NOW + 2, 2, other)]
    )
    assert [e.contact_id for e in first] == ["c1", "c3"]  # the first of each citizen
    set_here = [n async for n in redis_client.scan_iter(match=marks)]
    assert len(set_here) == 2
    # another instance remembers nothing: the mark in Redis keeps the day's one surge
    assert await watch(redis_client, prefix, clock, SECTION).count(
        [repeater(4, NOW + 3, 4)]
    ) == []
    await redis_client.delete(*set_here)
    later = [repeater(10 + i, NOW + MIN + i, 4 + i) for i in range(20)]
    assert await surge.count(later[:10]) == []
    for c in later[10:]:
        await redis_client.hset(Keys(prefix).contact(c.id), "contact", c.to_json())
    assert await surge.repeats_of([c.id for c in later[10:]]) == []
    assert [n async for n in redis_client.scan_iter(match=marks)] == []
    assert len(await surges_on(redis_client, prefix)) == 2
    # a few minutes on, it asks Redis again: a mark Redis lost (a failover) is made again
    clock.value_us = NOW + MARKED_FOR_S * MICROS_PER_SECOND
    (again,) = await surge.count([repeater(30, clock.value_us, 30)])
    assert again.contact_id == "c30"
    assert await surge.count([repeater(31, clock.value_us + 1, 31)]) == []
    # the next day is a new day: the citizen is raised again, once
    clock.value_us = NOW + DAY
    (day2,) = await surge.count([repeater(50 + i, NOW + DAY + i, 40 + i) for i in range(3)])
    assert day2.contact_id == "c50"
    day = NOW // MICROS_PER_SECOND // 86400 * 86400
    assert day2.detail["window_start"] == format_time((day + 86400) * MICROS_PER_SECOND)
    assert len(await surges_on(redis_client, prefix)) == 4


async def test_an_outage_of_repeats_is_written_in_a_round_trip_not_three_a_citizen(
    own_redis: Any,
) -> None:
    # An outage brings citizens back to the line: many on their third contact at once, each
    # the first repeat of its citizen's day. Each surge was a SET, then its event, then the
    # dashboard's list, one round trip after another: the aggregator, which counts them, fell
    # 10-24 s behind the events under such a load. A batch's are now one call each (the mark
    # and its event together), all in one round trip; counted here as the reads the server
    # made (its own INFO counter: one a round trip of a client waiting for its reply).
    client = aioredis.from_url(own_redis.url)
    try:
        surge = watch(client, "own", FixedClock(NOW), SECTION)
        await surge.queue.load_scripts()
        # warm: the connections opened and the pseudonym key read
        assert len(await surge.count([repeater(99, NOW, 2, "+8613600000000")])) == 1
        citizens = [repeater(i, NOW + i, 2, f"+86137{i:08d}") for i in range(40)]
        for c in citizens[:3]:  # retained contacts: each one's surge indexed in its hash
            await client.hset(Keys("own").contact(c.id), "received_us", c.received_at)
        before = (await client.info("stats"))["total_reads_processed"]
        written = await surge.count(citizens)
        reads = (await client.info("stats"))["total_reads_processed"] - before
        assert sorted(e.contact_id for e in written) == sorted(c.id for c in citizens)
        # the counters, the surges (40 calls of ~600 bytes: read 16 KB at a time, so two), the
        # INFO: 4 (and 122 before, three round trips a citizen)
        assert reads <= 10, reads
        # each mark with its event and its place on the dashboard's list
        ids = sorted(["c99", *(c.id for c in citizens)])
        assert sorted(e["contact_id"] for e in await surges_on(client, "own")) == ids
        listed = await client.zrange(Keys("own").surges, 0, -1)
        assert sorted(json.loads(x)["contact_id"] for x in listed) == ids
        marks = [n async for n in client.scan_iter(match=f"{Keys('own').tag}:surge:e:*")]
        assert len(marks) == 41
        by_id = {e.contact_id: e for e in written}
        for c in citizens[:3]:
            indexed = await client.hgetall(Keys("own").contact(c.id))
            (entry,) = [k for k in indexed if k.startswith(b"event:")]
            assert json.loads(indexed[entry]) == by_id[c.id].to_dict()
        assert not await client.exists(Keys("own").contact(citizens[3].id))  # none made
        ttls = [await client.ttl(n) for n in marks]
        assert all(0 < t <= 2 * 86400 for t in ttls), ttls
        # another instance finds the marks: nothing twice
        again = [repeater(100 + i, NOW + 100 + i, 3, f"+86137{i:08d}") for i in range(40)]
        assert await watch(client, "own", FixedClock(NOW), SECTION).count(again) == []
        assert len(await surges_on(client, "own")) == 41
    finally:
        await client.aclose()


async def test_a_failed_surge_call_costs_no_other_citizen_its_surge(
    redis_client: Any, prefix: str
) -> None:
    # One surge.lua call a citizen, in one round trip: one that fails (here its contact's key
    # of the wrong type, which the script reads first) fails alone. The others' surges are
    # written and remembered, the error is raised once they are, and the failed citizen, not
    # remembered and not marked, is raised by a later contact.
    surge = watch(redis_client, prefix, FixedClock(NOW), SECTION)
    bad, good = repeater(1, NOW, 2, "+8613700000001"), repeater(2, NOW + 1, 2, "+8613700000002")
    await redis_client.set(Keys(prefix).contact(bad.id), "not a hash")
    with pytest.raises(ResponseError):
        await surge.count([bad, good])
    assert [e["contact_id"] for e in await surges_on(redis_client, prefix)] == ["c2"]
    marks = [n async for n in redis_client.scan_iter(match=f"{Keys(prefix).tag}:surge:e:*")]
    assert len(marks) == 1  # the other citizen's: the failed call set none
    await redis_client.delete(Keys(prefix).contact(bad.id))
    (again,) = await surge.count([repeater(3, NOW + 2, 3, "+8613700000001")])
    assert again.contact_id == "c3"
    assert await surge.count([repeater(4, NOW + 3, 3, "+8613700000002")]) == []
    assert len(await surges_on(redis_client, prefix)) == 2


async def test_a_citizen_calling_and_texting_three_times_is_flagged_once(
    start_gateway: Any, receiver: Receiver
) -> None:
    gw = await start_gateway(api=API, push=subscriber(receiver, events=True))
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    async with aiohttp.ClientSession() as s:
        for channel in ("voice", "sms", "sms", "voice"):
            body = {"channel": channel, "sender": "+8613912345678", "text": "还是没人来修"}
            headers = {"Authorization": f"Bearer {TOKENS['intake']}"}
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 202, await r.text()

    async def surges() -> list[Event]:
        entries = await gw.redis.xrange(gw.keys.events)
        return [
            Event.from_dict(json.loads(f[b"event"])) for _, f in entries if f[b"type"] == b"surge"
        ]

    (event,) = await eventually(surges)
    assert event.detail["kind"] == "repeat" and event.detail["count"] == 3
    assert "12345678" not in json.dumps(event.to_dict())  # the number is masked
    jsonschema.validate(event.to_dict(), EVENT_SCHEMA)
    # the dashboard lists it, and the repeat candidates too (once the fourth is counted)
    async def board() -> dict[str, Any] | None:
        async with aiohttp.ClientSession() as s:
            async with s.get(
                f"http://127.0.0.1:{gw.http_port}/dashboard/live?lang=zh",
                headers={"Authorization": f"Bearer {TOKENS['reader']}"},
            ) as r:
                live: dict[str, Any] = await r.json()
        return live if [x["count"] for x in live["figures"]["repeats"]] == [4, 3] else None

    live = await eventually(board)
    assert [x["detail"]["kind"] for x in live["figures"]["surges"]] == ["repeat"]
    assert "同一人重复" in live["html"]["surges"]
    assert len(await surges()) == 1  # the fourth contact raises no second one that day

    async def pushed() -> list[dict[str, Any]]:
        docs = [json.loads(body) for body in receiver.accepted]
        return [d for d in docs if d["type"] == "event" and d["data"]["type"] == "surge"]

    docs = await eventually(pushed)  # push subscribers get it like any event (at least once)
    assert len({d["delivery"] for d in docs}) == 1
    assert docs[0]["data"]["detail"]["kind"] == "repeat"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(["停", "水", "电", "没", "断", "燃", "气", "煤", "漏", "跳",
                                 "闸", "压", "低", "天", "然", "X", "x", "Wi", "FI", " "]),
                max_size=12))
def test_topic_keys_are_the_words_found_in_the_text(parts: list[str]) -> None:
    # keys_of first scans for any topic word at all, then looks topic by topic: the same
    # topics as a search for each word (upper case matching a lower-case word)
    section = SurgeSection(topics={**SurgeSection().topics, "wifi": ("WiFi", "无线")})
    surge = watch(None, "t", FixedClock(NOW), section)
    text = "".join(parts)
    c = citizen(1, NOW, text)
    found = {k for k in surge.keys_of(c) if k.startswith("topic:")}
    lowered = f"{c.subject} {text}".lower() if c.subject else text.lower()
    expected = {f"topic:{name}" for name, words in section.topics.items()
                if any(w.lower() in lowered for w in words)}
    assert found == expected


async def test_a_key_keeps_its_count_and_its_latest_samples(redis_client: Any, prefix: str) -> None:
    surge = watch(redis_client, prefix, FixedClock(NOW), SECTION)
    batch = [citizen(i, NOW + i * MICROS_PER_SECOND) for i in range(8)]
    await surge.count(batch[:3])
    await surge.count(batch[3:])
    minute = NOW // MICROS_PER_SECOND
    minute -= minute % 60
    keys = Keys(prefix)
    assert int(await redis_client.hget(keys.surge_bucket(minute), "all")) == 8
    samples = await redis_client.lrange(keys.surge_samples("all", minute), 0, -1)
    assert [s.decode() for s in samples] == [c.id for c in reversed(batch[-5:])]
