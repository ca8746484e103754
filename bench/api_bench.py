"""Case-systems throughput: contacts per second through the consumer API and through the pusher.

1. ``api``: contacts are put in through ``POST /v1/intake``; then ``--consumers`` members of
   one group read them with ``GET /v1/groups/{group}/contacts?wait_ms=1000&count=B`` (long
   poll) and acknowledge each batch with ``POST .../ack``, until every contact is acknowledged.
   Measured for two batch sizes, each with a fresh group over the same contacts.
2. ``push``: the same contacts, POSTed one by one, in order, signed, to a local aiohttp
   receiver that answers 204 (its consumer group is created at the start of the stream, then
   a gateway with the subscriber is started and the clock runs until the receiver has all).

The gateway runs in its own process on uvloop with an embedded Valkey; the clients run here.

    .venv/bin/python -m bench.api_bench                  # about a minute
    .venv/bin/python -m bench.api_bench --contacts 2000  # quick
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.cases.push.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys

HOST = "127.0.0.1"
TOKEN = "bench-token-0123456789"
SECRET = "bench-secret"
PREFIX = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def settings_raw(data_dir: Path, redis_url: str, port: int, receiver: int | None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "gateway": {"data_dir": str(data_dir), "instance": "bench", "log_level": "WARNING"},
        "redis": {"url": redis_url, "prefix": PREFIX},
        "http": {"listen": f"{HOST}:{port}"},
        "api": {"keys": [{"key": TOKEN, "name": "bench", "scopes": ["intake", "admin"]}]},
    }
    if receiver is not None:
        raw["push"] = {
            "subscribers": [
                {"name": "bench", "url": f"http://{HOST}:{receiver}/hook", "secret": SECRET}
            ]
        }
    return raw


def serve(raw: dict[str, Any], ready: Any) -> None:
    import uvloop

    uvloop.run(_serve(raw, ready))


async def _serve(raw: dict[str, Any], ready: Any) -> None:
    import logging

    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    logging.basicConfig(level=logging.WARNING)
    settings, configs = parse_settings(raw, "<bench>")
    gateway = Gateway(settings, configs)
    await gateway.start()
    ready.set()
    try:
        await asyncio.Event().wait()
    finally:
        await gateway.stop()


def start_gateway(raw: dict[str, Any]) -> mp.Process:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=serve, args=(raw, ready), daemon=True)
    proc.start()
    if not ready.wait(60):
        proc.terminate()
        raise RuntimeError("gateway did not start")
    return proc


async def load_contacts(base: str, count: int) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    sem = asyncio.Semaphore(64)
    text = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。" * 3

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"channel": "web", "external_id": f"b-{i}", "sender": f"+86138{i:08d}", "text": text}
        async with sem, session.post(base + "/v1/intake", json=body, headers=headers) as r:
            assert r.status == 202, await r.text()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(count)))


async def consume(base: str, group: str, consumers: int, batch: int, total: int) -> float:
    """Read and ack ``total`` contacts with ``consumers`` long-polling members; return seconds."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    done = 0
    finished = asyncio.Event()

    async def member(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal done
        url = f"{base}/v1/groups/{group}/contacts"
        params = {"consumer": f"c{n}", "count": str(batch), "wait_ms": "1000"}
        while not finished.is_set():
            async with session.get(url, params=params, headers=headers) as r:
                page = orjson.loads(await r.read())
            ids = [e["entry_id"] for e in page["entries"]]
            if not ids:
                continue
            async with session.post(url + "/ack", json={"ids": ids}, headers=headers) as r:
                acked = orjson.loads(await r.read())["acked"]
            done += acked
            if done >= total:
                finished.set()

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(member(session, n)) for n in range(consumers)]
        await finished.wait()
        seconds = time.perf_counter() - start  # not the idle long polls still waiting
        await asyncio.gather(*tasks)
        return seconds


class Receiver:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.verified = 0
        self.done = asyncio.Event()

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.count == 0:
            self.first = time.perf_counter()
        self.count += 1
        if self.count % 100 == 1:  # check a sample: costs this process, not the gateway
            ok = verify(
                SECRET,
                request.headers[TIMESTAMP_HEADER],
                body,
                request.headers[SIGNATURE_HEADER],
                now_s=int(time.time()),
            )
            self.verified += int(ok)
        if self.count >= self.expected:
            self.last = time.perf_counter()
            self.done.set()
        return web.Response(status=204)


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="api-bench-"))
    redis = EmbeddedRedis(tmp / "redis")
    await redis.start()
    port = free_port()
    base = f"http://{HOST}:{port}"
    proc = start_gateway(settings_raw(tmp / "gw", redis.url, port, None))
    rows: list[tuple[str, str, str]] = []
    try:
        t0 = time.perf_counter()
        await load_contacts(base, args.contacts)
        load_s = time.perf_counter() - t0
        rows.append(
            (
                "intake (loading only, not measured here)",
                f"{args.contacts / load_s:,.0f}/s",
                f"{args.contacts}",
            )
        )
        for batch in (100, 10):
            seconds = await consume(base, f"g{batch}", args.consumers, batch, args.contacts)
            rows.append(
                (
                    f"api long poll + ack, batch {batch}, {args.consumers} consumers",
                    f"{args.contacts / seconds:,.0f}/s",
                    f"{seconds:.2f} s",
                )
            )
    finally:
        proc.terminate()
        proc.join(10)
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis.url)
    await client.xgroup_create(Keys(PREFIX).contacts, "gateway-push.bench", id="0")
    await client.aclose()
    receiver = Receiver(args.contacts)
    app = web.Application()
    app.router.add_post("/hook", receiver.hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    rport = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    port = free_port()
    proc = start_gateway(settings_raw(tmp / "gw", redis.url, port, rport))
    try:
        await asyncio.wait_for(receiver.done.wait(), 600)
        seconds = receiver.last - receiver.first
        rows.append(
            (
                "push, one subscriber, in order, signed",
                f"{args.contacts / max(seconds, 1e-9):,.0f}/s",
                f"{seconds:.2f} s ({receiver.verified} sampled signatures valid)",
            )
        )
    finally:
        proc.terminate()
        proc.join(10)
        await runner.cleanup()
        await redis.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  {'rate':>10}  detail")
    for what, rate, detail in rows:
        print(f"{what:<{width}}  {rate:>10}  {detail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=20000)
    parser.add_argument("--consumers", type=int, default=8)
    args, _ = parser.parse_known_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
