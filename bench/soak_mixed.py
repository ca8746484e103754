"""Mixed-load soak of the whole gateway: a real ``gateway serve --workers N`` under a hotline's
load shape, for minutes, with memory over time, p99 edge-to-enqueue per medium and lost contacts.

    .venv/bin/python -m bench.soak_mixed                       # 3,000 contacts/s for 10 minutes
    .venv/bin/python -m bench.soak_mixed --rate 600 --minutes 1 --workers 2

The gateway runs as its own process tree (parent, N workers, the embedded Valkey with
``appendfsync always``) with one adapter per medium: ``asterisk`` (FastAGI), ``smtp``,
``kannel`` (get-url), ``telegram`` (webhook; getMe answered by a local fake Bot API) and
``wechat`` (plain mode), and ``POST /v1/intake`` for web. The load is an open loop at
``--rate`` contacts/s split by ``SHARE`` (a 12345 line is mostly calls): each contact is
started on schedule whatever the gateway's pace (at most ``--in-flight`` per medium at once; a
contact that finds that many still open is counted as ``behind``, not sent). Every contact is
new (unique external ids, Message-IDs, call ids) and what the peer was told is recorded: the id
from the 202 / the 250 / ``GATEWAY_CONTACT_ID``, or the external id for Kannel, Telegram and
WeChat (their answers carry no id).

Printed: achieved rate per medium against the target; RSS of the gateway processes and of
Valkey every ``--sample`` seconds; at the end (after every spool is empty) the stream read
whole: per medium acknowledged, on the stream, lost (acknowledged, not on the stream: must be
0), duplicated, and edge-to-enqueue (``enqueued_at - received_at`` of the records) p50/p99/max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.chat_bench import TEXT, TG_SECRET, WX_APP_ID, WX_TOKEN, _sign, _wx_xml
from bench.loadgen import build_request
from gateway.contact.clock import parse_time
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from gateway.server.workers import run_dir
from tests.channels.chat.fakes import BOT_TOKEN, FakeBotApi
from tests.channels.sms.test_kannel import AUTH, SECRET, get_url

HOST = "127.0.0.1"
PREFIX = "soak"
MAILBOX = "12345@hotline.example.gov.cn"
SHARE = {"voice": 0.55, "web": 0.20, "telegram": 0.08, "wechat": 0.07, "sms": 0.07, "mail": 0.03}
"""Share of each medium in the load (Telegram and WeChat are the chat medium)."""
ADAPTER = {
    "voice": "pbx", "web": "api", "telegram": "tg", "wechat": "wx", "sms": "kannel", "mail": "mail"
}
AGI_HEADER = (
    "agi_network: yes\nagi_network_script: intake\nagi_request: agi://127.0.0.1/intake\n"
    "agi_channel: PJSIP/trunk-{n:08x}\nagi_language: zh\nagi_type: PJSIP\n"
    "agi_uniqueid: {run}.{n}\nagi_version: 22.10.1\nagi_callerid: 1380{cid:07d}\n"
    "agi_calleridname: Caller\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
    "agi_callingtns: 0\nagi_dnid: 12345\nagi_rdnis: unknown\nagi_context: intake\n"
    "agi_extension: 12345\nagi_priority: 3\nagi_enhanced: 0.0\nagi_accountcode: \n"
    "agi_threadid: 140206706226880\n\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_valkey(pid: int) -> bool:
    try:
        return "server" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


@dataclass
class Medium:
    name: str
    rate: float
    sent: int = 0
    acked: int = 0
    refused: int = 0
    failed: int = 0
    behind: int = 0
    open: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    """What the refused contacts were answered (status codes)."""
    ids: set[str] = field(default_factory=set)
    """Contact ids the peer was told (web, mail, voice)."""
    external: set[str] = field(default_factory=set)
    """External ids acknowledged (sms, telegram, wechat)."""


class HttpPool:
    """Keep-alive HTTP/1.1 connections (raw streams, as bench/loadgen.py): one request at a time
    on each, handed out from a queue."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.free: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = (
            asyncio.Queue()
        )
        for _ in range(size):
            self.free.put_nowait(None)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        conn = await self.free.get()
        try:
            if conn is None:
                conn = await asyncio.open_connection(HOST, self.port)
            reader, writer = conn
            writer.write(raw)
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionError("closed")
            status = int(status_line.split()[1])
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length else b""
        except BaseException:
            if conn is not None:
                conn[1].close()
            self.free.put_nowait(None)
            raise
        self.free.put_nowait(conn)
        return status, body


