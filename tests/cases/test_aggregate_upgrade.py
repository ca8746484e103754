"""The dashboard aggregator as one cursor reader (``XREAD`` after ``{p}:agg:cursor``, moved with
``advance.lua``), beside the previous version during a rolling upgrade.

The previous version (kept in ``data/``, as of 01aed18: ``aggregates_01aed18.py`` and
``tests/queueing/data/intake_01aed18.lua``) reads ``{p}:events`` in the consumer group
``gateway-aggregate`` on every instance; its ``intake.lua`` writes a new contact's surge keys
in the ``enqueued`` event's field ``surge`` and a ``surge`` mark in the hash, which the first
aggregator to ``HDEL`` it counts. This version's intake writes them in field ``keys`` with no
mark, and one reader counts them with its cursor's move. Old and new scripts and readers on
one Redis, in every order: each contact's surge keys count once, its volume once, and the
group's position and entries-read counter follow the new reader (what the trimming and the
backlog read)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis

from gateway.cases.dashboard.aggregates import (
    GROUP,
    LEASE,
    STEP_CHUNK,
    Aggregator,
    read_window,
)
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import AGG_BUCKET_TTL_S
from gateway.queueing.store import Prepared, RedisQueue, connect
from gateway.records import Event, Inbound, Sender
from gateway.testing import eventually
from tests.cases.conftest import API
from tests.cases.test_intake_counts import QUIET, surge_total
from tests.harness import ServerRelay

DATA = Path(__file__).parent / "data"
OLD_INTAKE = (Path(__file__).parents[1] / "queueing" / "data" / "intake_01aed18.lua").read_text()
OLD_EMIT = (Path(__file__).parents[1] / "queueing" / "data" / "emit_9c2fbfa.lua").read_text()
MINUTE = 60 * MICROS_PER_SECOND


def _old_aggregator_class() -> Any:
    path = DATA / "aggregates_01aed18.py"
    spec = importlib.util.spec_from_file_location("aggregates_01aed18", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return module.Aggregator


def _inbound(name: str, received_at: int, n: int) -> Inbound:
    return Inbound(
        channel="sms", adapter="test", external_id=name, sender=Sender(f"+86139000011{n:02d}"),
        recipient="12345", received_at=received_at, text="路灯坏了",
    )


async def _old_write(queue: RedisQueue, sha: str, p: Prepared) -> None:
    """Write ``p`` as the previous version did (the same keys and arguments, its script)."""
    own_keys, own = queue._encode(p, SYSTEM_CLOCK.now_us(), "2026-12-01T00:00:00.000000Z")
    keys = [*queue._fixed, *own_keys]
    args = [1, queue.dedupe_ttl, queue.repeat_window_s * MICROS_PER_SECOND, queue.retention_s,
            AGG_BUCKET_TTL_S, len(own_keys), len(own), *own]
    ((status, _, _),) = await queue.redis.evalsha(sha, len(keys), *keys, *args)
    assert status == 1


async def _group(gw: Any) -> dict[str, Any]:
    (mine,) = [g for g in await gw.redis.xinfo_groups(gw.keys.events)
               if g["name"] in (GROUP, GROUP.encode())]
    return dict(mine)


async def _calls(gw: Any, *names: str) -> dict[str, int]:
    stats = await gw.redis.info("commandstats")
    return {n: int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in names}


async def test_old_and_new_intake_and_aggregators_count_each_contact_once(
    start_gateway: Any,
) -> None:
    gw = await start_gateway(api=API, watcher=QUIET)
    await gw.cases.aggregator.stop()  # driven here
    queue, surge = gw.queue, gw.cases.surge
    new = gw.cases.aggregator
    old = _old_aggregator_class()(queue, SYSTEM_CLOCK, gw.settings.sla, "old-1", surge=surge)
    await old.ensure_group()
    await new.ensure_group()
    sha = await gw.redis.script_load(OLD_INTAKE)
    base = SYSTEM_CLOCK.now_us() // MINUTE * MINUTE
    contacts = [gw.intake.prepare(_inbound(f"c{n}", base + n, n)) for n in range(8)]

    async def write(p: Prepared, by_old: bool) -> None:
        if by_old:
            await _old_write(queue, sha, p)
        else:
            (receipt,) = await queue.write_batch([p])
            assert receipt.created

    # old and new instances write; an old aggregator reads first, then the new one
    for n, p in enumerate(contacts[:4]):
        await write(p, by_old=n % 2 == 0)
    entries = await gw.redis.xrange(gw.keys.events)
    assert [b"surge" in f for _, f in entries] == [True, False, True, False]
    assert [b"keys" in f for _, f in entries] == [False, True, False, True]
    await old.poll()  # takes the old contacts' marks: counts them; skips the new ones
    assert await surge_total(gw) == 2
    await new.poll()  # counts the new ones with its cursor; the old ones' marks are gone
    assert await surge_total(gw) == 4
    # now the new one first, then the old one (the group moved back by the new reader's SETID:
    # the old one reads again what the new one read)
    for n, p in enumerate(contacts[4:]):
        await write(p, by_old=n % 2 == 1)
    await new.poll()
    assert await surge_total(gw) == 8
    group = await _group(gw)  # where the new reader is, with the count the trimming reads
    assert group["entries-read"] == await gw.redis.xlen(gw.keys.events) and group["lag"] == 0
    await gw.redis.xgroup_setid(gw.keys.events, GROUP, "0")  # every entry handed out again
    while await old.poll():
        pass
    assert await surge_total(gw) == 8
    # the new reader given every entry again (at or before its cursor): nothing counts
    await new.process(await gw.redis.xrange(gw.keys.events))
    assert await surge_total(gw) == 8
    counts = await read_window(gw.redis, gw.keys, base, base + MINUTE)
    assert {k: v.volume for k, v in counts.items()} == {"sms": 8}
    for p in contacts:  # no mark left behind: the old ones' taken, the new ones' never made
        assert await gw.redis.hget(gw.keys.contact(p.id), "surge") is None
    assert (await _group(gw))["pending"] == 0  # the old one acknowledged what it read


async def test_a_batch_read_by_two_readers_counts_once(start_gateway: Any) -> None:
    """Two readers from one cursor (a lease handed over while its old holder still reads):
    the second's move finds the cursor moved, writes nothing, and reads on from there."""
    gw = await start_gateway(api=API, watcher=QUIET)
    await gw.cases.aggregator.stop()
    one = gw.cases.aggregator
    two = Aggregator(gw.queue, SYSTEM_CLOCK, gw.settings.sla, "two", surge=gw.cases.surge)
    await one.ensure_group()
    await two.ensure_group()
    base = SYSTEM_CLOCK.now_us()
    for n in range(3):
        await gw.intake.submit(_inbound(f"a{n}", base + n, n))
    assert await one.poll() == 3
    assert await two.poll() == 3  # read from the same place: its move is refused
    assert await surge_total(gw) == 3
    await gw.intake.submit(_inbound("a3", base + 3, 3))
    assert await two.poll() == 1  # on from where the first one left the cursor
    assert await one.poll() == 1  # its own cursor was behind: refused again, then on
    assert await one.poll() == 0
    assert await surge_total(gw) == 4


