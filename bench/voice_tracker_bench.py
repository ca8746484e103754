"""Call tracker benchmark: AMI events per second with the open calls kept in Redis (shared
state, as the gateway runs it) against the same tracker keeping them in memory only (the
baseline, measured in the same run), and the time to rebuild N open calls after a take-over.

    python bench/voice_tracker_bench.py [--calls 2000]

Each call: its contact through the real Intake (embedded Valkey), then the AMI events the
tracker acts on for an answered queue call (VarSet GATEWAY_ARRIVED and GATEWAY_CONTACT_ID,
QueueCallerJoin, AgentConnect, Hangup), fed straight to ``CallTracker.handle``. Takes ~20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def frames(uid: str, contact_id: str, t: float) -> list[dict[str, str]]:
    base = {"Uniqueid": uid, "Linkedid": uid, "CallerIDNum": "13800138000", "Exten": "12345"}
    return [
        {"Event": "VarSet", "Variable": "GATEWAY_ARRIVED", "Value": f"{t:.6f}",
         "Timestamp": f"{t:.6f}", **base},
        {"Event": "VarSet", "Variable": "GATEWAY_CONTACT_ID", "Value": contact_id,
         "Timestamp": f"{t + 0.003:.6f}", **base},
        {"Event": "QueueCallerJoin", "Queue": "hotline", "Position": "1",
         "Timestamp": f"{t + 0.004:.6f}", **base},
        {"Event": "AgentConnect", "Queue": "hotline", "HoldTime": "8", "RingTime": "2",
         "MemberName": "Agent One", "Timestamp": f"{t + 8.2:.6f}", **base},
        {"Event": "Hangup", "Cause": "16", "Timestamp": f"{t + 60:.6f}", **base},
    ]


async def run(calls: int) -> None:
    from gateway.channels.voice.adapter import SharedCallStore
    from gateway.channels.voice.tracker import CallTracker
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.records import Inbound, Sender
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    tmp = Path(tempfile.mkdtemp(prefix="bench-tracker-"))
    server = EmbeddedRedis(tmp / "redis")
    server.start_sync()
    settings, configs = parse_settings({
        "gateway": {"data_dir": str(tmp / "gw"), "instance": "bench"},
        "redis": {"url": server.url, "prefix": "bt"},
        "http": {"listen": "127.0.0.1:0"},
        "limits": {"sender_contacts": 0},  # every call is from one number
    })
    gw = Gateway(settings, configs)
    await gw.start()
    try:
        results: dict[str, float] = {}
        for mode in ("memory", "redis"):
            store = SharedCallStore(gw.state_for("asterisk"), f"calls:{mode}", ttl_s=3600)
            tracker = CallTracker(
                adapter="asterisk", events=gw.intake, intake=gw.intake, contacts=gw.queue,
                clock=gw.clock, store=store if mode == "redis" else None, callbacks=False,
            )
            await tracker.resume()
            work = []
            now = time.time()
            for n in range(calls):
                uid = f"{mode}.{n}"
                receipt = await gw.intake.submit(Inbound(
                    "voice", "asterisk", uid, Sender("+8613800138000"), "12345",
                    gw.clock.now_us(),
                ))
                work.append(frames(uid, receipt.contact_id, now))
            started = time.perf_counter()
            for call in work:
                for frame in call:
                    await tracker.handle(frame)
            await tracker.flush()
            elapsed = time.perf_counter() - started
            results[mode] = calls * 5 / elapsed
            print(f"{mode:7s} {results[mode]:8.0f} events/s  ({calls} calls, 5 events each)")
        print(f"ratio redis/memory: {results['redis'] / results['memory']:.2f}")
        # rebuild after a take-over: N open calls (joined, not answered) loaded from Redis
        store = SharedCallStore(gw.state_for("asterisk"), "calls:open", ttl_s=3600)
        tracker = CallTracker(adapter="asterisk", events=gw.intake, intake=gw.intake,
                              contacts=gw.queue, clock=gw.clock, store=store)
        await tracker.resume()
        for n in range(calls):
            for frame in frames(f"open.{n}", f"c{n}", time.time())[:3]:
                await tracker.handle(frame)
        await tracker.flush()
        successor = CallTracker(adapter="asterisk", events=gw.intake, intake=gw.intake,
                                contacts=gw.queue, clock=gw.clock, store=store)
        started = time.perf_counter()
        await successor.resume()
        print(f"resume  {len(successor.calls)} open calls in "
              f"{(time.perf_counter() - started) * 1000:.1f} ms")
    finally:
        await gw.stop()
        server.stop_sync()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=2000)
    args = p.parse_args()
    asyncio.run(run(args.calls))


if __name__ == "__main__":
    main()
