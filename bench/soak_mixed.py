"""Mixed-load soak of the whole gateway: a real ``gateway serve --workers N`` under a hotline's
load shape, for minutes, with memory per process, p99 edge-to-enqueue per medium, lost
contacts and what the load itself cost.

    .venv/bin/python -m bench.soak_mixed --help
    .venv/bin/python -m bench.soak_mixed                       # 3,000 contacts/s for 10 minutes
    .venv/bin/python -m bench.soak_mixed --minutes 1 --admission-ab --rounds 2  # overload A/B
    .venv/bin/python -m bench.soak_mixed --rate 600 --minutes 1 --workers 2 --load-procs 1
    .venv/bin/python -m bench.soak_mixed --rate 300 --minutes 3 --trace-memory  # RSS hunt

The gateway runs as its own process tree (parent, N workers, the embedded Valkey with
``appendfsync always``) with one adapter per medium: ``asterisk`` (FastAGI), ``smtp``,
``kannel`` (get-url), ``telegram`` (webhook; getMe answered by a local fake Bot API) and
``wechat`` (plain mode), and ``POST /v1/intake`` for web. The load is an open loop at
``--rate`` contacts/s split by ``SHARE`` (a 12345 line is mostly calls), run by
``--load-procs`` processes of its own, each taking an equal part of every medium's rate. Each
uses the lean clients of ``bench/loadgen.py`` (callbacks, no coroutine per request): a new
FastAGI connection per call answered as res_agi does; keep-alive HTTP for the webhooks and the
web intake (up to ``--http-connections`` per process); SMTP sessions kept open for message after
message, the envelope pipelined (up to ``--smtp-sessions``). Every contact is started on
schedule whatever the gateway's pace; one that finds ``--in-flight`` of its medium still open
(per process) is counted as ``behind``, not sent. Every contact is new (unique external ids,
Message-IDs, call ids) and what the peer was told is recorded: the id from the 202 / the 250 /
``GATEWAY_CONTACT_ID``, or the external id for Kannel, Telegram and WeChat (their answers carry
no id).

Printed: RSS of every process every ``--sample`` seconds; at the end (after every spool is
empty) the stream read whole, and one summary: per medium the target and sent rate,
acknowledged, refused (by answer), lost (acknowledged, not on the stream: must be 0),
duplicated, edge-to-enqueue (``enqueued_at - received_at`` of the records) p50/p99/max and the
client's round trip p99; RSS start/end/max of each process (parent, worker-K, Valkey); Valkey's
``used_memory`` per contact; CPU per acknowledged contact of the gateway's processes, of Valkey
and of the load generator, with the load generator's share of the machine's cores.

``--trace-memory`` starts the gateway with ``bench/memtrace`` on its path: each gateway
process (parent and workers) runs ``tracemalloc`` from 20 s after its start and writes, 30 s
later and then every minute, a snapshot and the counts of live objects by type to ``<run
folder>/memtrace``; the soak prints the largest growths between each process's first and last
snapshot. It slows the gateway a lot: for finding a leak, not for figures.

Finding the highest rate this machine sustains: short runs (``--minutes 1``) at rising
``--rate``; a rate is sustained when behind, refused and lost are 0 and the p99s stay
bounded (docs/performance.md, "Mixed soak: how to run it and what it reports").

Overload (more offered than the machine takes): the load has the peers' own concurrency (up
to ``--in-flight`` 4,000 open contacts of each medium, 512 HTTP connections, 32 SMTP sessions,
opened as needed), so that it is the gateway, not the load generator, that must say no (with
``--in-flight 300 --http-connections 64 --smtp-sessions 8``, the third session's load, the
excess stayed in the load generator as "behind"). "refused, by answer" then
counts each protocol's retry-later (``503``, ``451``, ``FAILED``, ``closed``: a FastAGI
connection closed before any command, the dialplan's fail path); "failed" counts contacts
with no answer at all (for calls: not connected within res_agi's 2 s, ``MAX_AGI_CONNECT``,
after which Asterisk takes the fail path); "timed out" counts HTTP contacts not answered
within ``--http-timeout`` (5 s, WeChat's platform's wait), given up as a peer gives up (it
would send them again; one the gateway wrote all the same is on the stream, not lost).
Refused contacts are not on the stream; lost must stay 0 whatever the load. ``--before DIR
--rounds N`` soaks an older tree's gateway (``git archive <commit> gateway | tar -x -C DIR``)
in turns with this one and prints both side by side (``--admission-ab``: this tree with and
without its ``[limits] in_flight`` and ``loop_lag``): how to compare a change under the same
load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from bench.chat_bench import TEXT, TG_SECRET, WX_APP_ID, WX_TOKEN, _sign
from bench.loadgen import TIMED_OUT, AgiCall, HttpConnection, Pool, SmtpConnection
from bench.procs import HOST, cpu_s, free_port, rss_mb, tree
from gateway.contact.clock import parse_time
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.keys import Keys
from tests.channels.chat.fakes import BOT_TOKEN, FakeBotApi
from tests.channels.sms.test_kannel import AUTH, SECRET, enc

PREFIX = "soak"
MAILBOX = "12345@hotline.example.gov.cn"
SHARE = {"voice": 0.55, "web": 0.20, "telegram": 0.08, "wechat": 0.07, "sms": 0.07, "mail": 0.03}
"""Share of each medium in the load (Telegram and WeChat are the chat medium)."""
ADAPTER = {
    "voice": "pbx", "web": "api", "telegram": "tg", "wechat": "wx", "sms": "kannel", "mail": "mail"
}
AGI_HEADER = (
    b"agi_network: yes\nagi_network_script: intake\nagi_request: agi://127.0.0.1/intake\n"
    b"agi_channel: PJSIP/trunk-%(n)08x\nagi_language: zh\nagi_type: PJSIP\n"
    b"agi_uniqueid: %(run)s.%(n)d\nagi_version: 22.10.1\nagi_callerid: 1380%(cid)07d\n"
    b"agi_calleridname: Caller\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
    b"agi_callingtns: 0\nagi_dnid: 12345\nagi_rdnis: unknown\nagi_context: intake\n"
    b"agi_extension: 12345\nagi_priority: 3\nagi_enhanced: 0.0\nagi_accountcode: \n"
    b"agi_threadid: 140206706226880\n\n"
)
TICK_S = 0.005
"""The schedule's step: each medium's contacts due in it start together (a burst of 15 at
3,000/s); a shorter step costs the load generator more wake-ups than contacts at low rates."""
MEMTRACE = Path(__file__).with_name("memtrace")
"""Put on the gateway's PYTHONPATH by --trace-memory: its sitecustomize.py does the tracing."""