async def test_new_contacts_cost_the_aggregator_no_command_of_their_own(
    start_gateway: Any,
) -> None:
    """A batch of this version's new contacts: no HDEL a contact, no consumer group read or
    acknowledgement (no pending list), one script call that moves the cursor and counts."""
    gw = await start_gateway(api=API, watcher=QUIET)
    aggregator = gw.cases.aggregator
    await aggregator.stop()
    await aggregator.ensure_group()
    base = SYSTEM_CLOCK.now_us()
    for n in range(20):
        await gw.intake.submit(_inbound(f"n{n}", base + n, n))
    names = ("hdel", "xack")
    before = await _calls(gw, *names)
    assert await aggregator.poll() == 20
    assert await _calls(gw, *names) == before
    assert await surge_total(gw) == 20
    group = await _group(gw)
    assert group["pending"] == 0 and group["lag"] == 0
    assert group["entries-read"] == await gw.redis.xlen(gw.keys.events)
    # the reader is no consumer of the group: nothing handed out to it, nothing pending
    assert await gw.redis.xinfo_consumers(gw.keys.events, GROUP) == []


async def test_one_instance_of_a_fleet_reads_and_another_takes_over(start_gateway: Any) -> None:
    """Lease ``aggregate``: one of two instances reads; when it stops, the other reads on from
    the cursor, and every contact counts once."""
    one = await start_gateway(api=API, watcher=QUIET)
    two = await start_gateway(api=API, watcher=QUIET)
    base = SYSTEM_CLOCK.now_us()

    async def counted(n: int) -> bool:
        return await surge_total(one) == n

    for n in range(3):
        await one.intake.submit(_inbound(f"f{n}", base + n, n))
    await eventually(lambda: counted(3))
    holders = [gw for gw in (one, two) if LEASE in gw.leases.held]
    assert len(holders) == 1
    (reader,) = holders
    other = two if reader is one else one
    await reader.cases.aggregator.stop()  # its lease released: the other takes over
    for n in range(3, 6):
        await other.intake.submit(_inbound(f"f{n}", base + n, n))
    await eventually(lambda: counted(6))
    assert LEASE in other.leases.held and LEASE not in reader.leases.held
    counts = await read_window(one.redis, one.keys, base - MINUTE, base + MINUTE)
    assert {k: v.volume for k, v in counts.items()} == {"sms": 6}


