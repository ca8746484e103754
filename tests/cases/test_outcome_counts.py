"""The dashboard's outcome steps taken by the events' writers: ``stamp.lua`` (answers, replies,
abandoned calls), ``claim.lua`` (the watcher's breaches) and ``emit.lua`` (a close through the
API) move the contact's counters in the same atomic call that appends the event, and mark it
``counted``; the dashboard's reader skips
such an event without reading the contact, and counts it the old way when its writer is of an
older version (a rolling upgrade). A step taken twice (an older reader reading a counted event)
changes nothing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.cases.dashboard.aggregates import Counts, read_window
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK, FixedClock
from gateway.queueing.outcomes import step_of
from gateway.queueing.store import _CLEARS, SCRIPTS
from gateway.records import Event, Inbound, Sender
from tests.cases.conftest import API, Client
from tests.cases.test_aggregate_upgrade import _old_aggregator_class
from tests.cases.test_intake_counts import QUIET, reads
from tests.cases.test_watcher import own_watcher

OLD_STAMP = (Path(__file__).parents[1] / "queueing" / "data" / "stamp_d9e5dfd.lua").read_text()
OLD_EMIT = (Path(__file__).parents[1] / "queueing" / "data" / "emit_9c2fbfa.lua").read_text()
MINUTE = 60 * MICROS_PER_SECOND


def sms(n: int, at: int) -> Inbound:
    return Inbound(
        channel="sms", adapter="test", external_id=f"o{n}", sender=Sender(f"+8613900{n:06d}"),
        recipient="12345", received_at=at, text="路灯坏了",
    )


async def counts(gw: Any, at: int) -> Counts:
    return (await read_window(gw.redis, gw.keys, at - MINUTE, at + MINUTE))["sms"]


async def calls(gw: Any, name: str) -> int:
    stats = await gw.redis.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))


def steps_failed(gw: Any, writer: str) -> float | None:
    """``gateway_dashboard_steps_failed_total`` of ``writer`` as scraped."""
    return gw.metrics.registry.get_sample_value(  # type: ignore[no-any-return]
        "gateway_dashboard_steps_failed_total", {"writer": writer}
    )


async def driven(start_gateway: Any, clock: Any = SYSTEM_CLOCK) -> tuple[Any, Any]:
    """A gateway (SMS answered within 3 minutes, no watcher of its own) and its dashboard
    reader, stopped: the test drives it."""
    gw = await start_gateway(api=API, clock=clock, watcher=QUIET, sla={"sms_response": "3m"})
    reader = gw.cases.aggregator
    await reader.stop()
    await reader.ensure_group()
    return gw, reader


async def test_an_answer_is_counted_with_its_stamp_and_the_reader_skips_it(
    start_gateway: Any,
) -> None:
    gw, reader = await driven(start_gateway)
    at = SYSTEM_CLOCK.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(3)]
    assert await reader.catch_up() == 3
    for cid in ids[:2]:
        assert await gw.queue.stamp(cid, "responded", at + 5 * MICROS_PER_SECOND, "test")
    # counted with the stamp: before any reader has read the events
    now = await counts(gw, at)
    assert (now.volume, now.get("within"), now.settled) == (3, 2, 2)
    assert now.bins == {5: 2} and now.tsum_ms == 10_000
    assert await gw.redis.zcard(gw.keys.agg_open("sms")) == 1
    entries = await gw.redis.xrange(gw.keys.events)
    assert [f.get(b"counted") for _, f in entries[-2:]] == [b"1", b"1"]
    # the same stamp again writes nothing and counts nothing
    assert await gw.queue.stamp(ids[0], "responded", at + 6 * MICROS_PER_SECOND, "test") is None
    hmgets, evalsha = await reads(gw), await calls(gw, "evalsha")
    assert await reader.catch_up() == 2
    assert await reads(gw) == hmgets  # the contacts not read
    assert await calls(gw, "evalsha") == evalsha + 1  # advance.lua only: no aggregate.lua
    after = await counts(gw, at)
    assert (after.volume, after.get("within"), after.bins) == (3, 2, {5: 2})


async def close(gw: Any, cid: str) -> int:
    """Close the contact through the API (``POST /v1/contacts/{id}/events``); the status."""
    async with aiohttp.ClientSession() as session:
        client = Client(session, f"http://127.0.0.1:{gw.http_port}")
        status, _ = await client.call(
            "POST", f"/v1/contacts/{cid}/events", "/v1/contacts/{contact_id}/events",
            token="replier", json_body={"type": "closed"},
        )
    return status


async def test_a_close_through_the_api_is_counted_with_its_event(start_gateway: Any) -> None:
    """``emit.lua`` takes a close's step in the call that appends it and marks it counted (the
    route's caller read the facts first); a close after the deadline moves nothing, and is
    marked all the same; the reader reads no contact for them; a second close writes
    nothing."""
    clock = FixedClock()
    gw, reader = await driven(start_gateway, clock)
    at = clock.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(3)]
    assert await reader.catch_up() == 3
    clock.advance(60)
    assert [await close(gw, cid) for cid in ids[:2]] == [201, 201]
    now = await counts(gw, at)  # counted with the close: before any reader has read it
    assert (now.volume, now.get("closed"), now.settled) == (3, 2, 0)
    assert await gw.redis.zcard(gw.keys.agg_open("sms")) == 1
    assert await close(gw, ids[0]) == 200  # once: nothing written, nothing counted
    clock.advance(180)  # past the third contact's 3 minutes: a late close moves nothing
    assert await close(gw, ids[2]) == 201
    entries = await gw.redis.xrange(gw.keys.events)
    closes = [f for _, f in entries if f[b"type"] == b"closed"]
    assert [f.get(b"counted") for f in closes] == [b"1", b"1", b"1"]
    hmgets, evalsha = await reads(gw), await calls(gw, "evalsha")
    assert await reader.catch_up() == 3
    assert await reads(gw) == hmgets  # the contacts not read
    assert await calls(gw, "evalsha") == evalsha + 1  # advance.lua only: no aggregate.lua
    after = await counts(gw, at)
    assert (after.volume, after.get("closed")) == (3, 2)
    assert await gw.redis.zcard(gw.keys.agg_open("sms")) == 1  # the late one stays open
    # an event with no step (the late close, every delivery report) runs emit.lua without the
    # step's code, which costs Valkey a few µs a call to define
    assert "function agg_step" not in SCRIPTS["emit"]
    assert SCRIPTS["emit_step"].endswith(SCRIPTS["emit"])


async def test_a_close_of_an_older_writer_is_stepped_by_the_reader(start_gateway: Any) -> None:
    """A rolling upgrade: a close appended by the previous version's ``emit.lua`` (no step, no
    mark) is stepped by this version's reader; this version's marked close read by an older
    reader (01aed18's aggregator) is stepped again, which changes nothing."""
    gw, reader = await driven(start_gateway)
    old = _old_aggregator_class()(gw.queue, SYSTEM_CLOCK, gw.settings.sla, "old-1",
                                  surge=gw.cases.surge)
    await old.ensure_group()
    at = SYSTEM_CLOCK.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(3)]
    assert await reader.catch_up() == 3
    k = gw.keys
    sha = await gw.redis.script_load(OLD_EMIT)
    event = Event(ids[0], "closed", at + MICROS_PER_SECOND, "old").to_json()
    assert await gw.redis.evalsha(sha, 4, k.events, k.contact(ids[0]), k.deadlines,
                                  k.warnings, ids[0], "closed", event, "1")
    assert (await counts(gw, at)).get("closed") == 0  # not stepped by its writer
    await gw.queue.emit(Event(ids[1], "closed", at + MICROS_PER_SECOND, "new"))
    assert (await counts(gw, at)).get("closed") == 1
    assert await reader.catch_up() == 2
    assert (await counts(gw, at)).get("closed") == 2
    await old.catch_up()  # the older reader: every event again, stepped its way
    final = await counts(gw, at)
    assert (final.volume, final.get("closed")) == (3, 2)
    assert await gw.redis.zcard(k.agg_open("sms")) == 1


