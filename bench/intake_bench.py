"""Contacts per second through ``POST /v1/intake`` into Redis, next to two baselines, in one run.

- ``plain``: an aiohttp handler that reads the body and answers 202, writing nothing.
- ``xadd``: an aiohttp handler that awaits one redis-py XADD per request.
- ``gateway-unbatched``: the same, with ``redis.max_batch = 1`` (one round trip per contact).
- ``gateway``: the full Intake path (validation, id, deadline, dedupe key, repeat counter,
  stream entry, contact hash, deadline index, ``enqueued`` event) in one Lua script per contact,
  coalesced into pipelines.

Each server runs in its own process on uvloop; the load (raw HTTP/1.1 keep-alive, 64
connections) runs in this process; the three are measured in alternating rounds. Then the
gateway is driven at half its peak rate to read the edge-to-enqueue latency from the records
themselves (``enqueued_at - received_at``), and its peak is measured again with the
append-only file's other fsync policies.

    .venv/bin/python -m bench.intake_bench                 # about a minute
    .venv/bin/python -m bench.intake_bench --seconds 2 --rounds 1

Each round prints the server process's CPU per contact and Valkey's (all its threads, the
same server for every kind): what a contact costs on either side of the round trip.

The half-peak runs also print Valkey's fsyncs of its append-only file that took over 1 ms
(its latency monitor's ``aof-fsync-always`` event, in whole ms from 1 ms on: how many, their
sum and the longest; Valkey 8.1 or later for the first two): with
``appendfsync always`` a batch's answer waits for its fsync, so a slow disk is in the tail.
``--valkey-dir /dev/shm`` puts that Valkey's files on tmpfs (no disk: not durable, a diagnostic
only) to see the tail without the disk.

``--before DIR`` adds ``gateway-before``: the gateway from an older source tree (for example
``git archive <commit> gateway | tar -x -C DIR``) in the same alternating rounds, so a change
is measured before and after in one run; after the half-peak run it is driven at the same
rate, for its edge-to-enqueue tail, and then this tree once more (neither always second).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import orjson

from bench.loadgen import LoadResult, build_request, run_load
from gateway.queueing.keys import Keys

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def body(i: int) -> bytes:
    return orjson.dumps(
        {
            "channel": "web",
            "external_id": f"bench-{i}",
            "sender": {"address": f"+86138{i % 100000000:08d}", "name": "张三"},
            "recipient": "12345",
            "subject": "路灯损坏",
            "text": "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。" * 3,
        }
    )


def gateway_classes() -> tuple[Any, Any]:
    """``parse_settings`` and ``Gateway`` from the gateway on the path, also from a ``--before``
    tree made before the modules were grouped by role (``gateway/server/``)."""
    try:
        from gateway.server.config import parse_settings
        from gateway.server.runtime import Gateway
    except ImportError:
        from gateway.config import parse_settings  # type: ignore[import-not-found,no-redef]
        from gateway.runtime import Gateway  # type: ignore[import-not-found,no-redef]
    return parse_settings, Gateway


SETTINGS: dict[str, dict[str, Any]] = {}
"""Settings a bench adds to the gateway's (``bench/gateway_cost.py``: no overload bounds and
a long write timeout, for a gateway run under valgrind), merged section by section."""


def serve(kind: str, port: int, redis_url: str, prefix: str, ready: Any, src: str = "") -> None:
    import sys

    import uvloop

    if src:  # an older gateway: forget the one this module imported, load it from src
        for name in [n for n in sys.modules if n == "gateway" or n.startswith("gateway.")]:
            del sys.modules[name]
        sys.path.insert(0, src)
        without_plugins()

    uvloop.run(_serve(kind, port, redis_url, prefix, ready))


def without_plugins() -> None:
    """Adapter plugins installed in this environment (``examples/line``) are written against
    today's modules: an older gateway under measurement runs its built-in channels only."""
    import gateway.adapters

    setattr(gateway.adapters, "entry_points", lambda **_: [])  # noqa: B010


async def _serve(kind: str, port: int, redis_url: str, prefix: str, ready: Any) -> None:
    from aiohttp import web

    if kind.startswith("gateway"):
        parse_settings, Gateway = gateway_classes()

        raw: dict[str, dict[str, Any]] = {
            "gateway": {"data_dir": tempfile.mkdtemp(prefix="bench-gw-"), "instance": "bench"},
            "redis": {
                "url": redis_url,
                "prefix": prefix,
                "max_batch": 1 if kind == "gateway-unbatched" else 256,
            },
            "http": {"listen": f"{HOST}:{port}"},
            "api": {"open_to_loopback": True},
        }
        for section, values in SETTINGS.items():
            raw.setdefault(section, {}).update(values)
        settings, configs = parse_settings(raw)
        gateway = Gateway(settings, configs)
        await gateway.start()
        try:  # what `gateway serve` does after its start (an older tree may not have it)
            from gateway.server.runtime import settle_heap
        except ImportError:
            pass
        else:
            settle_heap()
    else:
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url)
        stream = Keys(prefix).contacts

        async def plain(request: web.Request) -> web.Response:
            await request.read()
            return web.json_response({"id": "x"}, status=202)

        async def xadd(request: web.Request) -> web.Response:
            raw = await request.read()
            orjson.loads(raw)
            await client.xadd(stream, {"contact": raw})
            return web.json_response({"id": "x"}, status=202)

        app = web.Application()
        app.router.add_post("/v1/intake", plain if kind == "plain" else xadd)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
    ready.set()
    await asyncio.Event().wait()