def _http(port: int, method: str, path: bytes, headers: dict[str, str]) -> bytes:
    """A request head with ``%s`` for the rest of the path (or b"") and ``%d`` for the body
    length: ``head % (path_tail, len(body)) + body``."""
    head = f"{method} ".encode() + path + b"%s HTTP/1.1\r\n"
    head += f"Host: {HOST}:{port}\r\n".encode()
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
    return head + b"Content-Length: %d\r\n\r\n"


@dataclass
class Tally:
    """One medium in one load process (picklable: sent back to the soak's process)."""

    name: str
    rate: float
    sent: int = 0
    acked: int = 0
    refused: int = 0
    failed: int = 0
    timed_out: int = 0
    """HTTP contacts given up after ``--http-timeout`` (the peer would send them again)."""
    behind: int = 0
    open: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    """What the refused contacts were answered (status codes)."""
    ids: set[str] = field(default_factory=set)
    """Contact ids the peer was told (web, mail, voice)."""
    external: set[str] = field(default_factory=set)
    """External ids acknowledged (sms, telegram, wechat)."""
    rtt_us: list[int] = field(default_factory=list)
    """The client's round trip of each acknowledged contact."""

    def add(self, other: Tally) -> None:
        for name in ("rate", "sent", "acked", "refused", "failed", "timed_out", "behind"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.answers.update(other.answers)
        self.ids |= other.ids
        self.external |= other.external
        self.rtt_us += other.rtt_us


class Mix:
    """One load process's part of the mixed load: every medium at ``rate / procs``."""

    def __init__(self, ports: dict[str, int], args: argparse.Namespace, index: int) -> None:
        self.ports = ports
        self.in_flight = args.in_flight
        self.run = uuid.uuid4().hex[:8]
        self.next_n = index * 10**9 + 1
        """Numbers are unique across the load processes (WeChat nonces, Telegram updates)."""
        self.tallies = {
            name: Tally(name, args.rate * share / args.load_procs) for name, share in SHARE.items()
        }
        self.http = Pool(HOST, ports["http"], HttpConnection, args.http_connections,
                         waiting=4 * args.in_flight, timeout=args.http_timeout or None)
        self.smtp = Pool(HOST, ports["smtp"], SmtpConnection, args.smtp_sessions,
                         waiting=args.in_flight)
        port = ports["http"]
        web = {"channel": "web", "external_id": "@E@", "sender": {"address": "@S@"},
               "recipient": "12345", "subject": "路灯损坏", "text": TEXT}
        self.web_body = orjson.dumps(web).replace(b"@E@", b"%s").replace(b"@S@", b"%s")
        self.web_head = _http(port, "POST", b"/v1/intake", {"Content-Type": "application/json"})
        self.sms_head = _http(port, "GET", b"/sms/kannel?", AUTH)
        self.sms_query = (
            f"from=%s&to=12345&text={enc(TEXT[:30].encode()).replace('%', '%%')}&time=%d&id=%s"
            "&coding=0&charset=UTF-8&udh=&smsc=cmcc"
        ).encode()
        self.tg_head = _http(port, "POST", b"/chat/telegram/tg", {
            "Content-Type": "application/json", "X-Telegram-Bot-Api-Secret-Token": TG_SECRET})
        update = {"update_id": 1111111111, "message": {
            "message_id": 1111111111, "from": {"id": 2222222222, "is_bot": False,
                                               "first_name": "Li"},
            "chat": {"id": 2222222222, "type": "private"}, "date": 3333333333, "text": TEXT}}
        self.tg_body = (orjson.dumps(update).replace(b"1111111111", b"%(n)d")
                        .replace(b"2222222222", b"%(chat)d").replace(b"3333333333", b"%(now)d"))
        self.wx_head = _http(port, "POST", b"/chat/wechat/wx?", {})
        self.wx_body = (
            "<xml><ToUserName><![CDATA[gh_bench]]></ToUserName>"
            "<FromUserName><![CDATA[oBench%06d]]></FromUserName>"
            "<CreateTime>%d</CreateTime><MsgType><![CDATA[text]]></MsgType>"
            f"<Content><![CDATA[{TEXT}]]></Content><MsgId>%d</MsgId></xml>"
        ).encode()
        self.wx_base = int(self.run, 16) % 10**5 * 10**10
        self.mail_text = (f"{TEXT}\r\n" * 8).encode() + b".\r\n"

    # ------------------------------------------------------------ one contact of each medium

    def launch(self, t: Tally) -> None:
        if t.open >= self.in_flight:
            t.behind += 1
            return
        n = self.next_n
        self.next_n += 1
        t.open += 1
        t.sent += 1
        getattr(self, f"_{t.name}")(t, n, time.perf_counter_ns())

    def _answered(self, t: Tally, t0: int, status: int, ok: int, key: str | None) -> None:
        t.open -= 1
        if status == ok and key:
            t.acked += 1
            t.rtt_us.append((time.perf_counter_ns() - t0) // 1000)
        elif status == 0:
            t.failed += 1
        elif status == TIMED_OUT:
            t.timed_out += 1
        else:
            t.refused += 1
            t.answers[str(status)] += 1

    def _http_sent(self, t: Tally, raw: bytes, ok: int, t0: int, external: str | None) -> None:
        def done(status: int, body: bytes) -> None:
            key = external
            if status == ok:
                if key is None:
                    with contextlib.suppress(ValueError, KeyError):
                        key = orjson.loads(body)["id"]
                    if key:
                        t.ids.add(key)
                else:
                    t.external.add(key)
            self._answered(t, t0, status, ok, key)

        if not self.http.submit(raw, done):
            t.open -= 1
            t.sent -= 1
            t.behind += 1

    def _web(self, t: Tally, n: int, t0: int) -> None:
        body = self.web_body % (f"{self.run}-{n}".encode(), b"+86139%08d" % (n % 10**8))
        self._http_sent(t, self.web_head % (b"", len(body)) + body, 202, t0, None)

    def _sms(self, t: Tally, n: int, t0: int) -> None:
        msg_id = f"{self.run}-0000-4000-8000-{n:012d}"
        query = self.sms_query % (b"%%2B86137%08d" % (n % 10**8), int(time.time()),
                                  msg_id.encode())
        self._http_sent(t, self.sms_head % (query, 0), 200, t0, msg_id)

    def _telegram(self, t: Tally, n: int, t0: int) -> None:
        chat = 800000 + n % 50000
        body = self.tg_body % {b"n": n, b"chat": chat, b"now": int(time.time())}
        self._http_sent(t, self.tg_head % (b"", len(body)) + body, 200, t0, f"{chat}:{n}")

    def _wechat(self, t: Tally, n: int, t0: int) -> None:
        now = int(time.time())
        unique = self.wx_base + n
        query = b"signature=%s&timestamp=%d&nonce=%d" % (
            _sign(WX_TOKEN, str(now), str(n)).encode(), now, n)
        body = self.wx_body % (unique % 5000, now, 10**15 + unique)
        self._http_sent(t, self.wx_head % (query, len(body)) + body, 200, t0,
                        str(10**15 + unique))

    def _mail(self, t: Tally, n: int, t0: int) -> None:
        sender = b"c%d@example.org" % n
        message = (
            b"From: %s\r\nTo: %s\r\nSubject: soak %d\r\nMessage-ID: <%s-%d@example.org>\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
            % (sender, MAILBOX.encode(), n, self.run.encode(), n)
        ) + self.mail_text

        def done(code: int, line: bytes) -> None:
            key = line.split()[-1].decode() if code == 250 else None
            if key:
                t.ids.add(key)
            self._answered(t, t0, code, 250, key)

        if not self.smtp.submit((sender, MAILBOX.encode(), message), done):
            t.open -= 1
            t.sent -= 1
            t.behind += 1

    def _voice(self, t: Tally, n: int, t0: int) -> None:
        header = AGI_HEADER % {b"run": self.run.encode(), b"n": n, b"cid": n % 10**7}

        def done(variables: dict[bytes, bytes] | None) -> None:
            if variables is None:
                self._answered(t, t0, 0, 1, None)
                return
            status = variables.get(b"GATEWAY_STATUS", b"closed")  # the fail path
            key = variables.get(b"GATEWAY_CONTACT_ID", b"").decode() or None
            if status in (b"OK", b"SPOOLED") and key:
                t.ids.add(key)
                self._answered(t, t0, 1, 1, key)
            else:
                t.open -= 1
                t.refused += 1
                t.answers[status.decode()] += 1

        AgiCall.start(HOST, self.ports["agi"], header, done)

    async def drive(self, seconds: float) -> None:
        """Start each medium's contacts on schedule for ``seconds``; then wait (a minute at
        most) for the open ones."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        started = dict.fromkeys(self.tallies, 0)
        while (elapsed := loop.time() - start) < seconds:
            for name, t in self.tallies.items():
                due = int(elapsed * t.rate) + 1
                while started[name] < due:
                    started[name] += 1
                    self.launch(t)
            await asyncio.sleep(TICK_S)
        until = loop.time() + 60
        while any(t.open for t in self.tallies.values()) and loop.time() < until:
            await asyncio.sleep(0.05)
        self.http.close()
        self.smtp.close()


def _load_process(index: int, ports: dict[str, int], args: argparse.Namespace,
                  conn: Connection) -> None:
    """A load generator process: ready, wait for "go", drive, send back the tallies and the
    CPU seconds it used while driving."""
    import faulthandler

    import uvloop

    mix = Mix(ports, args, index)
    conn.send("ready")
    conn.recv()
    # a load process still running long after its schedule says where it is, and ends
    faulthandler.dump_traceback_later(args.minutes * 60 + 150, exit=True)
    times0, wall0 = os.times(), time.monotonic()
    uvloop.run(mix.drive(args.minutes * 60))
    times1 = os.times()
    left = sum(t.open for t in mix.tallies.values())
    print(f"load process {index}: done{f', {left} contacts still open' if left else ''}",
          file=sys.stderr, flush=True)
    conn.send({"tallies": mix.tallies, "user": times1.user - times0.user,
               "system": times1.system - times0.system, "wall": time.monotonic() - wall0})
    conn.close()


def _result(pipe: Connection, timeout_s: float) -> dict[str, Any]:
    """A load process's tallies (SystemExit when it sends none in time or died)."""
    try:
        if pipe.poll(timeout_s):
            result: dict[str, Any] = pipe.recv()
            return result
    except EOFError:
        pass
    raise SystemExit("a load process sent no result (it died or hung): see its traceback above")


def write_config(
    root: Path, ports: dict[str, int], workers: int, bot: FakeBotApi, limits: str = ""
) -> Path:
    cfg = root / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
data_dir = "{root / "var"}"
workers = {workers}
log_level = "WARNING"

[redis]
prefix = "{PREFIX}"
# nothing trimmed: the soak reads the whole stream back to find every acknowledged contact
# (at 3,000/s for 10 minutes the default 1,000,000 entries would be passed in six minutes)
stream_maxlen = 100000000

[http]
listen = "{HOST}:{ports["http"]}"

[api]
open_to_loopback = true

[limits]
sender_contacts = 0
{limits}
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


async def ready(port: int, workers: int) -> bool:
    """The shared port's /readyz: 200 and every worker in it."""
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}/readyz") as r:
            if r.status != 200:
                return False
            detail = await r.json()
    except aiohttp.ClientError:
        return False
    return workers == 1 or len(detail.get("workers", {})) == workers


async def spools_empty(data_dir: Path) -> bool:
    return all(p.stat().st_size == 0 for p in (data_dir / "spool").rglob("segment-*.log"))


def pct(ordered: list[int], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000 if ordered else float("nan")


async def aggregator_lag(client: aioredis.Redis) -> int:
    """Entries of the events stream the dashboard's group (moved by its reader) has not read;
    -1 when there is no such group yet or the server does not tell."""
    try:
        groups = await client.xinfo_groups(Keys(PREFIX).events)
    except Exception:  # no stream yet
        return -1
    for group in groups:
        name = group.get("name")
        if name in (b"gateway-aggregate", "gateway-aggregate"):
            lag = group.get("lag")
            return int(lag) if lag is not None else -1
    return -1


async def read_stream(client: aioredis.Redis) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    last = "-"
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


def memtrace_report(folder: Path, top: int = 12) -> None:
    """The largest growths between each process's first and last snapshot (--trace-memory)."""
    by_process: dict[str, list[Path]] = defaultdict(list)
    for snap in sorted(folder.glob("*.snap")):
        by_process[snap.name.rsplit("-", 1)[0]].append(snap)
    for process, snaps in sorted(by_process.items()):
        if len(snaps) < 2:
            continue
        first, last = snaps[0], snaps[-1]
        print(f"\n{process}: growth from {first.name} to {last.name} (tracemalloc, by line)")
        diff = tracemalloc.Snapshot.load(str(last)).compare_to(
            tracemalloc.Snapshot.load(str(first)), "lineno"
        )
        for stat in diff[:top]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / 1024:+9.0f} KiB {stat.count_diff:+8d} blocks  "
                  f"{frame.filename}:{frame.lineno}")
        types0 = json.loads(first.with_suffix(".types").read_text())
        types1 = json.loads(last.with_suffix(".types").read_text())
        growth = sorted(((types1[k] - types0.get(k, 0), k) for k in types1), reverse=True)
        print("  live objects by type: " + ", ".join(f"{k} {d:+,}" for d, k in growth[:top]))


