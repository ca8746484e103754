"""A big centre's wallboard: one refresh with 1,000,000 contacts in the 24 h window.

1. ``load``: ``--contacts`` synthetic contacts spread over the last 24 hours are written into a
   real embedded Valkey with pipelines, the way ``intake.lua`` leaves them (a stream entry and
   the contact's hash), and their outcomes go through ``aggregate.lua`` with the steps the
   aggregator computes (``Aggregator._step``): 85 % answered or replied (a tenth of those
   late), 5 % breached, 4 % abandoned calls, the rest open.
2. ``refresh``: the wallboard's snapshot (every figure of ``/dashboard/live``: both windows,
   tiles, open per channel, breaches, repeats, surges, charts) and its drawing in Chinese and
   English, ``--refreshes`` times; median and worst.
3. ``baseline`` (same run): the same figures the old way, a scan of the streams and a decode
   of every contact (``gateway.cases.report.load`` + ``build``), over ``--scan`` contacts (with
   their events) on their own prefix; then the ratio per contact.
4. ``aggregator``: events per second through the real path (``{p}:events`` read in the
   consumer group, ``Aggregator.process``), over ``--scan`` contacts.

    .venv/bin/python -m bench.wallboard_bench                      # 1,000,000: a few minutes
    .venv/bin/python -m bench.wallboard_bench --contacts 100000    # quick
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from gateway.cases.dashboard.aggregates import Aggregator, Step, apply
from gateway.cases.dashboard.wallboard import Wallboard
from gateway.cases.i18n import Locale
from gateway.cases.report import build, load
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisQueue, connect
from gateway.records import Event
from gateway.server.config import parse_settings

DAY_US = 86_400 * MICROS_PER_SECOND
CHANNELS = (("voice", "answer", 15), ("sms", "response", 180), ("chat", "response", 180),
            ("web", "response", 180), ("email", "response", 86400))  # fmt: skip
WEIGHTS = (50, 20, 15, 10, 5)
PIPELINE = 1000
"""Contacts per round trip."""


def _template(channel: str, kind: str) -> bytes:
    return orjson.dumps(
        {
            "schema": 1,
            "id": "@ID@",
            "channel": channel,
            "adapter": "bench",
            "external_id": "@ID@",
            "sender": {"address": "@SENDER@", "name": None},
            "recipient": "12345",
            "subject": None,
            "text": "小区路灯坏了",
            "language": "zh",
            "attachments": [],
            "thread": None,
            "received_at": "@RECEIVED@",
            "origin_at": None,
            "enqueued_at": "@RECEIVED@",
            "deadline": {"kind": kind, "due_at": "@DUE@", "policy": f"{channel}_x"},
            "repeat": {"count": 0, "window": 2592000},
            "confidential": False,
            "meta": {},
        }
    )


TEMPLATES = {(channel, kind): _template(channel, kind) for channel, kind, _ in CHANNELS}


def contact_json(cid: str, channel: str, kind: str, received: int, due: int, n: int) -> bytes:
    """A Contact record as intake writes it (a template filled in: loading must be quick)."""
    return (
        TEMPLATES[(channel, kind)]
        .replace(b"@ID@", cid.encode())
        .replace(b"@SENDER@", f"+86138{n % 10_000_000:08d}".encode())
        .replace(b"@RECEIVED@", _time(received).encode())
        .replace(b"@DUE@", _time(due).encode())
    )


def _time(us: int) -> str:
    from gateway.contact.clock import format_time

    return format_time(us)


def outcomes(
    rng: random.Random, kind: str, received: int, deadline_s: int, now: int
) -> list[Event]:
    """The events one synthetic contact has had by ``now``."""
    due = received + deadline_s * MICROS_PER_SECOND
    r = rng.random()
    out: list[Event] = []
    if r < 0.85:
        late = rng.random() < 0.1
        after = deadline_s * (1 + rng.random()) if late else deadline_s * rng.random()
        at = received + int(after * MICROS_PER_SECOND)
        type_ = "answered" if kind == "answer" else "responded"
        out.append(Event("", type_, at, "bench", due, int(after * 1000), not late))
    elif r < 0.90:
        out.append(Event("", "breached", due, "bench", due, deadline_s * 1000, False))
    elif r < 0.94 and kind == "answer":
        at = received + int(rng.random() * 10 * MICROS_PER_SECOND)
        out.append(Event("", "abandoned", at, "bench"))
    return [e for e in out if e.at <= now]


async def populate(
    queue: RedisQueue, aggregator: Aggregator, n: int, now: int, *, counters: bool
) -> float:
    """Write ``n`` contacts received over the last 24 h (stream entries, hashes, events) and,
    with ``counters``, their counters through the aggregator's steps; return seconds."""
    keys = queue.keys
    rng = random.Random(12345)
    started = time.perf_counter()
    for base in range(0, n, PIPELINE):
        commands: list[list[Any]] = []
        steps: list[Step] = []
        for i in range(base, min(n, base + PIPELINE)):
            channel, kind, deadline_s = rng.choices(CHANNELS, WEIGHTS)[0]
            received = now - int(rng.random() * (DAY_US - 60 * MICROS_PER_SECOND)) - 1
            due = received + deadline_s * MICROS_PER_SECOND
            cid = f"b{i:07d}"
            body = contact_json(cid, channel, kind, received, due, i)
            enq = Event(cid, "enqueued", received, "bench")
            fact = {"received": received, "due": due, "kind": kind, "channel": channel}
            commands += [
                ["XADD", keys.contacts, "*", "contact", body, "id", cid, "channel", channel],
                ["HSET", keys.contact(cid), "contact", body, "received_us", received,
                 "due_us", due, "kind", kind, "channel", channel],
                ["EXPIRE", keys.contact(cid), 2 * 86400],
                ["XADD", keys.events, "*", "event", enq.to_json(), "contact_id", cid,
                 "type", "enqueued"],
            ]  # fmt: skip
            todo = [enq]
            for e in outcomes(rng, kind, received, deadline_s, now):
                e = Event(cid, e.type, e.at, e.source, e.due_at, e.elapsed_ms, e.met)
                todo.append(e)
                commands.append(
                    ["XADD", keys.events, "*", "event", e.to_json(), "contact_id", cid,
                     "type", e.type]
                )  # fmt: skip
            for e in todo if counters else ():
                step = aggregator._step(cid, e.type, e.to_dict(), fact)
                if step is not None:
                    steps.append(step)
        for r in await queue.execute(commands):
            if isinstance(r, Exception):
                raise r
        await apply(queue, steps)
        if base and base % 100_000 == 0:
            print(f"  {base:,} contacts loaded ({time.perf_counter() - started:.0f} s)", flush=True)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="wallboard-bench-") as tmp:
        server = EmbeddedRedis(Path(tmp), appendfsync="everysec")
        await server.start()
        try:
            await run(server.url, args)
        finally:
            await server.stop()