async def test_a_breach_is_counted_with_its_claim(start_gateway: Any) -> None:
    clock = FixedClock()
    gw, reader = await driven(start_gateway, clock)
    at = clock.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(3)]
    clock.advance(200)
    now = clock.now_us()
    watcher = own_watcher(gw, clock)
    # the third contact's hash expires between the watcher's read of it and its claim: the
    # breach is written, the hash not made again, no step taken
    k, due = gw.keys, at + 180 * MICROS_PER_SECOND
    step = step_of(k, 0, ids[2], "breached", now, False, 200_000, received=at, due=due,
                   kind="response", channel="sms")
    body = Event(ids[2], "breached", now, "watcher", due_at=due, elapsed_ms=200_000,
                 met=False).to_json()
    await gw.redis.delete(k.contact(ids[2]))
    assert await watcher._claim_all(k.deadlines, k.warnings, [(ids[2], body, "sms", due)],
                                    now, "breached", {ids[2]: step}) == [1]
    assert not await gw.redis.exists(k.contact(ids[2]))
    assert await watcher.tick() == 2
    counted = await counts(gw, at)
    assert (counted.volume, counted.get("breached")) == (3, 2)  # the expired one: opened only
    assert await gw.redis.zcard(k.agg_breaches) == 2
    breaches = {f[b"contact_id"].decode(): f for _, f in await gw.redis.xrange(k.events)
                if f[b"type"] == b"breached"}
    assert {cid: f.get(b"counted") for cid, f in breaches.items()} == {
        ids[0]: b"1", ids[1]: b"1", ids[2]: None
    }
    hmgets = await reads(gw)
    await reader.catch_up()
    assert await reads(gw) == hmgets + 1  # the expired contact's event only: found gone
    after = await counts(gw, at)
    assert (after.volume, after.get("breached")) == (3, 2)
    # a reply after the breach still moves the contact, once: late
    assert await gw.queue.stamp(ids[0], "responded", clock.now_us(), "test")
    late = await counts(gw, at)
    assert (late.get("breached"), late.get("late")) == (1, 1)