NO_ADMISSION = 'in_flight = 0\nloop_lag = "0"\n'
"""``[limits]`` of a gateway that takes whatever it is sent (``--admission-ab``)."""


async def main(args: argparse.Namespace) -> None:
    """One soak of this tree; with ``--before`` (or ``--admission-ab``), ``--rounds`` of each
    tree (or of this tree with and without its admission bounds) in turn and the summaries
    side by side."""
    if args.admission_ab:
        variants = (("admission on", "", ""), ("admission off", "", NO_ADMISSION))
    elif args.before:
        variants = (("now", "", ""), ("before", args.before, ""))
    else:
        await run_once(args, "")
        return
    summaries: list[tuple[str, dict[str, Any]]] = []
    for r in range(args.rounds):
        for label, src, limits in variants[:: 1 if r % 2 == 0 else -1]:
            print(f"\n===== round {r + 1}: {label} ({src or 'this tree'}) =====", flush=True)
            summaries.append((label, await run_once(args, src, limits)))
    print("\n| run | acknowledged/s | refused | timed out | lost | duplicated "
          "| worst edge-to-enqueue p99 "
          "| worst client round trip p99 | voice round trip p99 | gateway CPU µs per contact "
          "| worker RSS max (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, s in summaries:
        print(f"| {label} | {s['acked_per_s']:,.0f} | {s['refused']:,} | "
              f"{s['timed_out']:,} | {s['lost']} | "
              f"{s['duplicated']} | {s['e2e_p99_ms']:,.0f} ms | {s['rtt_p99_ms']:,.0f} ms | "
              f"{s['voice_rtt_p99_ms']:,.0f} ms | {s['gateway_cpu_us']:,.0f} | "
              f"{s['worker_rss_max']:.0f} |")


async def run_once(args: argparse.Namespace, src: str, limits: str = "") -> dict[str, Any]:
    """One soak of the gateway in ``src`` (a tree holding an older ``gateway`` package; empty:
    this tree's), ``limits`` added to its ``[limits]``; returns the summary's figures."""
    root = Path(tempfile.mkdtemp(prefix="soak-mixed-"))
    bot = FakeBotApi()
    await bot.start()
    ports = {"http": free_port(), "smtp": free_port(), "agi": free_port()}
    cfg = write_config(root, ports, args.workers, bot, limits)
    env = {**os.environ}
    if src:  # the older package first on the gateway's path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    if args.trace_memory:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MEMTRACE), env.get("PYTHONPATH")]))
        env["SOAK_MEMTRACE_DIR"] = str(root / "memtrace")
    log = (root / "gateway.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL, stderr=log, env=env,
    )
    spawn = multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    loaders = []
    for k in range(args.load_procs):
        ours, theirs = spawn.Pipe()
        loader = spawn.Process(target=_load_process, args=(k, ports, args, theirs), daemon=True)
        loader.start()
        theirs.close()  # the child's end: a child that dies is an EOFError here, not a hang
        pipes.append(ours)
        loaders.append(loader)
    data_dir = root / "var"
    client = aioredis.Redis.from_url(EmbeddedRedis(data_dir).url)
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    sampler: asyncio.Task[None] | None = None
    summary: dict[str, Any] = {}
    load1 = os.getloadavg()[0]
    try:
        deadline = time.monotonic() + 180
        while not await ready(ports["http"], args.workers):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not start: {(root / 'gateway.log').read_text()}")
            await asyncio.sleep(0.2)
        for pipe in pipes:
            assert await asyncio.to_thread(pipe.recv) == "ready"
        print(f"gateway pid {proc.pid}, {args.workers} workers, target {args.rate:,.0f} "
              f"contacts/s for {args.minutes} min, {args.load_procs} load process(es), load "
              f"average {load1:.1f}; run folder {root}", flush=True)
        memory0 = int((await client.info("memory"))["used_memory"])
        processes0 = tree(proc.pid)
        cpu0 = {r: cpu_s(p) for r, p in processes0.items()}
        samples: list[tuple[float, dict[str, float], int]] = []
        started = time.monotonic()

        sampled = asyncio.Event()
        lags: list[int] = []
        """The dashboard aggregator's lag on the events stream at each sample (entries)."""

        async def sample() -> None:
            # ends when ``sampled`` is set, not by cancellation: redis-py swallows a
            # cancellation now and then (under Python 3.11's wait_for), and the soak waited for
            # ever on a sampler that went on
            while not sampled.is_set():
                rss = {r: rss_mb(p) for r, p in sorted(tree(proc.pid).items())}
                on_stream = int(await client.xlen(Keys(PREFIX).contacts))
                samples.append((time.monotonic() - started, rss, on_stream))
                lags.append(await aggregator_lag(client))
                shown = "  ".join(f"{r} {v:6.1f}" for r, v in rss.items())
                print(f"{samples[-1][0]:6.0f} s  RSS MB: {shown}  on stream {on_stream:,}  "
                      f"events the aggregator has not read {lags[-1]:,}  "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sampled.wait(), args.sample)

        sampler = asyncio.create_task(sample())
        for pipe in pipes:
            pipe.send("go")
        results = [await asyncio.to_thread(_result, pipe, args.minutes * 60 + 180)
                   for pipe in pipes]
        took = time.monotonic() - started
        processes1 = tree(proc.pid)
        cpu1 = {r: cpu_s(p) for r, p in processes1.items()}
        sampled.set()
        await sampler
        samples.append((took, {r: rss_mb(p) for r, p in sorted(processes1.items())},
                        int(await client.xlen(Keys(PREFIX).contacts))))
        load2 = os.getloadavg()[0]
        wait_until = time.monotonic() + 120
        while not await spools_empty(data_dir) and time.monotonic() < wait_until:
            await asyncio.sleep(0.5)
        records = await read_stream(client)
        memory1 = int((await client.info("memory"))["used_memory"])
        summary = report(args, results, records, samples, took, (load1, load2),
                         (memory0, memory1), cpu0, cpu1, processes0 != processes1)
        if lags:  # one reader a fleet (lease ``aggregate``): does it keep up with the load?
            print(f"aggregator: events not yet read, at most {max(lags):,} in the samples, "
                  f"{lags[-1]:,} at the load's end, {await aggregator_lag(client):,} now")
            summary["aggregator_lag_max"] = max(lags)
        if args.trace_memory:
            memtrace_report(root / "memtrace")
    finally:
        if sampler is not None:
            sampler.cancel()
        await client.aclose()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
        for loader in loaders:
            loader.join(5)
            if loader.is_alive():
                loader.kill()
        print(f"gateway exit code {code}; log in {root / 'gateway.log'}")
        await bot.stop()
    return summary


def report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    records: list[dict[str, Any]],
    samples: list[tuple[float, dict[str, float], int]],
    took: float,
    loads: tuple[float, float],
    memory: tuple[int, int],
    cpu0: dict[str, float],
    cpu1: dict[str, float],
    restarted: bool,
) -> dict[str, Any]:
    """Print the summary; return its main figures (for ``--before``'s comparison)."""
    tallies = {name: Tally(name, 0.0) for name in SHARE}
    for result in results:
        for name, t in result["tallies"].items():
            tallies[name].add(t)
    by_adapter: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_adapter[r["adapter"]].append(r)
    acked = sum(t.acked for t in tallies.values())
    sent = sum(t.sent for t in tallies.values())
    seconds = args.minutes * 60
    print(f"\n{seconds:.0f} s of schedule, {took:.0f} s until every answer was in, "
          f"{args.workers} workers, {args.load_procs} load process(es); "
          f"load average {loads[0]:.1f} before, {loads[1]:.1f} at the end")
    print("| medium | target/s | sent/s | acknowledged | refused | failed | timed out | behind "
          "| on stream | lost | duplicated | edge-to-enqueue p50 | p99 | max "
          "| client round trip p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total_lost = total_dup = 0
    worst_e2e = worst_rtt = 0.0
    for t in tallies.values():
        rows = by_adapter.get(ADAPTER[t.name], [])
        ids = {r["id"] for r in rows}
        externals = {r["external_id"] for r in rows}
        lost = len(t.ids - ids) + len(t.external - externals)
        dup = sum(1 for c in Counter(r["external_id"] for r in rows).values() if c > 1)
        total_lost += lost
        total_dup += dup
        lat = sorted(r["e2e"] for r in rows)
        rtt = sorted(t.rtt_us)
        worst_e2e = max(worst_e2e, pct(lat, 0.99) if lat else 0.0)
        worst_rtt = max(worst_rtt, pct(rtt, 0.99) if rtt else 0.0)
        print(f"| {t.name} | {t.rate:,.0f} | {t.sent / seconds:,.0f} | {t.acked:,} | "
              f"{t.refused:,} | {t.failed:,} | {t.timed_out:,} | {t.behind:,} | {len(rows):,} | "
              f"{lost} | {dup} | "
              f"{pct(lat, 0.5):.2f} ms | {pct(lat, 0.99):.2f} ms | {pct(lat, 1.0):.1f} ms | "
              f"{pct(rtt, 0.99):.2f} ms |")
    print(f"| **all** | {args.rate:,.0f} | {sent / seconds:,.0f} | {acked:,} | "
          f"{sum(t.refused for t in tallies.values()):,} | "
          f"{sum(t.failed for t in tallies.values()):,} | "
          f"{sum(t.timed_out for t in tallies.values()):,} | "
          f"{sum(t.behind for t in tallies.values()):,} | {len(records):,} | **{total_lost}** "
          "| | | | | |")
    refusals = {t.name: dict(t.answers) for t in tallies.values() if t.answers}
    print(f"refused, by answer: {refusals or 'none'}")
    print(f"\nacknowledged {acked / seconds:,.0f} contacts/s over the {seconds:.0f} s of the "
          f"schedule = {acked / seconds / 3000:.2f} of 3,000/s")

    roles = sorted({r for _, rss, _ in samples for r in rss})
    print("\n| process | RSS start (MB) | end | max | CPU µs per acknowledged contact |")
    print("|---|---:|---:|---:|---:|")
    for role in roles:
        values = [rss[role] for _, rss, _ in samples if rss.get(role)]
        cpu = (cpu1.get(role, 0.0) - cpu0.get(role, 0.0)) / max(acked, 1) * 1e6
        print(f"| {role} | {values[0]:.0f} | {values[-1]:.0f} | {max(values):.0f} | {cpu:.0f} |")
    gateway_cpu = sum(cpu1[r] - cpu0.get(r, 0.0) for r in cpu1 if r != "valkey")
    load_user = sum(r["user"] for r in results)
    load_cpu = load_user + sum(r["system"] for r in results)
    cores = len(os.sched_getaffinity(0))
    print(f"| gateway (parent and workers) | | | | {gateway_cpu / max(acked, 1) * 1e6:.0f} |")
    print(f"| load generator ({args.load_procs} process(es)) | | | | "
          f"{load_cpu / max(acked, 1) * 1e6:.0f} |")
    print(f"load generator: {load_cpu / max(sent, 1) * 1e6:.0f} µs CPU per contact sent "
          f"({load_user / max(sent, 1) * 1e6:.0f} µs of it user, the rest system), "
          f"{load_cpu / took:.2f} of a core ({load_cpu / took / cores:.0%} of the {cores} cores)"
          + ("; a worker was restarted during the run: its CPU is partly missing" if restarted
             else ""))
    print(f"Valkey used_memory {memory[0] / 2**20:.1f} -> {memory[1] / 2**20:.1f} MiB: "
          f"{(memory[1] - memory[0]) / max(len(records), 1) / 1024:.2f} KiB per contact")
    print("\n| minute | " + " | ".join(f"{r} RSS (MB)" for r in roles) + " | on stream |")
    print("|---:|" + "---:|" * len(roles) + "---:|")
    step = max(1, int(60 / args.sample))
    for t_s, rss, on_stream in [*samples[::step], samples[-1]]:
        print(f"| {t_s / 60:.1f} | " + " | ".join(f"{rss.get(r, 0):.0f}" for r in roles)
              + f" | {on_stream:,} |")
    return {
        "acked_per_s": acked / seconds,
        "refused": sum(t.refused for t in tallies.values()),
        "timed_out": sum(t.timed_out for t in tallies.values()),
        "lost": total_lost,
        "duplicated": total_dup,
        "e2e_p99_ms": worst_e2e,
        "rtt_p99_ms": worst_rtt,
        "voice_rtt_p99_ms": pct(sorted(tallies["voice"].rtt_us), 0.99),
        "gateway_cpu_us": gateway_cpu / max(acked, 1) * 1e6,
        "worker_rss_max": max((rss.get(r, 0.0) for _, rss, _ in samples for r in roles
                               if r.startswith("worker")), default=0.0),
    }


def parse_args() -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak_mixed", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=3000.0, help="contacts/s, all media")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="gateway workers (default: one per core)")
    parser.add_argument("--load-procs", type=int, default=1,
                        help="load generator processes, each an equal part of the rate")
    parser.add_argument("--in-flight", type=int, default=4000,
                        help="open contacts per medium and load process before one is 'behind'")
    parser.add_argument("--http-connections", type=int, default=512,
                        help="keep-alive HTTP connections per load process (opened as needed)")
    parser.add_argument("--http-timeout", type=float, default=5.0,
                        help="seconds an HTTP peer waits for its answer before it gives up and "
                        "closes (WeChat's platform: 5 s, then it sends again); 0: for ever")
    parser.add_argument("--smtp-sessions", type=int, default=32,
                        help="SMTP sessions per load process")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--before", default="", metavar="DIR",
                        help="also soak the gateway of an older tree (git archive <commit> "
                        "gateway | tar -x -C DIR), in turns with this one")
    parser.add_argument("--admission-ab", action="store_true",
                        help="soak this tree with its admission bounds ([limits] in_flight, "
                        "loop_lag) and without them, in turns")
    parser.add_argument("--rounds", type=int, default=1,
                        help="of each variant, with --before or --admission-ab")
    parser.add_argument("--trace-memory", action="store_true",
                        help="tracemalloc snapshots in every gateway process (slow; see above)")
    return parser.parse_args()


if __name__ == "__main__":
    a = parse_args()
    try:
        import uvloop

        uvloop.run(main(a))
    except ImportError:
        asyncio.run(main(a))