async def run(url: str, args: argparse.Namespace) -> None:
    settings, _ = parse_settings({"redis": {"url": url, "prefix": "big"}})
    client = connect(settings.redis, url)
    now = SYSTEM_CLOCK.now_us()

    def queue_for(prefix: str) -> RedisQueue:
        return RedisQueue(client, Keys(prefix), SYSTEM_CLOCK, source="bench", dedupe_window_s=60,
                          repeat_window_s=60, retention_s=2 * 86400, maxlen=10_000_000)  # fmt: skip

    big = queue_for("big")
    await big.load_scripts()
    aggregator = Aggregator(big, SYSTEM_CLOCK, settings.sla, "bench")
    print(f"loading {args.contacts:,} contacts (stream entries, hashes, counters) ...", flush=True)
    # the counters: the aggregator's own steps, run as pipelines (the streams hold the events
    # too; reading them back through the aggregator is measured apart, below)
    load_s = await populate(big, aggregator, args.contacts, now, counters=True)
    info = await client.info("memory")
    print(f"loaded in {load_s:.0f} s; used_memory {int(info['used_memory']) / 2**20:,.0f} MiB")
    print(f"stream length {await client.xlen(Keys('big').contacts):,} contacts, "
          f"{await client.xlen(Keys('big').events):,} events")  # fmt: skip

    wallboard = Wallboard(
        client, Keys("big"), SYSTEM_CLOCK, settings, {"voice", "sms", "chat", "web", "email"}
    )
    times = []
    snap: dict[str, Any] = {}
    for _ in range(args.refreshes):
        t = time.perf_counter()
        snap = await wallboard._snapshot()
        for lang in ("zh", "en"):
            wallboard.fragments(snap, Locale(lang))  # type: ignore[arg-type]
        times.append(time.perf_counter() - t)
    rolling = snap["rolling"]
    total = sum(r["volume"] for r in rolling.values())
    print(f"window holds {total:,} contacts; voice connection rate "
          f"{snap['voice']['rolling']['connection_rate']:.3f}")  # fmt: skip
    print(f"refresh (snapshot + both languages): median {statistics.median(times) * 1000:.0f} ms, "
          f"worst {max(times) * 1000:.0f} ms over {len(times)}")  # fmt: skip

    # baseline: the scan the dashboard used to do, over --scan contacts
    small = queue_for("scan")
    await small.load_scripts()
    small_agg = Aggregator(small, SYSTEM_CLOCK, settings.sla, "bench")
    await populate(small, small_agg, args.scan, now, counters=False)
    scans = []
    for _ in range(3):
        t = time.perf_counter()
        contacts, events = await load(client, Keys("scan"), now - DAY_US)
        build(contacts, events, since_us=now - DAY_US, until_us=now + 1, sla=settings.sla)
        scans.append(time.perf_counter() - t)
    scan_s = statistics.median(scans)
    per_contact = scan_s / args.scan
    print(f"baseline scan of {args.scan:,} contacts: {scan_s * 1000:.0f} ms "
          f"({per_contact * 1e6:.1f} us a contact: {per_contact * args.contacts:.0f} s for "
          f"{args.contacts:,}, {per_contact * args.contacts / statistics.median(times):,.0f}x the "
          "counters)")  # fmt: skip

    # the aggregator's own pace through the real path, over the scan prefix's events
    await small_agg.ensure_group()
    t = time.perf_counter()
    n = await small_agg.catch_up()
    took = time.perf_counter() - t
    print(f"aggregator: {n:,} events in {took:.1f} s = {n / took:,.0f} events/s")
    await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contacts", type=int, default=1_000_000)
    parser.add_argument("--refreshes", type=int, default=20)
    parser.add_argument("--scan", type=int, default=50_000)
    asyncio.run(main(parser.parse_args()))
