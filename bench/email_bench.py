"""Inbound mail per second into Redis, next to a bare aiosmtpd handler, in one run.

The gateway runs an ``smtp`` adapter on an embedded Valkey: every message is stored raw,
normalized (GBK subject, UTF-8 body, a base64 attachment for the large size), its files
stored, and made durable before the 250. The baseline is aiosmtpd with the same options and a
handler that answers 250 and writes nothing, and our own listener (policy hooks, bounds) with an
accept step that does nothing, which separates the protocol layer from the durable work. A
separate load process (aiosmtplib, persistent
connections, a unique Message-ID per message) drives each target for 2 KB and 200 KB messages
over 8 and 50 connections; p50 and p99 are client round-trip times of one whole transaction.

    .venv/bin/python bench/email_bench.py               # about a minute
    .venv/bin/python bench/email_bench.py --seconds 2
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

MAILBOX = "12345@hotline.example.gov.cn"
TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。谢谢！\r\n"


def message(size: int) -> bytes:
    """A realistic message of about ``size`` bytes with an ``@@ID@@`` placeholder."""
    subject = "=?gb2312?B?" + base64.b64encode("路灯损坏投诉".encode("gbk")).decode() + "?="
    head = (
        "Return-Path: <citizen@example.org>\r\n"
        "Received: from mx.example.org (mx.example.org [192.0.2.1]) by gw;"
        " Wed, 25 Nov 2026 08:00:00 +0800\r\n"
        "From: =?utf-8?B?5byg5LiJ?= <citizen@example.org>\r\n"
        f"To: {MAILBOX}\r\nSubject: {subject}\r\n"
        "Date: Wed, 25 Nov 2026 08:00:00 +0800\r\nMessage-ID: <@@ID@@@example.org>\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    body_text = (TEXT * 40).encode()
    if size < 10_000:
        body = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        raw = head + body + body_text
        return raw[: size - 2] + b"\r\n" if len(raw) > size else raw
    photo = (bytes(range(256)) * (size // 256 + 1))[: size * 3 // 4 - len(head) - 2000]
    encoded = base64.encodebytes(photo).replace(b"\n", b"\r\n")
    return head + (
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + body_text[:1200] + b"\r\n--b\r\n"
        b"Content-Type: image/jpeg\r\nContent-Disposition: attachment; filename=photo.jpg\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--b--\r\n"
    )


def _loop() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


async def _drive(
    port: int, seconds: float, connections: int, size: int, run: str
) -> tuple[int, int, list[float]]:
    import aiosmtplib

    template = message(size)
    latencies: list[float] = []
    errors = 0

    async def worker(w: int) -> None:
        nonlocal errors
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=60)
        await client.connect()
        await ready.wait()
        i = 0
        while time.perf_counter() < deadline:
            raw = template.replace(b"@@ID@@", f"{run}-{w}-{i}".encode())
            i += 1
            start = time.perf_counter()
            try:
                await client.sendmail("citizen@example.org", [MAILBOX], raw)
            except aiosmtplib.SMTPException:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
        await client.quit()

    ready = asyncio.Event()
    deadline = float("inf")
    tasks = [asyncio.create_task(worker(w)) for w in range(connections)]
    await asyncio.sleep(0.2)
    deadline = time.perf_counter() + seconds
    ready.set()
    await asyncio.gather(*tasks)
    return len(latencies), errors, latencies


def _client(port: int, seconds: float, connections: int, size: int, run: str, out: Any) -> None:
    out.put(_loop()(_drive(port, seconds, connections, size, run)))


async def _measure(
    port: int, seconds: float, connections: int, size: int, run: str
) -> tuple[int, int, list[float]]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_client, args=(port, seconds, connections, size, run, out))
    proc.start()
    result = await asyncio.to_thread(out.get)
    await asyncio.to_thread(proc.join)
    return result  # type: ignore[no-any-return]


def _cpu_s(pid: int | None) -> float:
    """CPU seconds of this process (all threads) plus those of process ``pid``."""
    total = time.process_time()
    if pid is not None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


class _Bare:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK"


async def _accept_nothing(raw: bytes, envelope: Any) -> str:
    return "00000000-0000-7000-8000-000000000000"


async def main(seconds: float) -> None:
    from aiosmtpd.smtp import SMTP

    from gateway.channels.email.common import EmailConfig
    from gateway.channels.email.smtp import Handler, Listener
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.config import HostPort, parse_settings
    from gateway.server.runtime import Gateway

    sizes = {"2 KB": 2 * 1024, "200 KB": 200 * 1024}
    fanouts = (8, 50)
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        redis.start_sync()
        settings, configs = parse_settings({
            "gateway": {"data_dir": str(Path(tmp) / "gw"), "instance": "bench"},
            "redis": {"url": redis.url, "prefix": "bench"},
            "http": {"listen": "127.0.0.1:0"},
            # every message is from one address: a throughput run, not a rate-limit test
            "limits": {"sender_contacts": 0},
            "adapters": {"mail": {"type": "smtp", "listen": "127.0.0.1:0",
                                  "mailboxes": [MAILBOX]}},
        })
        gateway = Gateway(settings, configs)
        await gateway.start()
        loop = asyncio.get_running_loop()
        bare = await loop.create_server(
            lambda: SMTP(_Bare(), data_size_limit=25 * 1024 * 1024, enable_SMTPUTF8=True,
                         hostname="bare", loop=loop),
            "127.0.0.1", 0,
        )
        layer_config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
        layer = Listener(layer_config, Handler(layer_config, _accept_nothing))
        await layer.start()
        targets = {
            "bare aiosmtpd (writes nothing)": bare.sockets[0].getsockname()[1],
            "our listener (accepts nothing)": layer.port,
            "smtp -> gateway -> redis": gateway.adapters["mail"].port,  # type: ignore[attr-defined]
        }
        redis_pid = redis.process.pid if redis.process else None
        rows: list[tuple[str, str, int, int, int, list[float], float]] = []
        try:
            for name, port in targets.items():  # warm-up
                await _measure(port, 1.0, 8, sizes["2 KB"], f"warm{len(name)}")
            for label, size in sizes.items():
                for fanout in fanouts:
                    for name, port in targets.items():
                        cpu0 = _cpu_s(redis_pid)
                        ok, errors, lat = await _measure(
                            port, seconds, fanout, size, f"{label[:3]}{fanout}"
                        )
                        cpu = _cpu_s(redis_pid) - cpu0
                        rows.append((name, label, fanout, ok, errors, lat, cpu))
            stored = await gateway.redis.xlen(gateway.keys.contacts)
        finally:
            bare.close()
            await layer.stop()
            await gateway.stop()
            redis.stop_sync()

    print(f"\nInbound SMTP, persistent connections, {seconds:g} s per cell")
    print("(cpu us/msg: server process, all threads, plus the Redis server; the load generator")
    print(" runs in its own process and is not counted)")
    print(f"{'target':32} {'size':>7} {'conns':>6} {'msg/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'cpu us/msg':>11}")
    rates: dict[tuple[str, str, int], tuple[float, float]] = {}
    for name, label, fanout, ok, errors, lat, cpu in rows:
        rate = ok / seconds
        per_msg = cpu / ok * 1e6 if ok else float("nan")
        rates[(name, label, fanout)] = (rate, per_msg)
        lat.sort()
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        print(f"{name:32} {label:>7} {fanout:6d} {rate:8.0f} {p50:8.2f} {p99:8.2f} {errors:7d} "
              f"{per_msg:11.0f}")
    bare_name, _, gw_name = targets
    print("gateway / bare (throughput; CPU cost per message, bare / gateway):")
    for label in sizes:
        for fanout in fanouts:
            gw_rate, gw_cpu = rates[(gw_name, label, fanout)]
            bare_rate, bare_cpu = rates[(bare_name, label, fanout)]
            aim = " (aim >= 0.70)" if label == "2 KB" else ""
            print(f"  {label:>6}, {fanout:2d} connections: {gw_rate / max(bare_rate, 1e-9):.2f}; "
                  f"{bare_cpu / gw_cpu:.2f}{aim}")
    print(f"contacts on the stream: {stored}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    _loop()(main(args.seconds))
