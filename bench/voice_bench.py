"""FastAGI benchmark: the gateway's intake vs a bare asyncio AGI server vs pyst2 classic AGI.

    python bench/voice_bench.py [--duration 3] [--concurrency 100] [--rate 1000]

One session = connect, header block, the intake (one GET VARIABLE, Intake into a real embedded
Valkey, five SET VARIABLE one after the other), close. The callers run in a separate process (so the
gateway keeps its core) and answer every command like res_agi.c. Printed per setup: sessions/s
with ``--concurrency`` callers back to back, server CPU per session, session time p50/p99, and
for the gateway the added time over the bare server and a paced run at ``--rate`` calls/s.
The FastAGI layer alone (our server and intake script with an in-memory Intake), the durable
baseline (the same layer whose Intake answers once one redis-py ``XADD`` of the call is in the
gateway's Valkey: what one durable write alone costs) and the whole gateway run in
``--rounds`` alternating rounds, best of each, and the bench prints their ratios of sessions
per server core (a gateway run counts until the dashboard's aggregator has read its events)
and their paced p99s. The servers run in a child process of their own (``--serve``), their CPU
read there. ``--before DIR`` runs an older tree's three (``git archive <commit> gateway
| tar -x -C DIR``) in another such child, in the same alternating rounds, and prints the CPU a
session costs now against before. Each paced gateway run starts on a freshly rewritten
append-only file (``BGREWRITEAOF``, waited for), so that no rewrite the earlier rounds' writes
set off falls into it by chance (the durable baseline's paced run too); under the gateway's,
a line says what Valkey did during the run. The whole run takes about a minute and a half
(three with ``--before``).

``--pin`` (a machine of two cores or more): the servers' process (the bare server, the layer
and the gateway) on CPU 0, the callers and Valkey on CPU 1, so that the server has a core of
its own, as on the machine the issue's figures came from; without it the three share every
core, and at paced rates the wait for a core is most of the gateway's tail.

``--valkey-dir /dev/shm`` puts the gateway's Valkey's files on tmpfs (no disk: not durable, a
diagnostic of how much of the paced tail is the disk's fsyncs), as ``intake_bench``'s does.

``--calls N`` instead counts the Python function calls a session costs (cProfile) in the layer
and the gateway, both modes, and prints the N functions of most own time; a count the
machine's load hardly moves. ``--calls N --before DIR`` counts an older tree's too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WHAT = ("layer", "durable", "gateway")
"""The servers a tree's child runs for each mode: the FastAGI layer alone, the layer + one
``XADD`` (the durable baseline), the whole gateway."""

SERVER_CPU, OTHER_CPU = 0, 1
"""``--pin``: where the servers run, and where the callers and Valkey do."""

HEADER = (
    "agi_network: yes\nagi_network_script: intake\nagi_request: agi://127.0.0.1/intake\n"
    "agi_channel: PJSIP/sipp-{n:08x}\nagi_language: en\nagi_type: PJSIP\n"
    "agi_uniqueid: {run}.{n}\nagi_version: 22.10.1\nagi_callerid: 1380{caller:07d}\n"
    "agi_calleridname: Caller {caller}\nagi_callingpres: 0\nagi_callingani2: 0\nagi_callington: 0\n"
    "agi_callingtns: 0\nagi_dnid: 12345\nagi_rdnis: unknown\nagi_context: intake\n"
    "agi_extension: 12345\nagi_priority: 3\nagi_enhanced: 0.0\nagi_accountcode: \n"
    "agi_threadid: 140206706226880\n\n"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ------------------------------------------------------------------ callers (child process)


class Caller(asyncio.Protocol):
    """One fake Asterisk call as a bare protocol (cheaper than streams, so the callers' process
    is not what limits the run): header out, a res_agi.c answer per command line, until EOF."""

    def __init__(self, header: bytes, done: asyncio.Future[float]) -> None:
        self.header = header
        self.done = done
        self.buffer = b""
        self.started = time.perf_counter()
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's TCPTransport is not an asyncio.Transport subclass
        self.transport.write(self.header)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\n")
            if line.startswith(b"GET VARIABLE"):
                answer = b"200 result=1 (1795594483.0)\n"
            elif line.startswith(b"EXEC"):
                answer = b"200 result=0\n"  # what pbx_exec of MSet returns
            else:
                answer = b"200 result=1\n"
            self.transport.write(answer)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(time.perf_counter() - self.started)


FIRST_CALLER = [0]
"""The caller number of this process's session 0 (``--first``): each run of the bench's
callers takes numbers no earlier run used, so every call is its caller's first. (Numbers that
came round again in every run made every call of the later runs a repeat caller's, which the
dashboard's repeat surge reads back: work the first rounds did not have.)"""


