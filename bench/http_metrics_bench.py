"""Cost of the HTTP request metrics (``gateway_http_requests_total`` and the duration histogram).

Two aiohttp servers in this process's event loop answer the same trivial route, one built by
``build_app`` without metrics (the baseline) and one with them; a client sends ``--requests``
GETs to each over keep-alive connections, in alternating rounds, and the medians of the rounds
are compared. Both servers share the machine's noise, so the ratio is what to read.

    .venv/bin/python -m bench.http_metrics_bench              # about 20 s
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
from aiohttp import web

from gateway.server.http import build_app
from gateway.server.metrics import Metrics


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(app: web.Application) -> tuple[web.AppRunner, int]:
    app.router.add_get("/sms/{name}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def round_trip(http: aiohttp.ClientSession, port: int, n: int, conc: int) -> float:
    """Requests per second for ``n`` GETs, ``conc`` at a time."""
    url = f"http://127.0.0.1:{port}/sms/box1"

    async def worker(count: int) -> None:
        for _ in range(count):
            async with http.get(url) as resp:
                await resp.read()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n // conc) for _ in range(conc)))
    return n / (time.perf_counter() - started)


async def main(requests: int, rounds: int, conc: int) -> None:
    bare, bare_port = await serve(build_app(1 << 20))
    measured, measured_port = await serve(build_app(1 << 20, Metrics()))
    rates: dict[str, list[float]] = {"bare": [], "metrics": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc)) as http:
        await round_trip(http, bare_port, 500, conc)  # warm both
        await round_trip(http, measured_port, 500, conc)
        for i in range(rounds):  # alternate which goes first
            order = [("bare", bare_port), ("metrics", measured_port)]
            for name, port in order if i % 2 == 0 else order[::-1]:
                rates[name].append(await round_trip(http, port, requests, conc))
    await bare.cleanup()
    await measured.cleanup()
    b, m = statistics.median(rates["bare"]), statistics.median(rates["metrics"])
    print(f"{'server':<10}{'req/s (median of ' + str(rounds) + ')':>26}")
    print(f"{'bare':<10}{b:>26,.0f}")
    print(f"{'metrics':<10}{m:>26,.0f}")
    print(f"ratio metrics/bare: {m / b:.3f}  (per request: {1e6 / m - 1e6 / b:+.1f} us)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.rounds, args.concurrency))