async def test_a_close_whose_step_fails_is_written_once_and_logged(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Data the step does not expect (a malformed ``agg`` field): the close is written once
    all the same, its deadline cleared, and the gateway says so."""
    gw, _ = await driven(start_gateway)
    at = SYSTEM_CLOCK.now_us()
    cid = (await gw.intake.submit(sms(0, at))).contact_id
    await gw.redis.hset(gw.keys.contact(cid), "agg", "bogus")
    event = Event(cid, "closed", at + MICROS_PER_SECOND, "test")
    with caplog.at_level(logging.WARNING):
        await gw.queue.emit(event)
        await gw.queue.emit(event)  # the same event again (a spooled copy): written once
    assert any(f"emit: closed of contact {cid} written, its wallboard step failed"
               in r.getMessage() for r in caplog.records)
    assert steps_failed(gw, "emit") == 1  # the copy wrote nothing: no step to fail
    assert steps_failed(gw, "stamp") == steps_failed(gw, "watcher") == 0
    closes = [f for _, f in await gw.redis.xrange(gw.keys.events) if f[b"type"] == b"closed"]
    assert len(closes) == 1 and closes[0][b"counted"] == b"1"
    assert await gw.redis.zscore(gw.keys.deadlines, cid) is None


async def test_older_writers_and_readers_beside_the_counted_events(start_gateway: Any) -> None:
    """A rolling upgrade: an older instance's stamp (d9e5dfd's ``stamp.lua``: no step, no mark)
    is stepped by this version's reader; an older reader (01aed18's aggregator) given this
    version's counted events steps them again, which changes nothing."""
    gw, reader = await driven(start_gateway)
    old = _old_aggregator_class()(gw.queue, SYSTEM_CLOCK, gw.settings.sla, "old-1",
                                  surge=gw.cases.surge)
    await old.ensure_group()
    at = SYSTEM_CLOCK.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(2)]
    sha = await gw.redis.script_load(OLD_STAMP)
    answered = at + 7 * MICROS_PER_SECOND
    event = Event(ids[1], "responded", answered, "old", due_at=at + 180 * MICROS_PER_SECOND,
                  elapsed_ms=7000, met=True)
    k = gw.keys
    assert await gw.redis.evalsha(
        sha, 4, k.contact(ids[1]), k.deadlines, k.warnings, k.events,
        ids[1], "responded", answered, event.to_json(), "1",
    ) == 1
    assert await gw.queue.stamp(ids[0], "responded", answered, "new")
    assert (await counts(gw, at)).get("within") == 1  # the new one's only, so far
    await reader.catch_up()
    both = await counts(gw, at)
    assert (both.volume, both.get("within"), both.bins) == (2, 2, {7: 2})
    # the older reader, from the group's start: every event again
    await gw.redis.xgroup_setid(k.events, "gateway-aggregate", "0")
    hmgets = await reads(gw)
    while await old.poll():
        pass
    assert await reads(gw) > hmgets  # it read the contacts and stepped their events again
    again = await counts(gw, at)
    assert (again.volume, again.get("within"), again.bins) == (2, 2, {7: 2})