async def call(port: int, run: str, n: int) -> float:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[float] = loop.create_future()
    header = HEADER.format(run=run, n=n, caller=(FIRST_CALLER[0] + n) % 10**7).encode()
    await loop.create_connection(lambda: Caller(header, done), "127.0.0.1", port)
    return await done


async def closed_loop(port: int, run: str, concurrency: int, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < stop_at:
            latencies.append(await call(port, run, next(counter)))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"sessions": len(latencies), "seconds": time.perf_counter() - started,
            "latencies": latencies}


async def open_loop(port: int, run: str, rate: float, duration: float) -> dict[str, Any]:
    latencies: list[float] = []
    tasks = []
    started = time.perf_counter()
    total = int(rate * duration)
    for n in range(total):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(call(port, run, n)))
    latencies = list(await asyncio.gather(*tasks))
    return {"sessions": total, "seconds": time.perf_counter() - started, "latencies": latencies}


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int)
    p.add_argument("--run")
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--mode", choices=["closed", "open"])
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--duration", type=float, default=3)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--out", default="", help="write the result there, not to stdout")
    a = p.parse_args(argv)
    if a.pin:
        os.sched_setaffinity(0, {OTHER_CPU})
    FIRST_CALLER[0] = a.first
    runner = _runner()
    if a.mode == "closed":
        result = runner(closed_loop(a.port, a.run, a.concurrency, a.duration))
    else:
        result = runner(open_loop(a.port, a.run, a.rate, a.duration))
    if a.out:
        Path(a.out).write_text(json.dumps(result))
    else:
        print(json.dumps(result))


def _runner() -> Any:
    try:
        import uvloop

        return uvloop.run
    except ImportError:
        return asyncio.run


# ------------------------------------------------------------------ servers (this process)


async def bare_server() -> asyncio.Server:
    """Reads the header block and closes: the floor of any FastAGI server on asyncio."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\n", b""):
            pass
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)


DURABLE_STREAM = "bench:voice:durable"
DURABLE_FAILED = [0]
"""The durable baseline's ``XADD`` s that failed in this process (a failed one still ends its
session, on the intake script's fail path, and would count as a session written)."""


async def protocol_only_server(mode: str, client: Any = None) -> Any:
    """Our FastAGI server and intake script with an Intake that keeps contacts in memory:
    what the voice channel costs by itself, without Redis. With ``client`` (a redis-py
    asyncio client), the durable baseline: the same, its Intake answering only once one
    ``XADD`` of the call (its id, external id, edge stamp and AGI variables, as JSON) is in that
    Valkey, the least a durable answer costs, as ``intake_bench``'s one-``XADD`` handler and
    ``email_bench``'s aiosmtpd + one ``XADD`` are for theirs."""
    import orjson

    from gateway.adapters import Receipt
    from gateway.channels.voice.adapter import AsteriskConfig
    from gateway.channels.voice.intake import IntakeScript
    from gateway.channels.voice.server import FastAgiServer
    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.contact.ids import uuid7
    from gateway.records import Deadline, Inbound, Repeat

    class MemoryIntake:
        def __init__(self) -> None:
            self.contacts: dict[str, Inbound] = {}

        async def submit(self, inbound: Inbound) -> Receipt:
            cid = uuid7()
            if client is not None:
                try:
                    await client.xadd(DURABLE_STREAM, {"call": orjson.dumps({
                        "id": cid, "external_id": inbound.external_id,
                        "received_at": inbound.received_at, "meta": inbound.meta,
                    })})
                except Exception:
                    DURABLE_FAILED[0] += 1
                    raise
            else:
                self.contacts[cid] = inbound
            due = inbound.received_at + 15_000_000
            return Receipt(cid, "enqueued", Deadline("answer", due, "voice_answer"), Repeat(0, 0))

    script = IntakeScript("bench", MemoryIntake(), AsteriskConfig(), mset=mode == "mset")
    server = FastAgiServer({"intake": script}, "127.0.0.1", 0, SYSTEM_CLOCK)
    await server.start()
    return server


