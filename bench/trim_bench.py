"""What trimming off the write path costs: ``trim.lua`` (run by the StreamKeeper) against the
intake writes it follows, both measured on one embedded Valkey in the same run.

1. baseline: ``--contacts`` contacts written with ``RedisQueue.write_batch`` (batches of 256,
   the intake script, no MAXLEN): contacts per second.
2. a consumer group on each stream reads and acknowledges them all; with ``stream_maxlen``
   set to half, one ``StreamKeeper.check`` trims the older half of the contacts and events
   streams: entries trimmed per second, and the time per entry relative to a contact's write.
3. a check with nothing to trim, and one with the group behind (everything kept): the fixed
   cost of a check every ``trim_interval``.

    .venv/bin/python -m bench.trim_bench                    # about half a minute
    .venv/bin/python -m bench.trim_bench --contacts 20000   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from gateway.adapters import load_media
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.contact.sla import SlaPolicy
from gateway.queueing.backlog import StreamKeeper
from gateway.queueing.consumer import ContactConsumer, EventConsumer
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.intake import Intake
from gateway.queueing.keys import Keys
from gateway.queueing.spool import Spool
from gateway.queueing.store import Prepared, RedisQueue, connect
from gateway.records import Deadline, Inbound, Sender
from gateway.server.config import RedisSection, SlaSection
from gateway.server.metrics import Metrics


def prepared(i: int, now: int) -> Prepared:
    inbound = Inbound(
        channel="sms", adapter="bench", external_id=f"m{i}", sender=Sender(f"+86138{i:08d}"),
        recipient="12345", received_at=now, text="路灯坏了，请尽快派人维修。小区东门。",
    )
    deadline = Deadline("response", now + 180_000_000, "sms_response")
    return Prepared(f"id-{i}", inbound, deadline, now + 144_000_000)


async def run(contacts: int) -> None:
    tmp = Path(tempfile.mkdtemp())
    server = EmbeddedRedis(tmp / "redis")
    await server.start()
    section = RedisSection(stream_maxlen=contacts // 2, backlog_warning=0, backlog_limit=0)
    client = connect(section, server.url)
    queue = RedisQueue(client, Keys("bench"), SYSTEM_CLOCK, source="bench", dedupe_window_s=86400,
                       repeat_window_s=86400, retention_s=86400, maxlen=section.stream_maxlen)
    metrics = Metrics()
    spool = Spool(tmp / "spool")
    spool.open()
    intake = Intake(queue, spool, SlaPolicy(SlaSection(), load_media()), metrics, SYSTEM_CLOCK)
    keeper = StreamKeeper(queue, intake, metrics, section)
    consumer = ContactConsumer(client, "cases", "w1", prefix="bench")
    events = EventConsumer(client, "cases", "w1", prefix="bench")
    for group in (consumer, events):
        await group.ensure_group()
    try:
        now = SYSTEM_CLOCK.now_us()
        started = time.perf_counter()
        for first in range(0, contacts, 256):
            batch = [prepared(i, now) for i in range(first, min(contacts, first + 256))]
            await queue.write_batch(batch)
        write_s = time.perf_counter() - started

        started = time.perf_counter()
        await keeper.check()
        behind_s = time.perf_counter() - started
        kept = await client.xlen(queue.keys.contacts)

        for group in (consumer, events):
            while read := await group.read(count=1000, block_ms=None):
                await group.ack(*(d.entry_id for d in read))
        before = await client.xlen(queue.keys.contacts) + await client.xlen(queue.keys.events)
        started = time.perf_counter()
        await keeper.check()
        trim_s = time.perf_counter() - started
        after = await client.xlen(queue.keys.contacts) + await client.xlen(queue.keys.events)
        trimmed = before - after

        started = time.perf_counter()
        await keeper.check()
        idle_s = time.perf_counter() - started
    finally:
        await client.aclose()
        await server.stop()
    per_write = write_s / contacts
    per_trim = trim_s / max(1, trimmed)
    print(f"| write (intake.lua, batches of 256) | {contacts / write_s:,.0f} contacts/s "
          f"| {per_write * 1e6:.1f} µs a contact | 1.00 |")
    print(f"| trim {trimmed:,} read entries (contacts + events) "
          f"| {trimmed / trim_s:,.0f} entries/s "
          f"| {per_trim * 1e6:.2f} µs an entry | {per_trim / per_write:.3f} |")
    print(f"| check, group behind ({kept:,} kept) | {behind_s * 1000:.1f} ms | | |")
    print(f"| check, nothing to trim | {idle_s * 1000:.1f} ms | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    asyncio.run(run(parser.parse_args().contacts))


if __name__ == "__main__":
    main()
