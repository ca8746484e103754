"""Where the gateway's event loop stalls under a paced load.

Two bench-only instruments in the gateway's process (``LagProbe``): a probe task that sleeps
1 ms and records how late it wakes (the loop's lag), and a sampler thread that reads the loop
thread's Python stack every 0.5 ms. Each stall of the loop longer than ``--stall-ms`` is
attributed to the code sampled during it: "waiting in epoll" means the loop had nothing to
run (so the process was not scheduled: on 2 cores the load generator, Valkey and the gateway
take turns), anything else is a callback of ours that held the loop. Also printed: the
garbage collections in the gateway and Valkey's own ``LATENCY LATEST`` (threshold 1 ms) and the
commands of its ``SLOWLOG`` over 1 ms.

    .venv/bin/python -m bench.loop_lag --rate 500 --seconds 10     # HTTP intake, ~15 s

``bench/voice_bench.py --lag`` runs the same probe in its paced FastAGI runs.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import gc
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.intake_bench import HOST, body, free_port

Sample = tuple[float, tuple[str, ...]]


def _stack(frame: Any) -> tuple[str, ...]:
    names: list[str] = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{Path(code.co_filename).name}:{code.co_name}")
        frame = frame.f_back
    return tuple(names)


class LagProbe:
    """Loop lag and the stacks of the stalls, from ``start()`` to ``stop()`` (bench only)."""

    def __init__(self, stall_ms: float = 3.0) -> None:
        self.stall_ms = stall_ms
        self._samples: collections.deque[Sample] = collections.deque(maxlen=400_000)
        self._stop = threading.Event()
        self._lags: list[float] = []
        self._stalls: list[tuple[float, float, float]] = []  # (start, lateness, loop CPU)
        self._gc = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        self._gc += phase == "start"

    def start(self) -> None:
        loop_thread = threading.get_ident()

        def sampler() -> None:
            while not self._stop.is_set():
                frame = sys._current_frames().get(loop_thread)
                self._samples.append((time.perf_counter(), _stack(frame)))
                time.sleep(0.0005)

        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=sampler, daemon=True)
        self._thread.start()
        self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            t0 = time.perf_counter()
            c0 = time.thread_time()  # the loop thread's CPU: a hold, or not scheduled?
            await asyncio.sleep(0.001)
            late = time.perf_counter() - t0 - 0.001
            self._lags.append(late)
            if late * 1000 > self.stall_ms:
                self._stalls.append((t0 + 0.001, late, time.thread_time() - c0))

    async def stop(self) -> dict[str, Any]:
        assert self._task is not None and self._thread is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._stop.set()
        self._thread.join()
        gc.callbacks.remove(self._on_gc)
        sys.setswitchinterval(self._switch)
        return self.report()

    def report(self) -> dict[str, Any]:
        blame: collections.Counter[str] = collections.Counter()
        ordered = list(self._samples)
        times = [t for t, _ in ordered]
        # a stall in which the loop's thread ran for at least half of it is a hold (our code,
        # a collection); less, and the process mostly waited for a core or for epoll
        held = [(late, cpu) for _, late, cpu in self._stalls if cpu >= late / 2]
        for start, late, _ in self._stalls:
            i, j = bisect.bisect_left(times, start), bisect.bisect_right(times, start + late)
            seen: set[str] = set()
            for _, stack in ordered[i:j]:
                ours = [s for s in stack if "loop_lag" not in s]
                idle = not ours or ours[0].startswith(("runners.py", "__init__.py:run"))
                seen.add("(waiting in epoll)" if idle else " < ".join(ours[:5]))
            for s in seen or {"(no sample: the process was not running)"}:
                blame[s] += 1
        lags = sorted(self._lags) or [0.0]
        return {
            "ticks": len(self._lags),
            "p50": lags[len(lags) // 2] * 1000,
            "p99": lags[int(0.99 * len(lags))] * 1000,
            "max": lags[-1] * 1000,
            "stalls": len(self._stalls),
            "held": len(held),
            "held_ms": sorted((round(late * 1000, 1) for late, _ in held), reverse=True)[:12],
            "stall_cpu": sum(cpu for _, _, cpu in self._stalls) / max(
                1e-9, sum(late for _, late, _ in self._stalls)),
            "blame": blame.most_common(20),
            "gc": self._gc,
        }


def print_report(report: dict[str, Any], stall_ms: float) -> None:
    print(
        f"loop lag over {report['ticks']} probes of 1 ms: p50 {report['p50']:.2f} ms  "
        f"p99 {report['p99']:.2f} ms  max {report['max']:.1f} ms; {report['stalls']} stalls "
        f"over {stall_ms:g} ms; garbage collections {report['gc']}"
    )
    if "held" in report:
        print(
            f"the loop's thread ran {100 * report['stall_cpu']:.0f} % of the stalls' time; "
            f"{report['held']} stalls were holds (it ran at least half of the stall), the "
            f"longest (ms): {report['held_ms']}"
        )
    print("stalls in which each stack was sampled (innermost frame first):")
    for stack, n in report["blame"]:
        print(f"{n:5d}  {stack}")


def serve(port: int, redis_url: str, ready: Any, out: Any, seconds: float, stall_ms: float) -> None:
    import uvloop

    uvloop.run(_serve(port, redis_url, ready, out, seconds, stall_ms))


async def _serve(
    port: int, redis_url: str, ready: Any, out: Any, seconds: float, stall_ms: float
) -> None:
    from bench.intake_bench import gateway_classes
    from gateway.server.runtime import settle_heap

    parse_settings, Gateway = gateway_classes()
    settings, configs = parse_settings(
        {
            "gateway": {"data_dir": tempfile.mkdtemp(prefix="bench-lag-"), "instance": "bench"},
            "redis": {"url": redis_url, "prefix": "lag"},
            "http": {"listen": f"{HOST}:{port}"},
            "api": {"open_to_loopback": True},
        }
    )
    gateway = Gateway(settings, configs)
    await gateway.start()
    settle_heap()
    probe = LagProbe(stall_ms)
    probe.start()
    ready.set()
    await asyncio.sleep(seconds)
    out.put(await probe.stop())
    await gateway.stop()


async def load(port: int, rate: float, seconds: float) -> Any:
    from bench.loadgen import build_request, run_load

    headers = {"Content-Type": "application/json"}
    return await run_load(
        HOST,
        port,
        lambda i: build_request(HOST, port, "POST", "/v1/intake", body(i), headers),
        connections=64,
        seconds=seconds,
        rate=rate,
        expect=202,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--stall-ms", type=float, default=3)
    args = parser.parse_args()
    import redis

    from gateway.queueing.embedded import EmbeddedRedis

    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-lag-")) / "r", appendfsync="always")
    server.start_sync()
    valkey = redis.Redis.from_url(server.url)
    valkey.config_set("latency-monitor-threshold", 1)
    valkey.config_set("slowlog-log-slower-than", 1000)  # microseconds
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    port = free_port()
    proc = ctx.Process(
        target=serve, args=(port, server.url, ready, out, args.seconds + 0.5, args.stall_ms)
    )
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("gateway did not start")
        result = asyncio.run(load(port, args.rate, args.seconds))
        report = out.get(timeout=60)
        latency = valkey.execute_command("LATENCY", "LATEST")
        slow = collections.Counter(
            " ".join(
                word[:12]
                for word in (
                    e["command"].decode(errors="replace")
                    if isinstance(e["command"], bytes)
                    else str(e["command"])
                ).split()[:2]
            )
            for e in valkey.slowlog_get(128)
        )
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
        valkey.close()
        server.stop_sync()
    print(
        f"load {result.rate:.0f}/s  client p50 {result.percentile_ms(0.5):.2f} ms  "
        f"p99 {result.percentile_ms(0.99):.2f} ms  errors {result.errors}"
    )
    print(f"Valkey LATENCY LATEST (event, unix time, latest ms, max ms): {latency}")
    print(f"Valkey SLOWLOG (over 1 ms, last 128): {dict(slow)}")
    print_report(report, args.stall_ms)


if __name__ == "__main__":
    main()