class RoundTrips(ServerRelay):
    """A relay in front of the embedded server that counts round trips: commands a client
    sends while none of its earlier commands waits for its reply start one, however many
    commands and segments follow before the replies (both directions parsed as RESP)."""

    def __init__(self, server: EmbeddedRedis) -> None:
        super().__init__(server)
        self.trips = 0
        self.counts: list[int] = []
        """The ``COUNT`` of each ``XREAD`` sent, in order."""

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream.socket))
        waiting = [0]  # this connection's commands sent and not yet answered
        more = object()  # what a parser gives while a message is not whole (False is a reply)
        parsers = {up: hiredis.Reader(notEnoughData=more) for up in (True, False)}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, up: bool) -> None:
            parser = parsers[up]
            try:
                while data := await source.read(65536):
                    parser.feed(data)
                    while (message := parser.gets()) is not more:
                        if up:
                            if waiting[0] == 0:
                                self.trips += 1
                            waiting[0] += 1
                            if message[0].upper() == b"XREAD":
                                self.counts.append(int(message[2]))
                        elif not isinstance(message, hiredis.PushNotification):
                            waiting[0] -= 1
                    sink.write(data)
                    await sink.drain()
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False),
                             return_exceptions=True)


@contextlib.asynccontextmanager
async def relayed_reader(
    gw: Any, server: EmbeddedRedis, batch: int = 200, most: int = 0
) -> AsyncIterator[tuple[RoundTrips, Aggregator]]:
    """The gateway's own reader stopped, and a reader of ``batch`` events at a time (up to
    ``most`` while behind) over a ``RoundTrips`` relay (its own queue and client), closed
    after."""
    await gw.cases.aggregator.stop()
    relay = RoundTrips(server)
    client = connect(gw.settings.redis, await relay.start())
    queue = RedisQueue(client, gw.keys, SYSTEM_CLOCK, source="relayed", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=86400, maxlen=100_000)
    try:
        yield relay, Aggregator(queue, SYSTEM_CLOCK, gw.settings.sla, "relayed",
                                surge=gw.cases.surge, batch=batch, most=most)
    finally:
        await queue.aclose()
        await client.aclose()
        relay.close()


async def test_a_full_batch_reads_the_next_in_the_round_trip_of_its_move(
    start_gateway: Any, redis_server: EmbeddedRedis
) -> None:
    """Under a backlog every batch is full: the next one's ``XREAD`` goes behind the
    ``advance.lua`` call that moves the cursor past this one, so a batch costs one round trip,
    not two (a reader in a busy gateway waits tens of ms for each). (Reads of 50 throughout:
    the next test has them grow.)"""
    gw = await start_gateway(api=API, watcher=QUIET)
    async with relayed_reader(gw, redis_server, batch=50, most=50) as (relay, reader):
        queue = reader.queue
        base = SYSTEM_CLOCK.now_us()
        await asyncio.gather(*(  # each from a sender of its own: 230 events, no more
            gw.intake.submit(dataclasses.replace(
                _inbound(f"r{n}", base + n, 0), sender=Sender(f"+8613900{n:06d}")
            )) for n in range(230)
        ))
        assert await gw.redis.xlen(gw.keys.events) == 230
        await reader.ensure_group()
        await queue.load_scripts()
        relay.trips = 0
        assert await reader.catch_up() == 230
        # the first read alone; the second to fourth batches (50 each) read with the move of
        # the batch before, the fifth (30) with the fourth's; the fifth's move reads nothing
        # on (not full): one read more to find the end
        assert relay.trips == 1 + 5 + 1
        assert await surge_total(gw) == 230
        group = await _group(gw)
        assert group["lag"] == 0 and group["entries-read"] == await gw.redis.xlen(gw.keys.events)
        counts = await read_window(gw.redis, gw.keys, base - MINUTE, base + MINUTE)
        assert {k: v.volume for k, v in counts.items()} == {"sms": 230}