class Load:
    def __init__(self, http_port: int, smtp_port: int, agi_port: int, rate: float) -> None:
        self.http = HttpPool(http_port, 48)
        self.smtp_port = smtp_port
        self.agi_port = agi_port
        self.run = uuid.uuid4().hex[:8]
        self.media = {name: Medium(name, rate * share) for name, share in SHARE.items()}
        self.counter = 0

    def next_n(self) -> int:
        self.counter += 1
        return self.counter

    async def one(self, medium: Medium) -> None:
        n = self.next_n()
        try:
            ok = await getattr(self, f"_{medium.name}")(medium, n)
        except (OSError, asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            medium.failed += 1
            return
        if ok:
            medium.acked += 1
        else:
            medium.refused += 1

    async def _web(self, m: Medium, n: int) -> bool:
        body = orjson.dumps(
            {
                "channel": "web",
                "external_id": f"{self.run}-{n}",
                "sender": {"address": f"+86139{random.randrange(10**8):08d}"},
                "recipient": "12345",
                "subject": "路灯损坏",
                "text": TEXT,
            }
        )
        raw = build_request(
            HOST, self.http.port, "POST", "/v1/intake", body, {"Content-Type": "application/json"}
        )
        status, answer = await self.http.request(raw)
        if status != 202:
            m.answers[str(status)] += 1
            return False
        m.ids.add(orjson.loads(answer)["id"])
        return True

    async def _sms(self, m: Medium, n: int) -> bool:
        msg_id = str(uuid.uuid4())
        query = get_url(
            TEXT[:30].encode(), sender=f"+86137{random.randrange(10**8):08d}", msg_id=msg_id,
            ts=str(int(time.time())),
        )
        raw = build_request(HOST, self.http.port, "GET", f"/sms/kannel?{query}", b"", AUTH)
        status, _ = await self.http.request(raw)
        if status != 200:
            m.answers[str(status)] += 1
            return False
        m.external.add(msg_id)
        return True

    async def _telegram(self, m: Medium, n: int) -> bool:
        chat = 800000 + n % 50000
        update = {
            "update_id": n,
            "message": {
                "message_id": n,
                "from": {"id": chat, "is_bot": False, "first_name": "Li"},
                "chat": {"id": chat, "type": "private"},
                "date": int(time.time()),
                "text": TEXT,
            },
        }
        headers = {
            "Content-Type": "application/json",
            "X-Telegram-Bot-Api-Secret-Token": TG_SECRET,
        }
        raw = build_request(
            HOST, self.http.port, "POST", "/chat/telegram/tg", orjson.dumps(update), headers
        )
        status, _ = await self.http.request(raw)
        if status != 200:
            m.answers[str(status)] += 1
            return False
        m.external.add(f"{chat}:{n}")
        return True

    async def _wechat(self, m: Medium, n: int) -> bool:
        now = int(time.time())
        unique = int(self.run, 16) % 10**6 * 10**8 + n
        q = urlencode(
            {"signature": _sign(WX_TOKEN, str(now), str(n)), "timestamp": now, "nonce": n}
        )
        raw = build_request(
            HOST, self.http.port, "POST", f"/chat/wechat/wx?{q}", _wx_xml(unique, now), {}
        )
        status, _ = await self.http.request(raw)
        if status != 200:
            m.answers[str(status)] += 1
            return False
        m.external.add(str(10**15 + unique))
        return True

    async def _mail(self, m: Medium, n: int) -> bool:
        reader, writer = await asyncio.open_connection(HOST, self.smtp_port)
        try:

            async def reply() -> bytes:
                while True:
                    line = await reader.readline()
                    if not line:
                        raise ConnectionError("closed")
                    if line[3:4] != b"-":
                        return line

            await reply()
            writer.write(b"EHLO client.example.org\r\n")
            await reply()
            envelope = f"MAIL FROM:<c{n}@example.org>\r\nRCPT TO:<{MAILBOX}>\r\nDATA\r\n"
            writer.write(envelope.encode())
            for _ in range(3):
                answer = await reply()
                if answer[:1] not in (b"2", b"3"):
                    return False
            message = (
                f"From: c{n}@example.org\r\nTo: {MAILBOX}\r\nSubject: soak {n}\r\n"
                f"Message-ID: <{self.run}-{n}@example.org>\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n\r\n"
                f"{TEXT}\r\n" * 8 + ".\r\n"
            )
            writer.write(message.encode())
            answer = await reply()
            writer.write(b"QUIT\r\n")
            if not answer.startswith(b"250"):
                m.answers[answer[:3].decode()] += 1
                return False
            m.ids.add(answer.split()[-1].decode())
            return True
        finally:
            writer.close()

    async def _voice(self, m: Medium, n: int) -> bool:
        reader, writer = await asyncio.open_connection(HOST, self.agi_port)
        variables: dict[str, str] = {}
        try:
            writer.write(AGI_HEADER.format(run=self.run, n=n, cid=n % 10**7).encode())
            while True:
                line = await reader.readline()
                if not line:
                    break
                words = line.decode().split(" ", 3)
                if words[:2] == ["SET", "VARIABLE"] and len(words) == 4:
                    variables[words[2].strip('"')] = words[3].strip().strip('"')
                elif words[0] == "EXEC" and len(words) >= 3 and words[1].lower() == "mset":
                    for pair in " ".join(words[2:]).strip().strip('"').split(","):
                        name, _, value = pair.partition("=")
                        variables[name] = value
                get = words[0] == "GET"
                writer.write(b"200 result=1 (1795594483.0)\n" if get else b"200 result=1\n")
        finally:
            writer.close()
        if variables.get("GATEWAY_STATUS") not in ("OK", "SPOOLED"):
            m.answers[variables.get("GATEWAY_STATUS", "none")] += 1
            return False
        m.ids.add(variables["GATEWAY_CONTACT_ID"])
        return True

    async def drive(self, seconds: float, in_flight: int) -> None:
        tasks: set[asyncio.Task[None]] = set()

        async def ticker(m: Medium) -> None:
            if m.rate <= 0:
                return
            loop = asyncio.get_running_loop()
            start = loop.time()
            k = 0
            while True:
                due = start + k / m.rate
                if due - start >= seconds:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                k += 1
                if m.open >= in_flight:
                    m.behind += 1
                    continue
                m.sent += 1
                m.open += 1
                task = asyncio.create_task(self.one(m))
                tasks.add(task)
                task.add_done_callback(lambda t, m=m: (tasks.discard(t), _close(m)))

        def _close(m: Medium) -> None:
            m.open -= 1

        await asyncio.gather(*(ticker(m) for m in self.media.values()))
        if tasks:
            await asyncio.wait(set(tasks), timeout=60)


def write_config(root: Path, ports: dict[str, int], workers: int, bot: FakeBotApi) -> Path:
    cfg = root / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
data_dir = "{root / "var"}"
workers = {workers}
log_level = "WARNING"

[redis]
prefix = "{PREFIX}"

[http]
listen = "{HOST}:{ports["http"]}"

[api]
open_to_loopback = true

[limits]
sender_contacts = 0

[adapters.pbx]
type = "asterisk"
agi_listen = "{HOST}:{ports["agi"]}"

[adapters.mail]
type = "smtp"
listen = "{HOST}:{ports["smtp"]}"
mailboxes = ["{MAILBOX}"]

[adapters.kannel]
type = "kannel"
path = "/sms/kannel"
secret = "{SECRET}"
region = "CN"

[adapters.tg]
type = "telegram"
token = "{BOT_TOKEN}"
secret_token = "{TG_SECRET}"
set_webhook = false
api_base = "{bot.api_base}"
file_base = "{bot.file_base}"

[adapters.wx]
type = "wechat"
app_id = "{WX_APP_ID}"
token = "{WX_TOKEN}"
"""
    )
    return cfg


async def ready(port: int, data_dir: Path, workers: int) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/readyz") as r:
            if r.status != 200:
                return False
    except aiohttp.ClientError:
        return False
    return workers == 1 or all(
        (run_dir(data_dir) / f"worker-{k}.sock").exists() for k in range(workers)
    )


async def spools_empty(data_dir: Path) -> bool:
    return not any((data_dir / "spool").rglob("segment-*.log")) or all(
        p.stat().st_size == 0 for p in (data_dir / "spool").rglob("segment-*.log")
    )


def pct(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else float("nan")


async def read_stream(url: str) -> list[dict[str, Any]]:
    client = aioredis.Redis.from_url(url)
    out: list[dict[str, Any]] = []
    last = "-"
    try:
        while True:
            entries = await client.xrange(Keys(PREFIX).contacts, min=last, count=5000)
            if last != "-":
                entries = entries[1:]
            if not entries:
                return out
            for _, fields in entries:
                c = orjson.loads(fields[b"contact"])
                out.append(
                    {
                        "id": c["id"],
                        "adapter": c["adapter"],
                        "external_id": c.get("external_id") or "",
                        "e2e": parse_time(c["enqueued_at"]) - parse_time(c["received_at"]),
                    }
                )
            last = entries[-1][0].decode()
    finally:
        await client.aclose()


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="soak-mixed-"))
    bot = FakeBotApi()
    await bot.start()
    ports = {"http": free_port(), "smtp": free_port(), "agi": free_port()}
    cfg = write_config(root, ports, args.workers, bot)
    log = (root / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    data_dir = root / "var"
    load1 = os.getloadavg()[0]
    try:
        deadline = time.monotonic() + 180
        while not await ready(ports["http"], data_dir, args.workers):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not start: {(root / 'gateway.log').read_text()}")
            await asyncio.sleep(0.2)
        print(f"gateway pid {proc.pid}, {args.workers} workers, target {args.rate:,.0f} "
              f"contacts/s for {args.minutes} min, load average {load1:.1f}", flush=True)
        load = Load(ports["http"], ports["smtp"], ports["agi"], args.rate)
        seconds = args.minutes * 60
        samples: list[tuple[float, float, float, float]] = []
        started = time.monotonic()

        async def sample() -> None:
            while True:
                kids = children(proc.pid)
                gateway = rss_mb(proc.pid) + sum(rss_mb(p) for p in kids if not is_valkey(p))
                valkey = sum(rss_mb(p) for p in kids if is_valkey(p))
                acked = sum(m.acked for m in load.media.values())
                samples.append((time.monotonic() - started, gateway, valkey, acked))
                print(f"{samples[-1][0]:6.0f} s  gateway RSS {gateway:7.1f} MB  valkey RSS "
                      f"{valkey:7.1f} MB  acknowledged {acked:,}  load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
                await asyncio.sleep(args.sample)

        sampler = asyncio.create_task(sample())
        await load.drive(seconds, args.in_flight)
        took = time.monotonic() - started
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        load2 = os.getloadavg()[0]
        wait_until = time.monotonic() + 120
        while not await spools_empty(data_dir) and time.monotonic() < wait_until:
            await asyncio.sleep(0.5)
        records = await read_stream(EmbeddedRedis(data_dir).url)
        by_adapter: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            by_adapter[r["adapter"]].append(r)
        print(f"\n{took:.0f} s of load; load average {load1:.1f} before, {load2:.1f} at the end")
        print("| medium | target/s | sent/s | acknowledged | refused | failed | behind | "
              "on stream | lost | duplicated | edge-to-enqueue p50 | p99 | max |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        total_lost = 0
        for m in load.media.values():
            rows = by_adapter.get(ADAPTER[m.name], [])
            ids = Counter(r["id"] for r in rows)
            externals = {r["external_id"] for r in rows}
            lost = len(m.ids - ids.keys()) + len(m.external - externals)
            dup = sum(1 for c in Counter(r["external_id"] for r in rows).values() if c > 1)
            total_lost += lost
            lat = sorted(r["e2e"] for r in rows)
            print(f"| {m.name} | {m.rate:,.0f} | {m.sent / took:,.0f} | {m.acked:,} | "
                  f"{m.refused} | {m.failed} | {m.behind:,} | {len(rows):,} | {lost} | {dup} | "
                  f"{pct(lat, 0.5):.2f} ms | {pct(lat, 0.99):.2f} ms | {pct(lat, 1.0):.1f} ms |")
        refusals = {m.name: dict(m.answers) for m in load.media.values() if m.answers}
        print(f"refused, by answer: {refusals or 'none'}")
        acked = sum(m.acked for m in load.media.values())
        print(f"| all | {args.rate:,.0f} | {sum(m.sent for m in load.media.values()) / took:,.0f}"
              f" | {acked:,} | | | | {len(records):,} | {total_lost} | | | | |")
        print(f"\nacknowledged {acked / took:,.0f} contacts/s = "
              f"{acked / took / 3000:.2f} of 3,000/s")
        print("\n| minute | gateway RSS (MB) | Valkey RSS (MB) | acknowledged so far |")
        print("|---:|---:|---:|---:|")
        step = max(1, int(60 / args.sample))
        for t, g, v, a in samples[::step] + ([samples[-1]] if samples else []):
            print(f"| {t / 60:.1f} | {g:.0f} | {v:.0f} | {a:,} |")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        print(f"gateway exit code {code}; log in {root / 'gateway.log'}")
        await bot.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=3000.0, help="contacts/s, all media")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--in-flight", type=int, default=200, help="per medium")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    a = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(a))
    except ImportError:
        asyncio.run(main(a))