async def drive(
    port: int,
    run: str,
    mode: str,
    args: argparse.Namespace,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """One run of callers; ``settle`` waits for the server's background work the run caused
    (counted in its CPU)."""
    cpu0 = time.process_time()
    # The result (every session's time, hundreds of KB) comes through a file: read from the
    # callers' stdout it was unreadable JSON twice in the sixteenth session's runs, once while
    # this process served the bare server's sessions (the cause not found).
    with tempfile.NamedTemporaryFile(prefix="bench-voice-callers-", suffix=".json") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", "--port", str(port), "--run", run, "--mode",
            mode, "--concurrency", str(args.concurrency), "--rate", str(args.rate),
            "--duration", str(args.duration), "--first", str(FIRST_CALLER[0]),
            "--out", out.name, *(["--pin"] if getattr(args, "pin", False) else []),
        )
        if await proc.wait() != 0:
            raise RuntimeError(f"the callers ended with {proc.returncode}")
        if settle is not None:
            await settle()
        result: dict[str, Any] = json.loads(Path(out.name).read_bytes())
    FIRST_CALLER[0] += result["sessions"]
    result["server_cpu"] = time.process_time() - cpu0
    return result


def line(label: str, r: dict[str, Any], base: dict[str, Any] | None = None) -> str:
    lat = [x * 1000 for x in r["latencies"]]
    rate = r["sessions"] / r["seconds"]
    cpu_us = r["server_cpu"] / max(1, r["sessions"]) * 1e6
    text = (f"{label:<34} {rate:8.0f} sessions/s  {1e6 / cpu_us:8.0f}/s per server core"
            f"  p50 {pct(lat, 0.5):6.2f} ms  p99 {pct(lat, 0.99):6.2f} ms")
    if base is not None:
        blat = [x * 1000 for x in base["latencies"]]
        text += (f"  added p50 {pct(lat, 0.5) - pct(blat, 0.5):+.2f} ms"
                 f" p99 {pct(lat, 0.99) - pct(blat, 0.99):+.2f} ms")
    if "batch" in r:
        text += f"  {r['batch']:.1f} contacts an EVALSHA"
    return text


async def bench_pyst2(calls: int, parallel: int) -> dict[str, Any]:
    script = (
        "import sys\nfrom asterisk.agi import AGI\n"
        "agi = AGI(stderr=open('/dev/null', 'w'))\n"
        "for i in range(5):\n    agi.set_variable('GATEWAY_VAR%d' % i, 'value')\n"
    )
    replies = b"200 result=1\n" * 5
    latencies: list[float] = []
    sem = asyncio.Semaphore(parallel)

    async def one(n: int) -> None:
        async with sem:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            await proc.communicate(HEADER.format(run="p", n=n, caller=n).encode() + replies)
            latencies.append(time.perf_counter() - started)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(calls)))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"sessions": calls, "seconds": time.perf_counter() - started,
            "latencies": latencies, "server_cpu": cpu}