async def test_behind_a_backlog_each_read_asks_for_twice_the_last_full_one(
    start_gateway: Any, redis_server: EmbeddedRedis
) -> None:
    """Each full batch's move reads on with twice its ``COUNT``, up to ``most``: a backlog of
    1,050 events in 7 round trips where reads of 50 took 23; the first read that is not full
    brings the reader back to ``batch``, and it pauses again between reads."""
    gw = await start_gateway(api=API, watcher=QUIET)
    async with relayed_reader(gw, redis_server, batch=50, most=400) as (relay, reader):
        queue = reader.queue
        base = SYSTEM_CLOCK.now_us()
        for start in range(0, 1050, 150):
            await asyncio.gather(*(
                gw.intake.submit(dataclasses.replace(
                    _inbound(f"g{n}", base + n, 0), sender=Sender(f"+8613900{n:06d}")
                )) for n in range(start, start + 150)
            ))
        await reader.ensure_group()
        await queue.load_scripts()
        relay.trips = 0
        assert await reader.poll() == 50 and reader._behind
        assert relay.counts == [50, 100]  # the second read went with the first batch's move
        assert await reader.catch_up() == 1000
        # 50, 100, 200, 400, then 400 asked for and 300 found (no read on), then the end
        assert relay.counts == [50, 100, 200, 400, 400, 50]
        assert relay.trips == 1 + 5 + 1
        assert not reader._behind
        await gw.intake.submit(_inbound("after", base + 2000, 0))
        assert await reader.poll() == 1
        assert relay.counts[-1] == 50
        assert await surge_total(gw) == 1051
        group = await _group(gw)
        assert group["lag"] == 0 and group["entries-read"] == await gw.redis.xlen(gw.keys.events)
        counts = await read_window(gw.redis, gw.keys, base - MINUTE, base + 3 * MINUTE)
        assert {k: v.volume for k, v in counts.items()} == {"sms": 1051}


async def _two_readers(
    start_gateway: Any, contacts: int, most: int
) -> tuple[Any, Aggregator, Aggregator, int]:
    """A gateway with ``contacts`` unread contacts and two readers of 2 events a read (the
    gateway's own, stopped, its reads growing up to ``most``; and another, ``two``, whose
    reads do not grow), as during a lease's hand-over; and the contacts' base arrival."""
    gw = await start_gateway(api=API, watcher=QUIET)
    await gw.cases.aggregator.stop()
    one = gw.cases.aggregator
    one.batch, one.most = 2, most
    two = Aggregator(gw.queue, SYSTEM_CLOCK, gw.settings.sla, "two", surge=gw.cases.surge,
                     batch=2, most=2)
    await one.ensure_group()
    await two.ensure_group()
    base = SYSTEM_CLOCK.now_us()
    for n in range(contacts):
        await gw.intake.submit(_inbound(f"h{n}", base + n, n))
    return gw, one, two, base


async def test_a_reader_whose_move_is_refused_reads_its_batch_again(start_gateway: Any) -> None:
    """A reader behind (its reads grown) whose move another reader refused takes the cursor
    again, and with it reads of ``batch``: it is not behind where it now reads from."""
    gw, one, two, _ = await _two_readers(start_gateway, 10, most=8)
    assert await one.poll() == 2 and one._count == 4 and one._behind  # read 3-6 with its move
    assert await two.poll() == 2  # 1 and 2 again: refused, the cursor taken from Redis
    assert await two.poll() == 2  # 3 and 4: moved
    assert await one.poll() == 4  # 3-6 as read ahead: refused
    assert (one._count, one._behind, one._ahead) == (0, False, None)
    assert await one.catch_up() == 6  # 5-6, then 7-10: every contact counted once
    assert await surge_total(gw) == 10


async def test_a_batch_read_ahead_by_a_reader_whose_cursor_moved_counts_once(
    start_gateway: Any,
) -> None:
    """Two readers handing over (as a lease moving while its old holder still reads), each
    reading the next batch with its move: a batch read ahead from a cursor another reader has
    moved since is refused like any other, and each contact counts once. (``_ahead`` is looked
    at to be sure the steps go through a read-ahead, which changes no count.)"""
    gw, one, two, base = await _two_readers(start_gateway, 5, most=2)
    assert await one.poll() == 2  # moved; read 3 and 4 with its move
    assert one._ahead is not None
    assert await two.poll() == 2  # 1 and 2 again: refused, the cursor taken from Redis
    assert await two.poll() == 2  # 3 and 4, read from the cursor: moved, 5 read with it
    assert await one.poll() == 2  # 3 and 4 as read ahead: refused
    assert one._ahead is None
    assert await one.poll() == 1  # 5, from the cursor two left
    assert await two.poll() == 1  # 5 as read ahead: refused
    assert await one.poll() == 0 and await two.poll() == 0
    assert await surge_total(gw) == 5
    counts = await read_window(gw.redis, gw.keys, base - MINUTE, base + MINUTE)
    assert {k: v.volume for k, v in counts.items()} == {"sms": 5}