class Target:
    def __init__(self, kind: str, redis_url: str, prefix: str, src: str = "") -> None:
        self.kind = kind
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.ready = ctx.Event()
        self.process = ctx.Process(
            target=serve, args=(kind, self.port, redis_url, prefix, self.ready, src), daemon=True
        )
        self.process.start()
        if not self.ready.wait(30):
            raise RuntimeError(f"{kind} server did not start")

    def cpu_ns(self) -> int:
        """CPU time the server process has used so far (Linux schedstat, nanoseconds)."""
        pid = self.process.pid
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


async def drive(
    target: Target, seconds: float, offset: int, rate: float | None = None
) -> LoadResult:
    headers = {"Content-Type": "application/json"}
    return await run_load(
        HOST,
        target.port,
        lambda i: build_request(HOST, target.port, "POST", "/v1/intake", body(offset + i), headers),
        connections=64,
        seconds=seconds,
        rate=rate,
        expect=202,
    )


async def edge_to_enqueue(redis_url: str, prefix: str, since_ms: int) -> tuple[float, float, int]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    entries = await client.xrange(Keys(prefix).contacts, min=f"{since_ms}-0")
    await client.aclose()
    from gateway.contact.clock import parse_time

    lat = sorted(
        parse_time(c["enqueued_at"]) - parse_time(c["received_at"])
        for c in (orjson.loads(f[b"contact"]) for _, f in entries)
    )
    if not lat:
        return float("nan"), float("nan"), 0
    return lat[len(lat) // 2] / 1000, lat[min(len(lat) - 1, int(0.99 * len(lat)))] / 1000, len(lat)


async def slow_fsyncs(redis_url: str, reset: bool = False) -> str:
    """Valkey's fsyncs over 1 ms since the last reset (its latency monitor), as a phrase."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        if reset:
            await client.config_set("latency-monitor-threshold", 1)
            await client.execute_command("LATENCY", "RESET")
            return ""
        for event in await client.execute_command("LATENCY", "LATEST"):
            if event[0] == b"aof-fsync-always":
                # Valkey 8.1 on: name, time, latest ms, max ms, sum ms, count (whole ms,
                # each fsync of 1 ms or more: the sum runs low)
                count, total = (event[5], event[4]) if len(event) >= 6 else ("?", "?")
                return f"fsyncs over 1 ms: {count} (sum {total} ms, longest {event[3]} ms)"
        return "fsyncs over 1 ms: 0"
    finally:
        await client.aclose()


def process_cpu_ns(pid: int) -> int:
    """CPU time a process's threads have used so far (Linux schedstat, nanoseconds): Valkey's
    own work per contact, next to the server's (its I/O threads and fsync thread included)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            pass
    return total


def fmt(r: LoadResult) -> str:
    return (
        f"{r.rate:8.0f}/s  p50 {r.percentile_ms(0.5):6.2f} ms  p99 {r.percentile_ms(0.99):6.2f} ms"
    )


async def main(seconds: float, rounds: int, before: str = "", valkey_dir: str = "") -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    shm = Path(tempfile.mkdtemp(prefix="bench-intake-", dir=valkey_dir)) if valkey_dir else None
    try:
        await _run(tmp, seconds, rounds, before, shm)
    finally:  # the three Valkeys' files: a few hundred MB a run
        shutil.rmtree(tmp, ignore_errors=True)
        if shm is not None:
            shutil.rmtree(shm, ignore_errors=True)


async def _run(tmp: Path, seconds: float, rounds: int, before: str, shm: Path | None) -> None:
    import time

    from gateway.queueing.embedded import EmbeddedRedis

    if shm is not None:
        print(f"the measured Valkey's files in {shm}: a diagnostic, not the durable setup")
    server = EmbeddedRedis((shm or tmp) / "always", appendfsync="always")
    server.start_sync()
    kinds: tuple[str, ...] = ("plain", "xadd", "gateway-unbatched", "gateway")
    # with --before, this tree's gateways are loaded the way the older one is (modules from
    # the tree's folder, this environment's adapter plugins off): only the trees differ
    this = str(Path(__file__).resolve().parent.parent) if before else ""
    targets = {
        k: Target(k, server.url, f"b-{k}", this if k.startswith("gateway") else "")
        for k in kinds
    }
    if before:
        kinds += ("gateway-before",)
        targets["gateway-before"] = Target("gateway-before", server.url, "b-before", before)
    best: dict[str, LoadResult] = {}
    cpu: dict[str, float] = {}  # the server process's CPU per contact, least of the rounds
    valkey: dict[str, float] = {}  # Valkey's CPU per contact (all its threads), least too
    assert server.process is not None
    valkey_pid = server.process.pid
    offset = 0
    try:
        for r in range(rounds):
            for kind, target in targets.items():
                cpu0, valkey0 = target.cpu_ns(), process_cpu_ns(valkey_pid)
                result = await drive(target, seconds, offset)
                cpu_us = (target.cpu_ns() - cpu0) / 1000 / max(1, result.ok)
                valkey_us = (process_cpu_ns(valkey_pid) - valkey0) / 1000 / max(1, result.ok)
                offset += 10_000_000
                print(
                    f"round {r + 1} {kind:8} {fmt(result)}  server CPU {cpu_us:5.1f} us/contact"
                    f"  Valkey {valkey_us:5.1f} us/contact  errors {result.errors}",
                    flush=True,
                )
                if kind not in best or result.rate > best[kind].rate:
                    best[kind] = result
                cpu[kind] = min(cpu.get(kind, cpu_us), cpu_us)
                valkey[kind] = min(valkey.get(kind, valkey_us), valkey_us)
        peak = best["gateway"].rate

        async def at_half(
            kind: str, prefix: str
        ) -> tuple[LoadResult, tuple[float, float, int], str]:
            """``kind`` driven at half the peak: its run, its edge-to-enqueue tail and Valkey's
            slow fsyncs meanwhile."""
            nonlocal offset
            since_ms = int(time.time() * 1000)
            await slow_fsyncs(server.url, reset=True)
            run = await drive(targets[kind], seconds, offset, rate=peak / 2)
            offset += 10_000_000
            tail = await edge_to_enqueue(server.url, prefix, since_ms)
            return run, tail, await slow_fsyncs(server.url)

        half, (p50, p99, n), disk = await at_half("gateway", "b-gateway")
        if before:  # the older tree at the same rate, right after (the tail is noisy)
            half_before, tail_before, disk_before = await at_half("gateway-before", "b-before")
            # and this tree once more after it, so that neither is always second
            half_again, tail_again, disk_again = await at_half("gateway", "b-gateway")
    finally:
        for target in targets.values():
            target.stop()
        server.stop_sync()
    fsync: dict[str, float] = {"always": peak}
    for mode in ("everysec", "no"):
        other = EmbeddedRedis(tmp / mode, appendfsync=mode)
        other.start_sync()
        target = Target("gateway", other.url, f"b-{mode}")
        try:
            fsync[mode] = (await drive(target, seconds, offset)).rate
            offset += 10_000_000
        finally:
            target.stop()
            other.stop_sync()

    plain, xadd = best["plain"].rate, best["xadd"].rate
    print()
    print(
        "| server | contacts/s | client p50 | client p99 | server CPU per contact "
        "| Valkey CPU per contact |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for kind in kinds:
        b = best[kind]
        print(
            f"| {kind} | {b.rate:.0f} | {b.percentile_ms(0.5):.2f} ms "
            f"| {b.percentile_ms(0.99):.2f} ms | {cpu[kind]:.1f} µs | {valkey[kind]:.1f} µs |"
        )
    print()
    unbatched = best["gateway-unbatched"].rate
    print(f"batching gain: gateway / gateway-unbatched = {peak / unbatched:.2f}")
    print(
        "server CPU per contact, plain / gateway = "
        f"{cpu['plain'] / cpu['gateway']:.2f}, xadd / gateway = {cpu['xadd'] / cpu['gateway']:.2f}"
    )
    print(
        f"gateway / plain = {peak / plain:.2f} (aim >= 0.5); "
        f"gateway / xadd = {peak / xadd:.2f} (aim >= 1.2)"
    )
    held = half.rate >= 0.95 * peak / 2
    print(
        f"at half peak ({half.rate:.0f}/s of {peak / 2:.0f}/s asked, {n} contacts): "
        f"edge-to-enqueue p50 {p50:.2f} ms, p99 {p99:.2f} ms (aim < 5 ms)"
        + ("" if held else "; rate not held (a busy machine): not a figure for the aim")
        + f"; Valkey's {disk}"
    )
    if before:
        old = best["gateway-before"].rate
        print(
            f"before ({before}): {old:.0f}/s, gateway / plain = {old / plain:.2f}, "
            f"gateway / xadd = {old / xadd:.2f}; after / before = {peak / old:.2f}; "
            f"server CPU per contact after / before = {cpu['gateway'] / cpu['gateway-before']:.2f}"
        )
        for label, run, (t50, t99, tn), fsyncs in (
            ("before at the same rate", half_before, tail_before, disk_before),
            ("then this tree again", half_again, tail_again, disk_again),
        ):
            print(
                f"{label} ({run.rate:.0f}/s, {tn} contacts): edge-to-enqueue "
                f"p50 {t50:.2f} ms, p99 {t99:.2f} ms"
                + ("" if run.rate >= 0.95 * peak / 2 else "; rate not held")
                + f"; Valkey's {fsyncs}"
            )
    print("appendfsync: " + ", ".join(f"{m} {r:.0f}/s ({r / peak:.2f}x)" for m, r in fsync.items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument(
        "--valkey-dir", default="",
        help="put the measured Valkey's files here (/dev/shm: the tail without the disk; "
        "not durable, a diagnostic)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.before, args.valkey_dir))