async def calls(args: argparse.Namespace) -> None:
    """``--calls``: Python function calls per session (cProfile) of the layer alone and of the
    whole gateway, each with ``SET VARIABLE`` and with MSet, under the closed-loop callers; the
    machine's load hardly moves these counts (unlike CPU time)."""
    import cProfile
    import pstats

    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.runtime import Gateway
    from tests.harness import settings_for

    logging_off()
    modes = ("set_variable", "mset")
    layers = {mode: await protocol_only_server(mode) for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis")
        await redis.start()
        settings, configs = settings_for(
            Path(tmp) / "gw", redis.url, "bench",
            adapters={mode: {"type": "asterisk", "agi_listen": "127.0.0.1:0", "set_with": mode}
                      for mode in modes},
            # as in --serve: with the 15 s default the warm-up's and the first rounds' calls
            # breached during the later rounds, and the deadline watcher's claims (about half
            # of the gateway's calls a session) were counted as the call path's
            sla={"voice_answer": "1h"},
        )
        gateway = Gateway(settings, configs, clock=SYSTEM_CLOCK)
        await gateway.start()
        settle_gc(args)
        assert gateway.cases is not None
        aggregator = gateway.cases.aggregator

        async def settled() -> None:
            seen = -1
            while aggregator.processed != seen:
                seen = aggregator.processed
                await asyncio.sleep(0.3)

        try:
            run = str(int(time.time()))
            ports = {mode: gateway.adapters[mode].port for mode in modes}  # type: ignore[attr-defined]
            await drive(ports["mset"], f"{run}w", "closed", args, settled)  # warm up
            # the fewest of --rounds alternating rounds: the gateway's periodic jobs (surge
            # counting, stream trimming, leases) land in some runs and not in others
            best: dict[tuple[str, str], tuple[float, int, pstats.Stats]] = {}
            # what the gateway's own loops (leases, lag probe, watcher...) call while no call
            # comes, per second: taken off each gateway run for its length, so that a slow run
            # (fewer sessions) is not charged more of them per session
            profile = cProfile.Profile()
            profile.enable()
            await asyncio.sleep(args.duration)
            profile.disable()
            idle_rate = getattr(pstats.Stats(profile), "total_calls", 0) / args.duration
            print(f"idle gateway: {idle_rate:.0f} Python calls per second (taken off)")
            for r in range(args.rounds):
                for mode in modes:
                    for what, port, settle in (("layer", layers[mode].port, None),
                                               ("gateway", ports[mode], settled)):
                        profile = cProfile.Profile()
                        started = time.perf_counter()
                        profile.enable()
                        result = await drive(port, f"{run}{r}{mode}{what}", "closed", args,
                                             settle)
                        profile.disable()
                        idle = idle_rate * (time.perf_counter() - started) if settle else 0.0
                        stats = pstats.Stats(profile)
                        sessions = max(1, result["sessions"])
                        per = (getattr(stats, "total_calls", 0) - idle) / sessions  # no stub
                        if (mode, what) not in best or per < best[(mode, what)][0]:
                            best[(mode, what)] = (per, sessions, stats)
            for (mode, what), (per, sessions, stats) in best.items():
                print(f"{what} ({mode}): {sessions} sessions, {per:.0f} Python calls per "
                      f"session (fewest of {args.rounds} rounds)", flush=True)
                if args.calls > 0:
                    stats.sort_stats("tottime").print_stats(args.calls)
        finally:
            await gateway.stop()
            await redis.stop()
            for layer in layers.values():
                await layer.stop()


SETTINGS: dict[str, dict[str, Any]] = {}
"""Sections a bench adds to ``--serve``'s gateway settings, merged into each section
(``bench/voice_cost.py``: no deadline watcher and a long write timeout, for a gateway run under
valgrind); none here."""


async def serve(args: argparse.Namespace) -> None:
    """``--serve``: the layer alone, the durable baseline and the whole gateway (both modes) of
    this tree, or of ``--tree``, in this process, driven by the parent: one JSON line of ports,
    then one answer per command read on stdin (``cpu``, ``settle``, ``lag-start``,
    ``lag-stop``, ``gc``, ``contacts``, ``rewrite``, ``valkey``, ``quit``). Each tree measured
    runs in a process like this one, so the trees are measured alike."""
    import redis.asyncio as redis_asyncio

    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.runtime import Gateway
    from tests.harness import settings_for

    logging_off()
    modes = ("set_variable", "mset")
    layers = {mode: await protocol_only_server(mode) for mode in modes}
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory(
        prefix="bench-voice-", dir=args.valkey_dir or None
    ) as valkey_tmp:
        redis = EmbeddedRedis(Path(valkey_tmp) / "redis")
        await redis.start()
        if args.pin and redis.process is not None:  # Valkey (every thread) beside the callers
            for task in Path(f"/proc/{redis.process.pid}/task").iterdir():
                os.sched_setaffinity(int(task.name), {OTHER_CPU})
        # a pool the paced runs cannot exhaust: redis-py's default of 100 connections refuses
        # the 101st XADD at once (MaxConnectionsError) when a stall of Valkey holds 100 calls
        durable_client = redis_asyncio.Redis.from_url(redis.url, max_connections=100_000)
        durables = {mode: await protocol_only_server(mode, durable_client) for mode in modes}
        settings, configs = settings_for(
            Path(tmp) / "gw", redis.url, "bench",
            adapters={
                # set_with named: without it this gateway ran MSet, the adapter's default since
                # the third session, against a layer sending five SET VARIABLE
                "set": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                        "set_with": "set_variable"},
                "mset": {"type": "asterisk", "agi_listen": "127.0.0.1:0", "set_with": "mset"},
            },
            # Nobody answers the bench's calls (no AMI): with the 15 s answer deadline the
            # thousands of calls of the closed-loop rounds all breached during the paced runs
            # that follow, a burst of deadline work no line has at once, and the paced p99
            # measured that instead of the call path. bench/deadline_sweep_bench.py measures it.
            sla={"voice_answer": "1h"},
            **SETTINGS,
        )
        gateway = Gateway(settings, configs, clock=SYSTEM_CLOCK)
        await gateway.start()
        settle_gc(args)
        assert gateway.cases is not None
        aggregator = gateway.cases.aggregator
        probe: Any = None
        try:
            ports = {
                mode: {"layer": layers[mode].port, "durable": durables[mode].port,
                       "gateway": gateway.adapters[name].port}  # type: ignore[attr-defined]
                for mode, name in (("set_variable", "set"), ("mset", "mset"))
            }
            print(json.dumps({"ports": ports}), flush=True)
            while True:
                command = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
                answer: dict[str, Any] = {}
                if command == "settle":
                    # the dashboard's aggregator has read every event of the run (its work is
                    # part of a contact's cost, and must not land in the next run)
                    seen = -1
                    while aggregator.processed != seen:
                        seen = aggregator.processed
                        await asyncio.sleep(0.3)
                elif command == "lag-start":  # where the loop stalls (bench/loop_lag.py)
                    from bench.loop_lag import LagProbe

                    probe = LagProbe()
                    probe.start()
                elif command == "lag-stop" and probe is not None:
                    from bench.loop_lag import print_report

                    with contextlib.redirect_stdout(sys.stderr):
                        print_report(await probe.stop(), probe.stall_ms)
                    probe = None
                elif command == "gc":
                    answer["gc"] = gc.get_stats()
                elif command == "contacts":
                    answer["contacts"] = await gateway.redis.xlen(gateway.keys.contacts)
                    answer["durable_failed"] = DURABLE_FAILED[0]
                elif command == "rewrite":  # a fresh append-only file before a paced run
                    await gateway.redis.delete(DURABLE_STREAM)  # the baseline's, read by none
                    await gateway.redis.execute_command("BGREWRITEAOF")
                    while True:
                        info = await gateway.redis.info("persistence")
                        if not (info["aof_rewrite_in_progress"] or info["aof_rewrite_scheduled"]):
                            break
                        await asyncio.sleep(0.05)
                elif command == "valkey":  # what Valkey did meanwhile (the paced runs' tail)
                    info = await gateway.redis.info("persistence")
                    stats = await gateway.redis.info("stats")
                    commands = await gateway.redis.info("commandstats")
                    answer["valkey"] = {
                        "scripts": commands.get("cmdstat_evalsha", {}).get("calls", 0),
                        "contacts": await gateway.redis.xlen(gateway.keys.contacts),
                        "rewrites": info["aof_rewrites"],
                        "rewriting": info["aof_rewrite_in_progress"],
                        "aof": info["aof_current_size"],
                        "cycles": stats["eventloop_cycles"],
                        "cycles_us": stats["eventloop_duration_sum"],
                    }
                elif command in ("quit", ""):
                    break
                answer["cpu"] = time.process_time()
                print(json.dumps(answer), flush=True)
        finally:
            await gateway.stop()
            for layer in (*layers.values(), *durables.values()):
                await layer.stop()
            await durable_client.aclose()
            await redis.stop()