async def test_a_part_of_outcome_events_reads_the_next_parts_contacts_with_its_steps(
    start_gateway: Any, redis_server: EmbeddedRedis
) -> None:
    """Outcome events their writers did not step (an older version's: here closes appended by
    9c2fbfa's ``emit.lua``) are stepped ``STEP_CHUNK`` at a time, each part with the contacts'
    facts read first: the next part's reads go behind this part's steps, one round trip a
    part."""
    gw = await start_gateway(api=API, watcher=QUIET)
    async with relayed_reader(gw, redis_server) as (relay, reader):
        queue = reader.queue
        base = SYSTEM_CLOCK.now_us()
        receipts = await asyncio.gather(*(
            gw.intake.submit(dataclasses.replace(
                _inbound(f"o{n}", base + n, 0), sender=Sender(f"+8613900{n:06d}")
            )) for n in range(120)
        ))
        await reader.ensure_group()
        await queue.load_scripts()
        assert await reader.catch_up() == 120
        at = SYSTEM_CLOCK.now_us()
        old_emit = await gw.redis.script_load(OLD_EMIT)
        k = gw.keys
        for r in receipts:  # closed in time by an older instance: not stepped by their writer
            event = Event(r.contact_id, "closed", at, "test").to_json()
            assert await gw.redis.evalsha(
                old_emit, 4, k.events, k.contact(r.contact_id), k.deadlines, k.warnings,
                r.contact_id, "closed", event, "1",
            )
        await queue.execute([["PING"]])  # the plain commands' connection open (5 round trips)
        relay.trips = 0
        assert await reader.catch_up() == 120  # one batch: parts of 50, 50 and 20
        # the read; the first part's facts; each part's steps (the next's facts behind the
        # first two); the move; the read that finds the end
        assert STEP_CHUNK == 50 and relay.trips == 1 + 1 + 3 + 1 + 1
        counts = await read_window(gw.redis, gw.keys, base - MINUTE, base + MINUTE)
        assert counts["sms"].volume == 120 and counts["sms"].get("closed") == 120


async def _behind(start_gateway: Any, *, batch: int, contacts: int) -> tuple[Any, Any, int]:
    """A gateway whose reader (stopped: the test drives it) reads ``batch`` at a time, with
    ``contacts`` new contacts it has not read; and their base arrival time."""
    gw = await start_gateway(api=API, watcher=QUIET)
    reader = gw.cases.aggregator
    await reader.stop()
    reader.batch = reader.most = batch  # reads of ``batch`` throughout
    await reader.ensure_group()
    base = SYSTEM_CLOCK.now_us()
    for n in range(contacts):
        await gw.intake.submit(_inbound(f"c{n}", base + n, n))
    return gw, reader, base


async def test_a_read_ahead_that_found_nothing_is_not_kept(start_gateway: Any) -> None:
    """A full batch that was the stream's last: its move's read finds nothing, and the next
    poll reads again (events added since are not missed until the loop's pause)."""
    gw, reader, base = await _behind(start_gateway, batch=3, contacts=3)
    assert await reader.poll() == 3
    for n in range(3, 5):
        await gw.intake.submit(_inbound(f"c{n}", base + n, n))
    assert await reader.catch_up() == 2
    assert await surge_total(gw) == 5


async def test_scripts_lost_between_batches_are_loaded_again_with_the_read_ahead(
    start_gateway: Any,
) -> None:
    """The server lost its scripts (a restart, a failover) while the reader is behind: the
    move that carries the next read is sent again, read-ahead and all, and every contact counts
    once."""
    gw, reader, _ = await _behind(start_gateway, batch=4, contacts=10)
    assert await reader.poll() == 4 and reader._ahead is not None
    await gw.redis.script_flush()
    assert await reader.poll() == 4  # read ahead; its move (NOSCRIPT) is sent again, read and all
    assert reader._ahead is not None
    assert await reader.catch_up() == 2
    assert await surge_total(gw) == 10
    group = await _group(gw)
    assert group["lag"] == 0 and group["entries-read"] == await gw.redis.xlen(gw.keys.events)
