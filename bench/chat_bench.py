"""Chat webhooks per second into Redis (Telegram, WeChat plain and safe mode, Weibo), next to a
plain aiohttp handler that writes nothing, in one run.

The gateway runs the four adapters on an embedded Valkey in this process (uvloop); every
request is a real platform push with a unique message id: a Telegram ``Update`` with the secret
token header, a signed WeChat XML push (plain, and AES safe mode with ``msg_signature``), a
signed Weibo JSON push. Each is verified, decoded, language-tagged and made durable before the
200. Telegram's ``getMe`` is answered by a stub Bot API on loopback. A plain handler that hands an
already normalized contact to ``Intake.submit`` shows the floor every channel shares; the gap
between it and a chat line is what that adapter costs. The load (raw HTTP/1.1 keep-alive,
``bench.loadgen``) runs in its own process and measures the targets in alternating rounds; the
server's own CPU time per request is printed too, steadier than req/s on a shared machine.

    .venv/bin/python -m bench.chat_bench            # about a minute
    .venv/bin/python -m bench.chat_bench --seconds 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import hashlib
import multiprocessing as mp
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from bench.loadgen import LoadResult, build_request, run_load

HOST = "127.0.0.1"
BOT_TOKEN = "123456:BENCH-token"
TG_SECRET = "bench-secret-token"
WX_TOKEN = "bench-wechat-token"
WX_AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
WX_APP_ID = "wx0123456789abcdef"
WB_SECRET = "bench-weibo-secret"
TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。"


def _sign(*parts: str) -> str:
    return hashlib.sha1("".join(sorted(parts)).encode()).hexdigest()


def _wx_xml(i: int, now: int) -> bytes:
    return (
        f"<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
        f"<FromUserName><![CDATA[oBench{i % 5000:06d}]]></FromUserName>"
        f"<CreateTime>{now}</CreateTime><MsgType><![CDATA[text]]></MsgType>"
        f"<Content><![CDATA[{TEXT}]]></Content><MsgId>{10**15 + i}</MsgId></xml>"
    ).encode()


def _aes(message: bytes) -> str:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = base64.b64decode(WX_AES_KEY + "=")
    body = os.urandom(16) + struct.pack(">I", len(message)) + message + WX_APP_ID.encode()
    pad = 32 - len(body) % 32
    body += bytes([pad]) * pad
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return base64.b64encode(enc.update(body) + enc.finalize()).decode()


def request_maker(target: str, port: int, run: str) -> Any:
    """Return ``make(i) -> bytes``: one full HTTP request for push number ``i``."""
    run_n = int(hashlib.sha1(run.encode()).hexdigest()[:6], 16)

    def make(i: int) -> bytes:
        n = run_n * 10**7 + i
        now = int(time.time())
        nonce = str(n)
        if target == "plain":
            return build_request(HOST, port, "POST", "/plain", _wx_xml(n, now), {})
        if target == "intake":
            return build_request(HOST, port, "POST", f"/intake?n={n}", _wx_xml(n, now), {})
        if target == "telegram":
            update = {
                "update_id": n,
                "message": {
                    "message_id": n,
                    "from": {"id": 700000 + n % 5000, "is_bot": False, "first_name": "Li"},
                    "chat": {"id": 700000 + n % 5000, "type": "private"},
                    "date": now,
                    "text": TEXT,
                },
            }
            headers = {
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": TG_SECRET,
            }
            return build_request(
                HOST, port, "POST", "/chat/telegram/tg", orjson.dumps(update), headers
            )
        if target == "wechat":
            q = urlencode(
                {"signature": _sign(WX_TOKEN, str(now), nonce), "timestamp": now, "nonce": nonce}
            )
            return build_request(HOST, port, "POST", f"/chat/wechat/wx?{q}", _wx_xml(n, now), {})
        if target == "wechat-aes":
            encrypted = _aes(_wx_xml(n, now))
            body = (
                "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
                f"<Encrypt><![CDATA[{encrypted}]]></Encrypt></xml>"
            )
            q = urlencode(
                {
                    "signature": _sign(WX_TOKEN, str(now), nonce),
                    "timestamp": now,
                    "nonce": nonce,
                    "encrypt_type": "aes",
                    "msg_signature": _sign(WX_TOKEN, str(now), nonce, encrypted),
                }
            )
            return build_request(HOST, port, "POST", f"/chat/wechat/wxaes?{q}", body.encode(), {})
        if target == "weibo":
            push = {
                "type": "text",
                "receiver_id": 1902538057,
                "sender_id": 2000000000 + n % 5000,
                "created_at": now,
                "text": f"{TEXT} #{n}",
                "data": {},
            }
            q = urlencode(
                {"signature": _sign(WB_SECRET, str(now), nonce), "timestamp": now, "nonce": nonce}
            )
            headers = {"Content-Type": "application/json"}
            return build_request(
                HOST, port, "POST", f"/chat/weibo/wb?{q}", orjson.dumps(push), headers
            )
        raise ValueError(target)

    return make


def _load(plan: list[tuple[str, int, float, str]], connections: int, out: Any) -> None:
    import uvloop

    async def go() -> list[tuple[str, LoadResult, float, float]]:
        results = []
        for target, port, seconds, run in plan:
            make = request_maker(target, port, run)
            t0 = time.time()
            result = await run_load(HOST, port, make, connections=connections, seconds=seconds)
            results.append((target, result, t0, time.time()))
        return results

    out.put(uvloop.run(go()))


async def _measure(
    plan: list[tuple[str, int, float, str]], connections: int
) -> list[tuple[str, LoadResult, float, float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_load, args=(plan, connections, out))
    proc.start()
    result = await asyncio.to_thread(out.get)
    await asyncio.to_thread(proc.join)
    return result  # type: ignore[no-any-return]


async def _plain(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(text="success")


def _intake_only(box: list[Any]) -> Any:
    """A plain handler that hands an already normalized contact to Intake: the floor."""
    from gateway.records import Inbound, Sender

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        gateway = box[0]
        n = request.rel_url.query.get("n", "")
        inbound = Inbound(
            channel="chat",
            adapter="direct",
            external_id=f"direct-{n}",
            sender=Sender(f"wechat:oBench{n}"),
            recipient="gh_bench",
            received_at=gateway.clock.now_us(),
            text=TEXT,
        )
        await gateway.intake.submit(inbound)
        return web.Response(text="success")

    return handler


async def _get_me(request: web.Request) -> web.Response:
    method = request.match_info["method"]
    result: Any = True
    if method == "getMe":
        result = {"id": 123456, "is_bot": True, "first_name": "Bench", "username": "bench_bot"}
    return web.json_response({"ok": True, "result": result})


async def _site(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def main(seconds: float, rounds: int, connections: int, only: tuple[str, ...] = ()) -> None:
    import logging

    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    logging.getLogger("gateway").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis.start_sync()
        stub = web.Application()
        stub.router.add_route("*", "/bot{token}/{method}", _get_me)
        stub_runner, stub_port = await _site(stub)
        plain = web.Application()
        plain.router.add_post("/plain", _plain)
        box: list[Any] = []
        plain.router.add_post("/intake", _intake_only(box))
        plain_runner, plain_port = await _site(plain)
        settings, configs = parse_settings(
            {
                "gateway": {"data_dir": str(Path(tmp) / "gw"), "instance": "bench"},
                "redis": {"url": redis.url, "prefix": "bench"},
                "http": {"listen": "127.0.0.1:0"},
                "adapters": {
                    "tg": {
                        "type": "telegram",
                        "token": BOT_TOKEN,
                        "secret_token": TG_SECRET,
                        "set_webhook": False,
                        "api_base": f"http://{HOST}:{stub_port}/bot",
                        "file_base": f"http://{HOST}:{stub_port}/file/bot",
                    },
                    "wx": {"type": "wechat", "app_id": WX_APP_ID, "token": WX_TOKEN},
                    "wxaes": {
                        "type": "wechat",
                        "app_id": WX_APP_ID,
                        "token": WX_TOKEN,
                        "mode": "safe",
                        "encoding_aes_key": WX_AES_KEY,
                    },
                    "wb": {"type": "weibo", "app_secret": WB_SECRET},
                },
            }
        )
        gateway = Gateway(settings, configs)
        await gateway.start()
        box.append(gateway)
        await asyncio.wait_for(gateway.adapters["tg"].ready.wait(), 30)  # type: ignore[attr-defined]
        gw_port = gateway.http_port
        targets = {
            "plain aiohttp (writes nothing)": ("plain", plain_port),
            "aiohttp + Intake.submit only": ("intake", plain_port),
            "telegram webhook -> redis": ("telegram", gw_port),
            "wechat plain -> redis": ("wechat", gw_port),
            "wechat safe (AES) -> redis": ("wechat-aes", gw_port),
            "weibo JSON -> redis": ("weibo", gw_port),
        }
        if only:
            keep = {*only, "plain", "intake"}
            targets = {k: v for k, v in targets.items() if v[0] in keep}
        plan = [(kind, port, 1.0, f"warm-{kind}") for kind, port in targets.values()]
        for r in range(rounds):
            plan += [(kind, port, seconds, f"r{r}-{kind}") for kind, port in targets.values()]
        samples: list[tuple[float, float]] = []

        async def sample() -> None:
            while True:
                samples.append((time.time(), time.process_time()))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        try:
            measured = await _measure(plan, connections)
            stored = await gateway.redis.xlen(gateway.keys.contacts)
        finally:
            sampler.cancel()
            await gateway.stop()
            await plain_runner.cleanup()
            await stub_runner.cleanup()
            redis.stop_sync()

    def cpu_at(t: float) -> float:
        i = min(bisect.bisect_left(samples, (t, 0.0)), len(samples) - 1)
        return samples[i][1]

    warm = len(targets)
    by_kind: dict[str, list[LoadResult]] = {}
    cpu_s: dict[str, float] = {}
    for kind, result, t0, t1 in measured[warm:]:
        by_kind.setdefault(kind, []).append(result)
        cpu_s[kind] = cpu_s.get(kind, 0.0) + cpu_at(t1) - cpu_at(t0)
    print(
        f"\nChat webhooks, {connections} keep-alive connections, {rounds} x {seconds:g}s per target"
    )
    print(
        f"{'target':32} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs plain':>9}"
        f" {'server CPU us/req':>18}"
    )
    plain_rate = 0.0
    for name, (kind, _) in targets.items():
        runs = by_kind[kind]
        ok = sum(r.ok for r in runs)
        total_s = sum(r.seconds for r in runs)
        rate = ok / total_s if total_s else 0.0
        merged = LoadResult(latencies_us=[x for r in runs for x in r.latencies_us])
        if kind == "plain":
            plain_rate = rate
        ratio = rate / plain_rate if plain_rate else float("nan")
        errors = sum(r.errors for r in runs)
        per_req = cpu_s[kind] / ok * 1e6 if ok else float("nan")
        print(
            f"{name:32} {rate:9.0f} {merged.percentile_ms(0.5):8.2f} "
            f"{merged.percentile_ms(0.99):8.2f} {errors:7d} {ratio:9.2f} {per_req:18.0f}"
        )
    print(f"aim: each chat path >= 0.5 of plain; contacts on the stream: {stored}")
    print("the Intake.submit line is the floor any channel can reach: plain handler + Intake only")
    print(
        "server CPU = this process (aiohttp, adapters, Intake, redis client), not Valkey's;"
        " req/s is shared-machine throughput, CPU per request is the steadier number"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--only", nargs="*", default=(), help="telegram wechat wechat-aes weibo (plain always runs)"
    )
    args = parser.parse_args()
    import uvloop

    uvloop.run(main(args.seconds, args.rounds, args.connections, tuple(args.only)))