async def test_calls_answered_and_abandoned_are_counted_with_their_stamps(
    start_gateway: Any,
) -> None:
    """A call's stamps: an answer in time is `within`, an abandon before ``short_abandon`` is
    `short`, one after it `abandoned`; each leaves the waiting set, in the stamp's call."""
    gw = await start_gateway(
        api=API, watcher=QUIET, sla={"voice_answer": "15s", "short_abandon": "5s"}
    )
    await gw.cases.aggregator.stop()
    at = SYSTEM_CLOCK.now_us()
    ids = [(await gw.intake.submit(Inbound(
        channel="voice", adapter="test", external_id=f"call-{n}",
        sender=Sender(f"+8613900{n:06d}"), recipient="12345", received_at=at,
    ))).contact_id for n in range(4)]
    assert await gw.redis.zcard(gw.keys.agg_waiting) == 4
    s = MICROS_PER_SECOND
    assert await gw.queue.stamp(ids[0], "answered", at + 3 * s, "pbx")
    assert await gw.queue.stamp(ids[1], "abandoned", at + 2 * s, "pbx")
    assert await gw.queue.stamp(ids[2], "abandoned", at + 8 * s, "pbx")
    calls = (await read_window(gw.redis, gw.keys, at - MINUTE, at + MINUTE))["voice"]
    assert (calls.volume, calls.get("within"), calls.get("short"), calls.get("abandoned")) == (
        4, 1, 1, 1
    )
    assert calls.bins == {3: 1}
    assert await gw.redis.zrange(gw.keys.agg_waiting, 0, -1) == [ids[3].encode()]