class Servers:
    """A ``--serve`` child: the layer, the durable baseline and the gateway of one tree."""

    def __init__(self, label: str, tree: str, extra: tuple[str, ...] = ()) -> None:
        self.label = label
        self.tree = tree
        self.extra = extra
        self.proc: asyncio.subprocess.Process | None = None
        self.ports: dict[str, dict[str, int]] = {}

    async def start(self) -> None:
        tree = ["--tree", self.tree] if self.tree else []
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", *tree, *self.extra,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.ports = (await self._read())["ports"]

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read()

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} servers ended")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(RuntimeError, ConnectionError):
                assert self.proc.stdin is not None
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            await self.proc.wait()


async def measured(
    servers: Servers, what: str, mode: str, run: str, kind: str, args: argparse.Namespace,
    lag: bool = False,
) -> dict[str, Any]:
    """One run of callers against a child's server; its CPU from the child (after the
    aggregator settled, for the gateway)."""
    gateway = what == "gateway"
    paced = gateway and kind == "open"
    valkey0 = (await servers.ask("valkey")).get("valkey") if gateway else None
    cpu0 = (await servers.ask("cpu"))["cpu"]
    if lag:
        await servers.ask("lag-start")
    result = await drive(servers.ports[mode][what], run, kind, args)
    if lag:
        await servers.ask("lag-stop")
    cpu1 = (await servers.ask("settle" if gateway else "cpu"))["cpu"]
    result["server_cpu"] = cpu1 - cpu0
    if valkey0:  # an older tree's child has no such command
        valkey1 = (await servers.ask("valkey"))["valkey"]
        if "scripts" in valkey1:  # about the intake batches' size (the aggregator's few
            # script calls counted too): a batch's fixed cost is shared by its contacts
            batches = max(1, valkey1["scripts"] - valkey0["scripts"])
            result["batch"] = (valkey1["contacts"] - valkey0["contacts"]) / batches
        if not paced:
            return result
        cycles = max(1, valkey1["cycles"] - valkey0["cycles"])
        busy = (valkey1["cycles_us"] - valkey0["cycles_us"]) / cycles
        rewrites = valkey1["rewrites"] - valkey0["rewrites"] + valkey1["rewriting"]
        result["valkey"] = (
            f"Valkey in the run: {cycles} event loop cycles, {busy:.0f} us a cycle; append-only "
            f"file {valkey1['aof'] / 2**20:.0f} MB (rewritten just before), rewrites {rewrites} "
            f"(under way at the start: {'yes' if valkey0['rewriting'] else 'no'})")
    return result


