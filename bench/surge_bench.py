"""Surge warning: false alarms and detection delay on synthetic traffic over a real Valkey.

Eight days of Poisson traffic with a daily cycle (quiet at night, busy by day) are counted by
``SurgeWatch.count`` minute by minute (a fixed clock): every contact has a channel and a
dialled number, and a share of them name a topic (停水, 停电, 燃气) or a district. On the last
day, bursts are added to one topic or district at a time (``+extra`` contacts a minute for
20 minutes, sizes from a third of the usual rate of all contacts to twice it), and the
evaluator runs once a simulated minute for the whole day, as the lease holder would (every
``[surge] interval``; here a minute, so delays are to the minute).

- false alarms: surges of a key outside any burst on it (per day, over every key watched);
- detection: for each burst, whether its key was flagged, and how many minutes after the
  burst began.

    .venv/bin/python -m bench.surge_bench          # about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path

from gateway.cases.surge import SurgeWatch
from gateway.contact.clock import MICROS_PER_SECOND, FixedClock
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisQueue, connect
from gateway.records import Contact, Deadline, Repeat, Sender
from gateway.server.config import SurgeSection, parse_settings

MIN = 60 * MICROS_PER_SECOND
DAY_MIN = 1440
START = 1_795_000_000_000_000 - 1_795_000_000_000_000 % (DAY_MIN * MIN)
TEXTS = {
    None: "路灯坏了",
    "停水": "小区停水了",
    "停电": "楼里停电",
    "燃气": "闻到燃气味",
    "district": "朝阳区 井盖丢失",
}
MIX = ((None, 0.85), ("停水", 0.04), ("停电", 0.04), ("燃气", 0.02), ("district", 0.05))
CHANNELS = ("voice", "sms", "chat", "web", "email")
BURSTS = [  # (minute of the last day, what, extra contacts a minute)
    (9 * 60, "停水", 1.0),
    (11 * 60, "停电", 2.0),
    (13 * 60, "燃气", 4.0),
    (15 * 60, "district", 1.0),
    (17 * 60, "停水", 0.5),
    (20 * 60, "停电", 8.0),
]
KEY_OF = {
    "停水": "topic:停水",
    "停电": "topic:停电",
    "燃气": "topic:燃气",
    "district": "place:朝阳区",
}
BURST_MIN = 20


def rate_at(minute: int, base: float) -> float:
    """Contacts a minute: a daily cycle, lowest at 04:00, highest at 16:00."""
    phase = 2 * math.pi * ((minute % DAY_MIN) / DAY_MIN - 10 / 24)
    return base * (1 + 0.8 * math.sin(phase))


def poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def contact(n: int, at: int, what: str | None, rng: random.Random) -> Contact:
    channel = rng.choice(CHANNELS)
    return Contact(
        id=f"s{n}",
        channel=channel,  # type: ignore[arg-type]
        adapter="bench",
        external_id=f"s{n}",
        sender=Sender(f"+86139{n:08d}"),
        recipient=rng.choice(("12345", "12345-1", "hotline@example.gov.cn")),
        subject=None,
        text=TEXTS[what],
        language="zh",
        attachments=(),
        thread=None,
        received_at=at,
        origin_at=None,
        enqueued_at=at,
        deadline=Deadline("response", at + 180 * MICROS_PER_SECOND, "x"),
        repeat=Repeat(0, 0),
        confidential=False,
        meta={},
    )


async def run(url: str, args: argparse.Namespace) -> None:
    settings, _ = parse_settings({"redis": {"url": url, "prefix": "surge"}})
    client = connect(settings.redis, url)
    clock = FixedClock(START)
    queue = RedisQueue(client, Keys("surge"), clock, source="bench", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=86400, maxlen=1_000_000)  # fmt: skip
    await queue.load_scripts()
    section = dataclasses.replace(SurgeSection(), districts=("朝阳区",), repeat=0)
    watch = SurgeWatch(queue, clock, section, "bench")
    rng = random.Random(args.seed)
    days = section.history_days + 1
    last_day = (days - 1) * DAY_MIN
    n = 0
    t0 = time.perf_counter()
    surges: list[tuple[int, str]] = []
    evaluated = 0
    for minute in range(days * DAY_MIN):
        at = START + minute * MIN
        batch = []
        for what, share in MIX:
            for _ in range(poisson(rng, rate_at(minute, args.base) * share)):
                batch.append(contact(n, at + rng.randrange(MIN), what, rng))
                n += 1
        for start, what, extra in BURSTS:
            if last_day + start <= minute < last_day + start + BURST_MIN:
                for _ in range(poisson(rng, extra * args.base)):
                    batch.append(contact(n, at + rng.randrange(MIN), what, rng))
                    n += 1
        await watch.count(batch)
        if minute >= last_day:
            found = await watch.evaluate(at + MIN - 1)  # at the end of the minute
            evaluated += 1
            surges += [(minute - last_day, e.detail["key"]) for e in found]
    took = time.perf_counter() - t0
    print(f"{n:,} contacts over {days} days (base {args.base:g} a minute, daily cycle ±80 %), "
          f"{evaluated} evaluations on the last day, {took:.0f} s")  # fmt: skip
    in_burst = set()
    print("burst (last day)          extra/min   flagged  delay")
    for start, what, extra in BURSTS:
        key = KEY_OF[what]
        hits = [m for m, k in surges if k == key and start <= m < start + BURST_MIN + 10]
        in_burst.update((m, key) for m in hits)
        delay = f"{hits[0] - start + 1} min" if hits else "-"
        usual = rate_at(last_day + start, args.base) * dict(MIX)[what]
        print(f"  {start // 60:02d}:00 {key:<16} {extra * args.base:5.1f} (usual {usual:.2f})"
              f"  {'yes' if hits else 'no ':>5}  {delay}")  # fmt: skip
    # 'all' and channel/recipient keys rise with a big burst: those are true, not false alarms
    burst_windows = [(s, s + BURST_MIN + 10) for s, _, _ in BURSTS]
    false = [
        (m, k)
        for m, k in surges
        if (m, k) not in in_burst
        and not (k.split(":")[0] in ("all", "channel", "recipient")
                 and any(a <= m < b for a, b in burst_windows))
    ]  # fmt: skip
    listed = ", ".join(f"{m // 60:02d}:{m % 60:02d} {k}" for m, k in false) or "none"
    print(f"false alarms: {len(false)} in one day ({listed})")
    side = [(m, k) for m, k in surges if (m, k) not in in_burst and (m, k) not in false]
    print(f"also flagged during bursts (all, channel, number): {len(side)}")
    await client.aclose()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="surge-bench-") as tmp:
        server = EmbeddedRedis(Path(tmp), appendfsync="everysec")
        await server.start()
        try:
            await run(server.url, args)
        finally:
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", type=float, default=2.0, help="contacts a minute on average")
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(main(parser.parse_args()))