async def test_a_step_that_fails_leaves_the_claim_and_the_stamp_written_once(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Data a step does not expect (here a malformed ``agg`` field): the breach and the stamp
    are written once all the same, their deadlines cleared, and the other contacts of the
    claim counted (Valkey keeps what a script wrote before an error, so a claim that failed
    after its events appended them again at each retry)."""
    clock = FixedClock()
    gw, _ = await driven(start_gateway, clock)
    at = clock.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(4)]
    await gw.redis.hset(gw.keys.contact(ids[1]), "agg", "bogus")
    await gw.redis.hset(gw.keys.contact(ids[3]), "agg", "bogus")
    assert await gw.queue.stamp(ids[3], "responded", at + MICROS_PER_SECOND, "test")
    assert await gw.queue.stamp(ids[3], "responded", at + MICROS_PER_SECOND, "test") is None
    clock.advance(200)
    watcher = own_watcher(gw, clock)
    with caplog.at_level(logging.WARNING):
        assert await watcher.tick() == 3
    assert await watcher.tick() == 0
    said = [r.getMessage() for r in caplog.records]
    assert any(f"responded of contact {ids[3]} written, its wallboard step failed" in m
               for m in said)
    assert "watcher: 1 breached events written, their wallboard steps failed" in " ".join(said)
    assert (steps_failed(gw, "stamp"), steps_failed(gw, "watcher")) == (1, 1)
    written = [(f[b"contact_id"].decode(), f[b"type"])
               for _, f in await gw.redis.xrange(gw.keys.events) if f[b"type"] != b"enqueued"]
    assert sorted(written) == sorted([
        (ids[3], b"responded"), (ids[0], b"breached"), (ids[1], b"breached"),
        (ids[2], b"breached"),
    ])
    assert await gw.redis.zcard(gw.keys.deadlines) == 0
    assert (await counts(gw, at)).get("breached") == 2  # ids[0] and ids[2]


async def test_a_claim_with_members_with_and_without_steps(start_gateway: Any) -> None:
    """``claim.lua`` numbers the steps of the members that have one: the first and third
    members' steps are taken, the second's event is written unmarked (the reader steps it)."""
    clock = FixedClock()
    gw, reader = await driven(start_gateway, clock)
    at = clock.now_us()
    ids = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(3)]
    await reader.catch_up()
    clock.advance(200 + 10 * 60)  # the three breached, at different elapsed times below
    now = clock.now_us()
    k, due = gw.keys, at + 180 * MICROS_PER_SECOND
    calls, steps = [], {}
    for n, cid in enumerate(ids):
        body = Event(cid, "breached", now, "watcher", due_at=due, met=False).to_json()
        calls.append((cid, body, "sms", due))
        if n != 1:
            steps[cid] = step_of(k, 0, cid, "breached", now, False, None, received=at, due=due,
                                 kind="response", channel="sms")
    watcher = own_watcher(gw, clock)
    assert await watcher._claim_all(k.deadlines, k.warnings, calls, now, "breached",
                                    steps) == [1, 1, 1]
    marks = {f[b"contact_id"].decode(): f.get(b"counted")
             for _, f in await gw.redis.xrange(k.events) if f[b"type"] == b"breached"}
    assert marks == {ids[0]: b"1", ids[1]: None, ids[2]: b"1"}
    assert [await gw.redis.hget(k.contact(c), "agg") for c in ids] == [
        b"breached:3", b"open:0", b"breached:3"
    ]
    await reader.catch_up()
    assert [await gw.redis.hget(k.contact(c), "agg") for c in ids] == [b"breached:3"] * 3
    assert (await counts(gw, at)).get("breached") == 3


OLD_CLAIM = (Path(__file__).parents[1] / "queueing" / "data" / "claim_d9e5dfd.lua").read_text()


class OldWriter:
    """The previous versions' ``stamp.lua`` and the watcher's ``claim.lua`` (d9e5dfd's) and
    ``emit.lua`` (9c2fbfa's): the same events, no step taken, no mark."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw

    async def load(self) -> None:
        self.stamp_sha = await self.gw.redis.script_load(OLD_STAMP)
        self.claim_sha = await self.gw.redis.script_load(OLD_CLAIM)
        self.emit_sha = await self.gw.redis.script_load(OLD_EMIT)

    async def close(self, cid: str, at: int) -> None:
        k = self.gw.keys
        assert await self.gw.redis.evalsha(
            self.emit_sha, 4, k.events, k.contact(cid), k.deadlines, k.warnings,
            cid, "closed", Event(cid, "closed", at, "api").to_json(), "1",
        )

    async def stamp(self, cid: str, type_: str, at: int) -> None:
        k = self.gw.keys
        received, due, kind = await self.gw.redis.hmget(
            k.contact(cid), ["received_us", "due_us", "kind"]
        )
        kind = kind.decode()
        event = Event(cid, type_, at, "old", due_at=int(due),
                      elapsed_ms=max(0, (at - int(received)) // 1000),
                      met=at <= int(due) and (kind != "answer" or type_ == "answered"))
        clears = "1" if type_ in _CLEARS.get(kind, ()) else "0"
        assert await self.gw.redis.evalsha(
            self.stamp_sha, 4, k.contact(cid), k.deadlines, k.warnings, k.events,
            cid, type_, at, event.to_json(), clears,
        ) == 1

    async def breach(self, now: int) -> int:
        k = self.gw.keys
        ids = [i.decode() for i in await self.gw.redis.zrangebyscore(k.deadlines, "-inf", now)]
        args: list[Any] = [now, "breached"]
        for cid in ids:
            received, due, kind = await self.gw.redis.hmget(
                k.contact(cid), ["received_us", "due_us", "kind"]
            )
            args += [cid, Event(cid, "breached", now, "watcher", due_at=int(due),
                                elapsed_ms=max(0, (now - int(received)) // 1000), met=False,
                                detail={"kind": kind.decode()}).to_json()]
        keys = [k.deadlines, k.events, k.warnings, *(k.contact(c) for c in ids)]
        return sum(await self.gw.redis.evalsha(self.claim_sha, len(keys), *keys, *args))


async def test_the_writers_steps_count_as_the_readers_did(start_gateway: Any) -> None:
    """One history through this version's writers (stamp.lua, claim.lua, emit.lua: steps
    taken at the write) and through the previous versions' writers and an older aggregator
    (01aed18's: its own Python builds every step): every counter, bin and set of the
    wallboard comes out the same."""
    clock = FixedClock()
    sections: dict[str, Any] = {
        "api": API, "watcher": QUIET,
        "sla": {"sms_response": "3m", "voice_answer": "15s", "short_abandon": "5s"},
    }
    new = await start_gateway(clock=clock, **sections)
    prefix = new.keys.prefix
    old = await start_gateway(clock=clock, redis={"prefix": f"{prefix}-old"}, **sections)
    writer = OldWriter(old)
    await writer.load()
    at = clock.now_us()
    s = MICROS_PER_SECOND
    ids: dict[str, list[str]] = {}
    old_reader = _old_aggregator_class()(old.queue, clock, old.settings.sla, "old-1",
                                         surge=old.cases.surge)
    for gw in (new, old):
        await gw.cases.aggregator.stop()
    await new.cases.aggregator.ensure_group()
    await old_reader.ensure_group()
    for name, gw in (("new", new), ("old", old)):
        def call(n: int) -> Inbound:
            return Inbound(
                channel="voice", adapter="test", external_id=f"v{n}",
                sender=Sender(f"+8613800{n:06d}"), recipient="12345", received_at=at,
            )

        ids[name] = [(await gw.intake.submit(sms(n, at))).contact_id for n in range(4)] + [
            (await gw.intake.submit(call(n))).contact_id for n in range(4)
        ] + [(await gw.intake.submit(sms(4, at))).contact_id,
             (await gw.intake.submit(call(4))).contact_id]
    # (contact, type, seconds after arrival): sms 0-3 and 8, calls 4-7 and 9
    history: list[tuple[int | None, str, int]] = [
        (4, "answered", 3), (5, "abandoned", 2), (6, "abandoned", 8), (9, "closed", 6),
        (7, "answered", 20), (7, "responded", 25), (8, "closed", 40), (0, "responded", 60),
        (2, "closed", 90), (None, "breached", 190), (1, "responded", 200),
        (2, "responded", 230),
    ]
    for n, type_, after in history:
        when = at + after * s
        if n is None:  # the watcher's sweep: sms 1 and 3 are past their deadline unanswered
            clock.advance((when - clock.now_us()) / s)
            assert await own_watcher(new, clock).tick() == 2
            assert await writer.breach(clock.now_us()) == 2
        elif type_ == "closed":  # through the API: emit.lua's, stepped by the old reader
            await new.queue.emit(Event(ids["new"][n], "closed", when, "api"))
            await writer.close(ids["old"][n], when)
        else:
            assert await new.queue.stamp(ids["new"][n], type_, when, "test") is not None
            await writer.stamp(ids["old"][n], type_, when)

    async def board(gw: Any, mine: list[str]) -> tuple[Any, ...]:
        k, index = gw.keys, {c.encode(): n for n, c in enumerate(mine)}

        async def members(key: str) -> list[tuple[int, float]]:
            return sorted((index[m], v) for m, v in await gw.redis.zrange(key, 0, -1,
                                                                          withscores=True))

        window = await read_window(gw.redis, gw.keys, at - MINUTE, at + MINUTE)
        for c in window.values():  # a field moved +1 then -1 (in the reader's order) is 0
            c.outcomes = {o: v for o, v in c.outcomes.items() if v}
        return (
            window,
            await members(k.agg_open("sms")), await members(k.agg_open("voice")),
            await members(k.agg_waiting), await members(k.agg_breaches),
            [await gw.redis.hget(k.contact(c), "agg") for c in mine],
        )

    # every step of this version's history was taken by its writers: the board is whole
    # before its reader has read a single outcome event (a close left for the reader to
    # step, as before this version, would make the boards differ here)
    early = await board(new, ids["new"])
    await new.cases.aggregator.catch_up()
    while await old_reader.poll():
        pass
    mine, theirs = await board(new, ids["new"]), await board(old, ids["old"])
    assert mine == theirs == early
    window = mine[0]
    assert (window["sms"].get("within"), window["sms"].get("late"),
            window["sms"].get("breached")) == (1, 2, 1)
    assert (window["voice"].get("within"), window["voice"].get("late"),
            window["voice"].get("short"), window["voice"].get("abandoned")) == (1, 1, 1, 1)
    # closed in time and nothing after: the sms and the call (whose wait it ended)
    assert (window["sms"].get("closed"), window["voice"].get("closed")) == (1, 1)
    assert mine[5][8] == mine[5][9] == b"closed:1"
    assert mine[3] == []  # no call waits


async def test_a_key_of_another_type_costs_the_stamps_other_writes_nothing(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The step's writes after it moved the contact (the flush) each under its own guard: the
    minute bucket made a string here, the hour bucket still counts the reply; the stamp is
    written and marked, and the gateway says the step failed."""
    gw, _ = await driven(start_gateway)
    at = SYSTEM_CLOCK.now_us()
    cid = (await gw.intake.submit(sms(0, at))).contact_id
    minute_s = at // MICROS_PER_SECOND // 60 * 60
    minute = gw.keys.agg_bucket("m", minute_s)
    await gw.redis.delete(minute)
    await gw.redis.set(minute, "not a hash")
    with caplog.at_level(logging.WARNING):
        assert await gw.queue.stamp(cid, "responded", at + 5 * MICROS_PER_SECOND, "test")
    assert any("its wallboard step failed" in r.getMessage() for r in caplog.records)
    assert steps_failed(gw, "stamp") == 1
    hour = await gw.redis.hgetall(gw.keys.agg_bucket("h", minute_s - minute_s % 3600))
    assert hour[b"sms:within"] == b"1" and hour[b"sms:t:5"] == b"1"
    assert await gw.redis.hget(gw.keys.contact(cid), "agg") == b"within:4"
    (_, fields), = await gw.redis.xrevrange(gw.keys.events, count=1)
    assert fields[b"counted"] == b"1"