async def main(args: argparse.Namespace) -> None:
    logging_off()
    print(f"voice bench: {args.concurrency} concurrent callers, {args.duration:g} s per run, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus"
          + (f"; servers on CPU {SERVER_CPU}, callers and Valkey on CPU {OTHER_CPU}"
             if args.pin else ""))
    bare = await bare_server()
    bare_port = bare.sockets[0].getsockname()[1]
    base = await drive(bare_port, "b", "closed", args)
    print(line("bare asyncio server (no writes)", base))
    base_paced = await drive(bare_port, "c", "open", args)
    print(line(f"bare server paced at {args.rate:g} calls/s", base_paced))
    bare.close()

    extra = (*(("--no-settle",) if args.no_settle else ()), *(("--pin",) if args.pin else ()),
             *(("--valkey-dir", args.valkey_dir) if args.valkey_dir else ()))
    trees = [Servers("now", "", extra)]
    if args.before:
        trees.append(Servers("before", args.before, extra))
    try:
        for servers in trees:
            await servers.start()
        run = str(int(time.time()))
        modes = ("set_variable", "mset")
        # the layer alone, the durable baseline and the whole gateway (of each tree) in
        # alternating rounds, the best
        # of each: on a shared machine the load moves between runs, and the ratio is what counts
        best: dict[tuple[str, str, str], dict[str, Any]] = {}
        for r in range(args.rounds):
            for servers in trees:
                for mode in modes:
                    for what in WHAT:
                        result = await measured(
                            servers, what, mode, f"{run}{r}{servers.label}{mode}{what}",
                            "closed", args)
                        cpu = result["server_cpu"] / max(1, result["sessions"])
                        key = (servers.label, mode, what)
                        old = best.get(key)
                        if old is None or cpu < old["server_cpu"] / max(1, old["sessions"]):
                            best[key] = result
        for servers in trees:
            tag = "" if len(trees) == 1 else f", {servers.label}"
            for mode in modes:
                layer = best[(servers.label, mode, "layer")]
                whole = best[(servers.label, mode, "gateway")]
                print(line(f"FastAGI layer ({mode}{tag})", layer, base))
                paced_layer = await measured(
                    servers, "layer", mode, f"{run}{servers.label}{mode}lp", "open", args)
                print(line(f"  paced at {args.rate:g} calls/s", paced_layer, base_paced))
                durable = best[(servers.label, mode, "durable")]
                print(line(f"layer + one XADD ({mode}{tag})", durable, base))
                await servers.ask("rewrite")
                paced_durable = await measured(
                    servers, "durable", mode, f"{run}{servers.label}{mode}dp", "open", args)
                print(line(f"  paced at {args.rate:g} calls/s", paced_durable, base_paced))
                print(line(f"gateway, Redis intake ({mode}{tag})", whole, base))
                # The closed-loop rounds write enough to reach Valkey's rewrite threshold
                # (64 MB, then twice the rewritten size) at about this point: whether a
                # rewrite (a fork, a child writing the data set on the same cores and disk)
                # fell into the paced run was luck, and moved its p99 by milliseconds. Each
                # tree's paced run starts on a freshly rewritten file instead.
                await servers.ask("rewrite")
                paced = await measured(
                    servers, "gateway", mode, f"{run}{servers.label}{mode}gp", "open", args,
                    lag=args.lag)
                print(line(f"  paced at {args.rate:g} calls/s", paced, base_paced))
                if "valkey" in paced:
                    print(f"    {paced['valkey']}")
                ratio = (layer["server_cpu"] / layer["sessions"]) / (
                    whole["server_cpu"] / whole["sessions"]
                )
                p99 = {
                    name: pct([x * 1000 for x in r["latencies"]], 0.99)
                    for name, r in (("gw", paced), ("layer", paced_layer), ("bare", base_paced),
                                    ("durable", paced_durable))
                }
                print(f"  {mode}{tag}: gateway / layer, sessions per server core = {ratio:.2f} "
                      f"(aim >= 0.8); p99 at {args.rate:g} calls/s, gateway over layer "
                      f"{p99['gw'] - p99['layer']:+.2f} ms, over the bare server "
                      f"{p99['gw'] - p99['bare']:+.2f} ms (aim < 2 ms)")
                per = [r["server_cpu"] / max(1, r["sessions"]) * 1e6
                       for r in (layer, whole, durable)]
                print(f"  {mode}{tag}: server CPU a session: layer {per[0]:.0f} us, what the "
                      f"gateway adds (Intake, dashboard) {per[1] - per[0]:.0f} us; 0.8 needs "
                      f"it under {per[0] / 4:.0f} us")
                print(f"  {mode}{tag}: layer + one XADD / layer, per server core "
                      f"{per[0] / per[2]:.2f}, its p99 at {args.rate:g} calls/s over the layer "
                      f"{p99['durable'] - p99['layer']:+.2f} ms, over the bare server "
                      f"{p99['durable'] - p99['bare']:+.2f} ms (what one durable write alone "
                      f"costs); gateway / layer + one XADD {per[2] / per[1]:.2f}, its p99 over it "
                      f"{p99['gw'] - p99['durable']:+.2f} ms")
            counts = await servers.ask("contacts")
            print(f"{'':<34} {counts['contacts']} contacts on the stream{tag}; the durable "
                  f"baseline's XADDs failed: {counts['durable_failed']}")
        if len(trees) > 1:
            for mode in modes:
                for what in ("layer", "gateway"):
                    now, old = (best[(label, mode, what)] for label in ("now", "before"))
                    per = [r["server_cpu"] / max(1, r["sessions"]) * 1e6 for r in (now, old)]
                    print(f"  {what} ({mode}): {per[0]:.0f} us of server CPU a session now, "
                          f"{per[1]:.0f} before ({per[0] / per[1]:.2f})")
    finally:
        for servers in trees:
            await servers.stop()

    classic = await bench_pyst2(args.pyst2_calls, 4)
    print(line("pyst2 classic AGI, process/call", classic))


