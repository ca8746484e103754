"""How long the gateway's loop is held in one piece while many deadlines fall due together.

N voice calls are taken in (never answered), the clock is moved past their answer deadline,
and one watcher sweep writes their ``breached`` events, which the dashboard's aggregator then
reads; meanwhile another task takes turns on the loop and records the loop thread's CPU time
between two of its turns (CPU time: a preemption of the process by the machine's other work
does not count). Step sizes of 200 (the watcher's and the aggregator's before) and 50 (now)
in alternating rounds, each on a fresh gateway and key prefix.

    .venv/bin/python -m bench.deadline_sweep_bench --calls 2000 --rounds 4    # ~15 s
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

import gateway.cases.dashboard.aggregates as aggregates
import gateway.cases.watcher as watcher
from gateway.contact.clock import FixedClock
from gateway.queueing.embedded import EmbeddedRedis
from gateway.records import Inbound, Sender
from gateway.server.config import WatcherSection
from gateway.server.runtime import Gateway, settle_heap
from gateway.testing.plugin import settings_for


async def one(redis: EmbeddedRedis, tmp: str, calls: int, step: int, name: str) -> str:
    clock = FixedClock()
    settings, configs = settings_for(
        Path(tmp) / name, redis.url, name, watcher={"enabled": False}, surge={"enabled": False}
    )
    gw = Gateway(settings, configs, clock=clock)
    await gw.start()
    settle_heap()
    assert gw.cases is not None
    try:
        for i in range(0, calls, 200):
            await asyncio.gather(
                *(
                    gw.intake.submit(
                        Inbound("voice", "pbx", f"{name}-{j}", Sender(f"+86138{j:08d}"),
                                "12345", clock.now_us())
                    )
                    for j in range(i, min(calls, i + 200))
                )
            )
        await gw.cases.aggregator.catch_up()
        watcher.BATCH = aggregates.STEP_CHUNK = step
        sweeper = watcher.DeadlineWatcher(gw.queue, clock, gw.metrics, WatcherSection())
        clock.advance(16)
        holds: list[float] = []
        running = True

        async def other() -> None:
            last = time.thread_time()
            while running:
                await asyncio.sleep(0)
                now = time.thread_time()
                holds.append(now - last)
                last = now

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        started = time.perf_counter()
        written = await sweeper.tick()
        await gw.cases.aggregator.catch_up()
        wall = time.perf_counter() - started
        running = False
        await task
    finally:
        await gw.stop()
    holds.sort()
    return (
        f"step {step:3d}: {written} events, longest hold of the loop {holds[-1] * 1000:5.2f} ms, "
        f"mean of the 5 longest {sum(holds[-5:]) / 5 * 1000:5.2f} ms, "
        f"sweep and aggregation {wall:.2f} s"
    )


async def main(calls: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        await redis.start()
        try:
            for r in range(rounds):
                for step in (50, 200) if r % 2 == 0 else (200, 50):
                    line = await one(redis, tmp, calls, step, f"s{r}-{step}")
                    print(f"round {r + 1} {line}", flush=True)
        finally:
            await redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    uvloop.run(main(args.calls, args.rounds))
