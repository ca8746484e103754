"""The deadline watcher: ``warning`` and ``breached`` once per contact, with several instances."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import pytest

from gateway.cases.watcher import DeadlineWatcher
from gateway.contact.clock import MICROS_PER_SECOND, FixedClock
from gateway.records import Inbound, Sender
from gateway.server.config import WatcherSection
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.cases.conftest import API, Client, submit


def own_watcher(gw: Gateway, clock: FixedClock) -> DeadlineWatcher:
    """A watcher ticked by the test itself (the gateway's own is disabled)."""
    return DeadlineWatcher(gw.queue, clock, gw.metrics, WatcherSection())


def deadline_events(events: list[Any], type_: str) -> Counter[str]:
    return Counter(e.contact_id for e in events if e.type == type_)


async def test_two_instances_one_breach_and_one_warning_per_deadline(
    start_gateway: Any, session: Any
) -> None:
    # a warning the watcher finds already past its deadline is left out (the breach says it
    # all): a window of 3 s between the two, not 0.5 s, so that a pause of the machine (this
    # process, Valkey) cannot drop one
    sla = {"sms_response": "4s", "web_response": "1h", "warning_fraction": 0.25}
    a = await start_gateway(api=API, sla=sla, gateway={"instance": "gw-a"})
    b = await start_gateway(api=API, sla=sla, gateway={"instance": "gw-b"})
    ca = Client(session, f"http://127.0.0.1:{a.http_port}")
    cb = Client(session, f"http://127.0.0.1:{b.http_port}")
    late = [await submit(ca if i % 2 else cb, f"sms {i}", channel="sms") for i in range(12)]
    kept = [await submit(ca, f"web {i}") for i in range(3)]
    for cid in kept:
        status, _ = await cb.call(
            "POST", f"/v1/contacts/{cid}/events", token="replier", json_body={"type": "responded"}
        )
        assert status == 201

    async def all_breached() -> list[Any] | None:
        events = await a.read_events()
        return events if len(deadline_events(events, "breached")) == len(late) else None

    events = await eventually(all_breached)
    # nothing is left to claim, so no instance can write another one later
    assert await a.redis.zcard(a.keys.deadlines) == 0
    assert await a.redis.zcard(a.keys.warnings) == 0
    events = await a.read_events()
    assert deadline_events(events, "breached") == Counter(late)
    assert deadline_events(events, "warning") == Counter(late)
    contacts = {c.id: c for c in await a.read_contacts()}
    for e in events:
        if e.type in ("breached", "warning"):
            c = contacts[e.contact_id]
            assert e.due_at == c.deadline.due_at
            assert e.elapsed_ms == (e.at - c.received_at) // 1000
            assert e.source == "watcher" and e.detail == {"kind": "response"}
        if e.type == "breached":
            assert e.met is False
            assert e.at >= c.deadline.due_at  # never early
        if e.type == "warning":
            assert e.at >= c.received_at + (c.deadline.due_at - c.received_at) // 4
            assert e.at < c.deadline.due_at
    # every warning comes before its breach on the stream
    order = [(e.contact_id, e.type) for e in events if e.type in ("warning", "breached")]
    for cid in late:
        assert order.index((cid, "warning")) < order.index((cid, "breached"))
    assert not any(e.contact_id in kept and e.type in ("breached", "warning") for e in events)
    # the two instances' metrics add up to one event each
    total = 0
    for gw in (a, b):
        text = (
            await (await session.get(f"http://127.0.0.1:{gw.http_port}/metrics")).read()
        ).decode()
        for line in text.splitlines():
            if line.startswith(
                'gateway_deadline_events_total{channel="sms",policy="sms_response",type="breached"}'
            ):
                total += int(float(line.rsplit(" ", 1)[1]))
    assert total == len(late)


async def test_a_late_answer_after_the_breach_is_recorded_not_met(
    start_gateway: Any, session: Any
) -> None:
    gw = await start_gateway(api=API, sla={"chat_response": "1s"})
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    cid = await submit(client, "hello", channel="chat")

    async def breached() -> bool:
        return any(e.type == "breached" for e in await gw.read_events())

    await eventually(breached)
    status, body = await client.call(
        "POST", f"/v1/contacts/{cid}/events", token="replier", json_body={"type": "responded"}
    )
    assert status == 201 and body["event"]["met"] is False
    types = [e.type for e in await gw.read_events()]
    # the warning's window is 0.2 s: a pause of the machine across it leaves the warning out
    assert types in (
        ["enqueued", "warning", "breached", "responded"], ["enqueued", "breached", "responded"]
    )


async def test_fraction_and_deadline_on_a_pinned_clock(start_gateway: Any) -> None:
    """With the clock pinned, each step is exact: nothing before 80 %, a warning at 80 %,
    nothing more until the deadline, one breach at it, nothing after."""
    clock = FixedClock()
    gw: Gateway = await start_gateway(
        api=API, clock=clock, sla={"web_response": "100s"}, watcher={"enabled": False}
    )
    receipt = await gw.intake.submit(
        Inbound("web", "api", "ext-1", Sender("a@example.org"), "", clock.now_us(), text="x")
    )
    watcher = own_watcher(gw, clock)
    clock.advance(79.9)
    assert await watcher.tick() == 0
    clock.advance(0.1)
    assert await watcher.tick() == 1
    assert await watcher.tick() == 0
    clock.advance(19.9)
    assert await watcher.tick() == 0
    clock.advance(0.1)
    assert await watcher.tick() == 1
    clock.advance(1000)
    assert await watcher.tick() == 0
    events = [e for e in await gw.read_events() if e.contact_id == receipt.contact_id]
    assert [(e.type, e.elapsed_ms) for e in events] == [
        ("enqueued", None),
        ("warning", 80_000),
        ("breached", 100_000),
    ]
    (contact,) = await gw.read_contacts()
    assert events[2].due_at == contact.received_at + 100 * MICROS_PER_SECOND


async def test_settled_before_its_warning_gets_nothing(start_gateway: Any) -> None:
    clock = FixedClock()
    gw: Gateway = await start_gateway(
        api=API, clock=clock, sla={"voice_answer": "15s"}, watcher={"enabled": False}
    )
    receipt = await gw.intake.submit(
        Inbound("voice", "pbx", "call-1", Sender("+8613800138000"), "12345", clock.now_us())
    )
    clock.advance(5)
    assert await gw.queue.stamp(receipt.contact_id, "answered", clock.now_us(), "pbx")
    clock.advance(60)
    assert await own_watcher(gw, clock).tick() == 0
    types = [e.type for e in await gw.read_events() if e.contact_id == receipt.contact_id]
    assert types == ["enqueued", "answered"]


async def test_one_instance_watches_and_another_takes_over(
    start_gateway: Any, session: Any
) -> None:
    sla = {"sms_response": "1s"}
    fleet = {"lease_ttl": "5s"}
    a = await start_gateway(api=API, sla=sla, fleet=fleet, gateway={"instance": "gw-a"})
    b = await start_gateway(api=API, sla=sla, fleet=fleet, gateway={"instance": "gw-b"})

    async def one_holder() -> bool:
        return [("watcher" in gw.leases.held) for gw in (a, b)].count(True) == 1

    await eventually(one_holder)
    holder, other = (a, b) if "watcher" in a.leases.held else (b, a)
    ca = Client(session, f"http://127.0.0.1:{other.http_port}")
    first = [await submit(ca, f"sms {i}", channel="sms") for i in range(4)]

    async def breached(ids: list[str]) -> bool:
        events = deadline_events(await other.read_events(), "breached")
        return all(events[i] == 1 for i in ids)

    await eventually(lambda: breached(first))
    written = {
        gw.instance: sum(
            s.value
            for m in gw.metrics.deadline_events.collect()
            for s in m.samples
            if s.name.endswith("_total") and "breached" in s.labels.values()
        )
        for gw in (a, b)
    }
    assert written[other.instance] == 0  # the holder alone watches
    assert written[holder.instance] == 4
    await holder.stop()
    later = [await submit(ca, f"later {i}", channel="sms") for i in range(4)]
    await eventually(lambda: breached(later))
    assert "watcher" in other.leases.held
    assert sum(deadline_events(await other.read_events(), "breached").values()) == 8


async def test_many_due_at_once_are_claimed_in_small_steps(start_gateway: Any) -> None:
    """A sweep of many due contacts gives the loop back between small batches: other tasks
    (the intake's requests) run while it goes on, instead of waiting for all of it."""
    clock = FixedClock()
    gw: Gateway = await start_gateway(
        api=API, clock=clock, sla={"web_response": "100s"}, watcher={"enabled": False}
    )
    due = 150
    await asyncio.gather(
        *(
            gw.intake.submit(
                Inbound("web", "api", f"ext-{i}", Sender(f"a{i}@example.org"), "",
                        clock.now_us(), text="x")
            )
            for i in range(due)
        )
    )
    watcher = own_watcher(gw, clock)
    clock.advance(80)
    labels = {"type": "warning", "channel": "web", "policy": "web_response"}

    def written() -> int:
        value = gw.metrics.registry.get_sample_value("gateway_deadline_events_total", labels)
        return int(value or 0)

    seen: list[int] = []
    sweeping = True

    async def other_task() -> None:  # what the loop runs besides the sweep
        while sweeping:
            seen.append(written())
            await asyncio.sleep(0)

    observer = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    assert await watcher.tick() == due
    sweeping = False
    await observer
    seen.append(written())
    steps = [b - a for a, b in itertools.pairwise(seen)]
    assert sum(steps) == due
    assert max(steps) <= 64, f"{max(steps)} contacts claimed without the loop running others"


async def test_a_warning_claim_clears_its_own_set_once(start_gateway: Any) -> None:
    """The members of one step are claimed in one ``claim.lua`` call: their removal is one
    ZREM a set, from the warning set alone for warnings (the set to clear as well is the same
    one), from both sets for breaches (and the breaches' dashboard steps one from the open
    set)."""
    clock = FixedClock()
    gw: Gateway = await start_gateway(
        api=API, clock=clock, sla={"web_response": "100s"}, watcher={"enabled": False}
    )
    ids = sorted([
        (await gw.intake.submit(Inbound(
            "web", "api", f"ext-{i}", Sender(f"{i}@example.org"), "", clock.now_us(), text="x"
        ))).contact_id.encode()
        for i in range(3)
    ])
    watcher = own_watcher(gw, clock)

    async def zrems() -> int:
        stats = await gw.redis.info("commandstats")
        return int(stats.get("cmdstat_zrem", {}).get("calls", 0))

    clock.advance(80)
    before = await zrems()
    assert await watcher.tick() == 3
    assert await zrems() - before == 1
    assert await gw.redis.zrange(gw.keys.warnings, 0, -1) == []
    assert sorted(await gw.redis.zrange(gw.keys.deadlines, 0, -1)) == ids
    clock.advance(20)
    assert await gw.redis.zcard(gw.keys.agg_open("web")) == 3
    before = await zrems()
    assert await watcher.tick() == 3
    # the deadline and warning sets, and the dashboard's open set (the breaches' steps, taken
    # with the claim: one ZREM for the three)
    assert await zrems() - before == 3
    assert await gw.redis.zrange(gw.keys.deadlines, 0, -1) == []
    assert await gw.redis.zcard(gw.keys.agg_open("web")) == 0
    events = [e for e in await gw.read_events() if e.type in ("warning", "breached")]
    assert sorted((e.contact_id.encode(), e.type) for e in events) == sorted(
        [(i, t) for i in ids for t in ("warning", "breached")]
    )


async def test_a_claim_indexes_its_events_in_the_hashes_still_retained_alone(
    start_gateway: Any,
) -> None:
    """A step's hashes are checked by one EXISTS; when one expired between the watcher's read
    and its claim (here deleted), its event is still written and the others' are indexed, but
    that hash is not made again (it would never expire)."""
    clock = FixedClock()
    gw: Gateway = await start_gateway(
        api=API, clock=clock, sla={"web_response": "100s"}, watcher={"enabled": False}
    )
    ids = [
        (await gw.intake.submit(Inbound(
            "web", "api", f"ext-{i}", Sender(f"{i}@example.org"), "", clock.now_us(), text="x"
        ))).contact_id
        for i in range(3)
    ]
    watcher = own_watcher(gw, clock)
    clock.advance(80)
    now = clock.now_us()
    calls = [(cid, f'{{"n":{n}}}'.encode(), "web", now) for n, cid in enumerate(ids)]
    await gw.redis.delete(gw.keys.contact(ids[1]))
    assert await watcher._claim_all(gw.keys.warnings, gw.keys.warnings, calls, now,
                                    "warning", {}) == [1, 1, 1]
    assert not await gw.redis.exists(gw.keys.contact(ids[1]))
    for n in (0, 2):
        indexed = await gw.queue.contact_events(ids[n])
        assert indexed[-1] == f'{{"n":{n}}}'.encode()
    written = [f[b"contact_id"] for _, f in await gw.redis.xrange(gw.keys.events)
               if f[b"type"] == b"warning"]
    assert written == [cid.encode() for cid in ids]


async def test_a_tick_that_finds_nothing_due_is_one_round_trip(
    start_gateway: Any, redis_server: Any
) -> None:
    """An idle watcher looks four times a second: its look at both sets, and the earliest
    scores it sleeps until, go in one round trip (three, through redis-py, before); with
    something due, the sleep is read again after the claims."""
    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.store import RedisQueue, connect
    from tests.cases.test_aggregate_upgrade import RoundTrips
    from tests.cases.test_intake_counts import QUIET

    gw = await start_gateway(api=API, sla={"sms_response": "3m"}, watcher=QUIET)
    relay = RoundTrips(redis_server)
    client = connect(gw.settings.redis, await relay.start())
    queue = RedisQueue(client, gw.keys, SYSTEM_CLOCK, source="relayed", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=86400, maxlen=100_000)
    try:
        clock = FixedClock()
        watcher = DeadlineWatcher(queue, clock, gw.metrics, WatcherSection())
        await queue.load_scripts()  # and the intake link opened: not counted below
        await queue.execute([["PING"]])  # the plain commands' connection open
        relay.trips = 0
        assert await watcher.tick() == 0 and await watcher._until_next() == 0.25
        assert relay.trips == 1
        await gw.intake.submit(Inbound(
            channel="sms", adapter="test", external_id="w1", sender=Sender("+8613900000001"),
            recipient="12345", received_at=clock.now_us(), text="路灯坏了",
        ))
        (_, warn_at), = await gw.redis.zrange(gw.keys.warnings, 0, 0, withscores=True)
        clock.value_us = int(warn_at) - 100_000  # 0.1 s before the warning falls due
        relay.trips = 0
        assert await watcher.tick() == 0
        assert await watcher._until_next() == pytest.approx(0.1)  # slept until the score
        assert relay.trips == 1  # nothing due: still one
        assert gw.metrics.deadlines_open._value.get() == 1
        relay.trips = 0
        assert await watcher._until_next() == pytest.approx(0.1)  # the tick's look used once
        assert relay.trips == 1
        clock.advance(200)
        relay.trips = 0
        assert await watcher.tick() == 1  # the breach (its warning past too: dropped)
        assert await watcher._until_next() == 0.25
        # the look; the warning's facts and claim (dropped: the breach says it all); the
        # breach's facts and claim; the sleep read again
        assert relay.trips == 6
    finally:
        await queue.aclose()
        await client.aclose()
        relay.close()


def test_the_sleep_is_read_from_either_protocols_replies() -> None:
    """``ZRANGE ... WITHSCORES`` answers RESP2's flat ``[member, score]`` list or RESP3's
    ``[[member, score]]`` pairs (redis-py 8's default): the sleep is the same from both, and
    a score already past sleeps none."""
    from gateway.server.metrics import Metrics

    clock = FixedClock()
    watcher = DeadlineWatcher(None, clock, Metrics(), WatcherSection())  # type: ignore[arg-type]
    at = clock.now_us() + 100_000
    assert watcher._wait([b"a", str(at).encode()], [], 1) == pytest.approx(0.1)
    assert watcher._wait([[b"a", float(at)]], [], 1) == pytest.approx(0.1)
    assert watcher._wait([], [[b"b", float(at - 50_000)]], 2) == pytest.approx(0.05)
    assert watcher._wait([], [], 0) == 0.25
    assert watcher._wait([b"a", str(at - 1_000_000).encode()], [], 1) == 0.0