def settle_gc(args: argparse.Namespace) -> None:
    """What ``gateway serve`` does once its listeners are up (``settle_heap``: the heap made so
    far frozen out of the collector's sight, the young generation collected after 10,000 new
    objects instead of 700), unless ``--no-settle``; an older tree without it runs as it is.
    The layer alone shares the process, so both are measured alike."""
    if getattr(args, "no_settle", False):
        return
    try:
        from gateway.server.runtime import settle_heap
    except ImportError:
        return
    settle_heap()


def logging_off() -> None:
    import logging

    logging.disable(logging.WARNING)


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.argv.remove("--child")
        child(sys.argv[1:])
    else:
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--duration", type=float, default=3.0)
        parser.add_argument("--concurrency", type=int, default=100)
        parser.add_argument("--rate", type=float, default=1000.0)
        parser.add_argument("--pyst2-calls", type=int, default=60)
        parser.add_argument("--rounds", type=int, default=2,
                            help="alternating rounds of the layer alone, the durable baseline "
                                 "and the gateway")
        parser.add_argument("--lag", action="store_true",
                            help="record the loop's stalls in the paced gateway runs "
                                 "(bench/loop_lag.py)")
        parser.add_argument("--calls", type=int, default=-1, metavar="N",
                            help="only count Python calls per session (cProfile), and print "
                                 "the N functions of most own time")
        parser.add_argument("--before", default="", metavar="DIR",
                            help="measure an older gateway too, in the same alternating rounds "
                                 "(a tree holding its gateway package: git archive <commit> "
                                 "gateway | tar -x -C DIR); with --calls, count its calls")
        parser.add_argument("--no-settle", action="store_true",
                            help="leave the servers' garbage collector as Python starts it "
                                 "(gateway serve calls settle_heap)")
        parser.add_argument("--pin", action="store_true",
                            help=f"the servers on CPU {SERVER_CPU}, the callers and Valkey on "
                                 f"CPU {OTHER_CPU} (a core of the server's own)")
        parser.add_argument("--valkey-dir", default="",
                            help="put the gateway's Valkey's files here (/dev/shm: the tail "
                                 "without the disk; not durable, a diagnostic)")
        parser.add_argument("--tree", default="", help=argparse.SUPPRESS)
        parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
        ns = parser.parse_args()
        if ns.pin:  # this process (the bare server) and the --serve children it starts
            os.sched_setaffinity(0, {SERVER_CPU})
        if ns.tree:  # the child counting an older tree: its gateway package first on the path
            sys.path.insert(0, ns.tree)
            from bench.intake_bench import without_plugins

            without_plugins()
        if ns.serve:
            _runner()(serve(ns))
        elif ns.calls < 0:
            _runner()(main(ns))
        else:
            print(f"{ns.tree or 'now'}:", flush=True)
            _runner()(calls(ns))
            if ns.before:
                subprocess.run([sys.executable, __file__, "--calls", str(ns.calls),
                                "--duration", str(ns.duration), "--rounds", str(ns.rounds),
                                "--tree", ns.before,
                                *(["--no-settle"] if ns.no_settle else [])], check=True)
