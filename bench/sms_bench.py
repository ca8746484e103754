"""Inbound SMS webhooks per second into Redis, next to a plain aiohttp handler, in one run.

The gateway runs a Kannel adapter on an embedded Valkey; every request is a Kannel get-url
(UCS-2 Chinese text, unique %I) that the gateway decodes, normalizes and makes durable before
answering 200. The baseline is an aiohttp handler that reads the same request and writes
nothing. A third target calls ``Intake.submit`` with an already normalized contact from a
plain handler: the gap between it and the Kannel line is what the SMS adapter itself costs
(raw query parsing, UCS-2 decoding, E.164). A separate load process (so the client does not
share the server's core) drives each target in alternating rounds; p50 and p99 are client
round-trip latencies.

    .venv/bin/python bench/sms_bench.py            # about a minute
    .venv/bin/python bench/sms_bench.py --seconds 5 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import aiohttp
from aiohttp import web

SECRET = "bench-secret"
AUTH = {"Authorization": "Basic " + base64.b64encode(f"kannel:{SECRET}".encode()).decode()}
TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。"


def query(n: int, run: str) -> str:
    text = quote_from_bytes(TEXT.encode("utf-16-be"), safe="")
    return (
        f"from=%2B86138{n % 100000000:08d}&to=12345&text={text}&time=1795594480"
        f"&id={run}-{n}&coding=2&charset=UTF-16BE&udh=&smsc=bench"
    )


def _loop() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


async def _drive(
    url: str, seconds: float, concurrency: int, run: str
) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                n = next(counter)
                start = time.perf_counter()
                async with http.get(f"{url}?{query(n, run)}", headers=AUTH) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                        continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), errors, latencies


def _client(url: str, seconds: float, concurrency: int, run: str, out: Any) -> None:
    out.put(_loop()(_drive(url, seconds, concurrency, run)))


async def _measure(
    url: str, seconds: float, concurrency: int, run: str
) -> tuple[int, int, list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client, args=(url, seconds, concurrency, run, out))
    proc.start()
    result = await asyncio.to_thread(out.get)
    await asyncio.to_thread(proc.join)
    return result  # type: ignore[no-any-return]


async def _plain(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=200, body=b"", content_type="text/plain")


def _intake_only(gateway: Any) -> Any:
    from gateway.records import Inbound, Sender

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        n = request.rel_url.query.get("id", "")
        sender = request.rel_url.query.get("from", "+8613800138000")  # unique, like Kannel
        inbound = Inbound(
            channel="sms", adapter="kannel", external_id=f"direct-{n}",
            sender=Sender(sender), recipient="12345",
            received_at=gateway.clock.now_us(), text=TEXT,
        )
        await gateway.intake.submit(inbound)
        return web.Response(status=200, body=b"", content_type="text/plain")

    return handler


async def main(seconds: float, rounds: int, concurrency: int) -> None:
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis.start_sync()
        settings, configs = parse_settings({
            "gateway": {"data_dir": str(Path(tmp) / "gw"), "instance": "bench"},
            "redis": {"url": redis.url, "prefix": "bench"},
            "http": {"listen": "127.0.0.1:0"},
            "adapters": {"kannel": {"type": "kannel", "secret": SECRET, "path": "/sms/kannel"}},
        })
        gateway = Gateway(settings, configs)
        await gateway.start()
        app = web.Application()
        app.router.add_get("/plain", _plain)
        app.router.add_get("/intake", _intake_only(gateway))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        plain_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        targets = {
            "plain aiohttp (writes nothing)": f"http://127.0.0.1:{plain_port}/plain",
            "aiohttp + Intake.submit only": f"http://127.0.0.1:{plain_port}/intake",
            "kannel -> gateway -> redis": f"http://127.0.0.1:{gateway.http_port}/sms/kannel",
        }
        results: dict[str, list[tuple[int, int, list[float], float]]] = {k: [] for k in targets}
        try:
            for i, url in enumerate(targets.values()):  # warm-up
                await _measure(url, 2.0, concurrency, f"warm{i}")
            for r in range(rounds):
                for i, (name, url) in enumerate(targets.items()):
                    t0 = time.perf_counter()
                    ok, errors, lat = await _measure(url, seconds, concurrency, f"r{r}t{i}")
                    results[name].append((ok, errors, lat, time.perf_counter() - t0))
            stored = await gateway.redis.xlen(gateway.keys.contacts)
        finally:
            await runner.cleanup()
            await gateway.stop()
            redis.stop_sync()

    load = os.getloadavg()[0]
    print(f"\nSMS inbound webhooks, {concurrency} concurrent clients, {rounds} x {seconds:g}s each"
          f" (load average {load_before:.1f} before, {load:.1f} after)")
    print(f"{'target':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    rates: dict[str, float] = {}
    for name, runs in results.items():
        ok = sum(r[0] for r in runs)
        errors = sum(r[1] for r in runs)
        lat = sorted(x for r in runs for x in r[2])
        rate = ok / (seconds * len(runs))
        rates[name] = rate
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        print(f"{name:34} {rate:9.0f} {p50:8.2f} {p99:8.2f} {errors:7d}")
    plain, intake, gw = rates.values()
    print(f"kannel path / plain: {gw / plain:.2f} (aim >= 0.5); "
          f"kannel path / Intake alone: {gw / intake:.2f}; contacts on the stream: {stored}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    _loop()(main(args.seconds, args.rounds, args.concurrency))
