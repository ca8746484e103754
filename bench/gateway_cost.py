"""The gateway's own work per contact in instructions (callgrind): a count the machine's load
does not move.

On the shared 2-core machines the server's CPU time per request moves by a factor of two and
more with the other work (and with whatever the host runs beside the virtual machine), and it
moves for the plain aiohttp handler as much as for the gateway. This bench runs each server of
``bench/intake_bench.py`` (``plain``: an aiohttp handler that answers 202 and writes nothing;
``gateway``: the full ``POST /v1/intake`` path into Redis) under valgrind's callgrind, its
instrumentation switched on only once the server has started and taken a warm-up load, and
counts the instructions the server process executes in user space (the interpreter, aiohttp's
parser, uvloop, orjson, hiredis...; not the kernel's side of its system calls) while the
intake load (``--connections`` keep-alive connections, new contacts each from its own sender)
runs against it for ``--seconds``. Printed per request: instructions, and for the gateway the
mean batch (contacts per ``EVALSHA``, from ``INFO commandstats``), since a batch's fixed cost is
shared by its contacts. ``raw`` is the floor: the same 202 from a bare ``asyncio.Protocol``
on uvloop (``RawHttp``), so ``plain - raw`` is aiohttp's own work per request.

    .venv/bin/python -m bench.gateway_cost                        # about 3 minutes
    .venv/bin/python -m bench.gateway_cost --before DIR --rounds 2  # about 6 minutes

``--before DIR``: a source tree holding an older ``gateway`` package (``git archive <commit>
| tar -x -C DIR``), measured the same way in its own process on the same Valkey, in
alternating order. Under callgrind a server runs 30-60 times slower and its batches come out
smaller than the real bench's at its peak (4-8 contacts an ``EVALSHA`` against about 14 with
``intake_bench``'s 64 connections), so a batch's fixed cost weighs more: the batch is printed;
compare trees at the same ``--connections``. The count does not move with the machine's load,
but a round's figure for the same code still moves by up to ~6 % (the batches, and the idle
work taken off, 12-34 % of the count): read a difference under ~7 % as none, and repeat the
rounds. Needs ``valgrind`` (callgrind) on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


class RawHttp(asyncio.Protocol):
    """``raw``: the floor of an HTTP answer in Python on uvloop, no framework: a keep-alive
    request's head found by its blank line and its body by ``Content-Length``, the same 202 as
    ``plain`` answered from the callback. Not a server to use (no parser worth the name): what
    aiohttp's own per-request work is measured against."""

    ANSWER = (
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: 11\r\n\r\n{\"id\": \"x\"}"
    )

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            self.transport.write(self.ANSWER)
        self.buffer = buffer


def serve_raw(port: int, ready: Any) -> None:
    import uvloop

    async def run() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(RawHttp, HOST, port, backlog=1024)
        ready.set()
        await asyncio.Event().wait()

    uvloop.run(run())


def child(kind: str, port: int, redis_url: str, prefix: str, src: str, ready: str) -> None:
    """The server process (run under valgrind): ``bench/intake_bench.py``'s server of
    ``kind`` (or ``raw``), ``ready`` (a file) written once it listens."""
    sys.path.insert(0, str(ROOT))
    from bench import intake_bench

    # under valgrind the loop runs late and a batch's answer is handled late: no overload
    # refusals, no spooling for a write that only looks slow
    # and no deadline watcher: in a run of seconds no deadline falls due, so all it does is
    # look at the deadline sets four times a second (three round trips each), about a third of
    # the idle work that is counted and taken off: the fewer requests valgrind lets through on
    # a loaded machine, the more that estimate weighed (ninth session: 20-49 % of a round)
    intake_bench.SETTINGS.update({
        "limits": {"loop_lag": 0, "in_flight": 0},
        "redis": {"write_timeout": 60},
        "watcher": {"enabled": False},
    })

    class Ready:
        def set(self) -> None:
            Path(ready).write_text("ok")

    if kind == "raw":
        serve_raw(port, Ready())
    else:
        intake_bench.serve(kind, port, redis_url, prefix, Ready(), src)


def _callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def _dump(pid: int, folder: str) -> int:
    """Dump the server's counters; return the instructions counted since the last zero."""
    before = set(glob.glob(f"{folder}/callgrind.out.*"))
    _callgrind(pid, "-d")
    new: set[str] = set()
    for _ in range(400):  # written by the server's next instrumented step
        new = set(glob.glob(f"{folder}/callgrind.out.*")) - before
        if new:
            break
        time.sleep(0.05)
    total = 0
    for name in new:
        for _ in range(100):
            with open(name) as fh:
                for line in fh:
                    if line.startswith(("summary:", "totals:")):
                        total = int(line.split()[1])
            if total:
                break
            time.sleep(0.05)
        if os.environ.get("GATEWAY_COST_KEEP"):
            print("kept", name, flush=True)
        else:
            os.unlink(name)
    return total


class Server:
    def __init__(self, kind: str, redis_url: str, prefix: str, src: str, folder: str) -> None:
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = int(s.getsockname()[1])
        ready = Path(folder) / f"ready-{prefix}"
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); from bench.gateway_cost import child; "
            "child(sys.argv[2], int(sys.argv[3]), *sys.argv[4:])"
        )
        self.process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={folder}/callgrind.out.%p", sys.executable, "-c", code,
             str(ROOT), kind, str(self.port), redis_url, prefix, src, str(ready)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for _ in range(3000):
            if ready.exists():
                break
            if self.process.poll() is not None:
                raise RuntimeError(f"{kind} ({src or 'this tree'}) did not start")
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{kind} ({src or 'this tree'}) did not start in 300 s")
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def _load(port: int, seconds: float, offset: int, connections: int) -> int:
    from bench.intake_bench import body
    from bench.loadgen import build_request, run_load

    headers = {"Content-Type": "application/json"}
    result = await run_load(
        HOST, port,
        lambda i: build_request(HOST, port, "POST", "/v1/intake", body(offset + i), headers),
        connections=connections, seconds=seconds, expect=202,
    )
    if result.errors:
        print(f"  ({result.errors} answers were not 202)", flush=True)
    return result.ok


async def _evalsha(redis_url: str) -> int:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        stats = await client.info("commandstats")
    finally:
        await client.aclose()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def measure(
    server: Server, redis_url: str, seconds: float, offset: int, connections: int, folder: str
) -> tuple[float, int, float, float]:
    """Instructions per request, requests, contacts per EVALSHA, and the share of the counted
    instructions that the server spends as long without requests (taken off).

    The server's timers (the overload probe, the loops' sleeps and leases) cost the same per
    second with or without requests; under valgrind a second holds 30-60 times fewer requests
    than on the real machine, so that work would weigh on each request that much more. Its
    rate is counted first, ``IDLE_S`` with no load, and taken off the window of the load,
    which runs on for ``TAIL_S`` after the last answer so that what the gateway does per
    contact in the background (the dashboard's aggregator reading the ``enqueued`` events)
    is in it.
    """
    _callgrind(server.pid, "-i", "on")
    _callgrind(server.pid, "-z")
    started = time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle = _dump(server.pid, folder) / (time.monotonic() - started)
    _callgrind(server.pid, "-z")
    started = time.monotonic()
    calls0 = await _evalsha(redis_url)
    ok = await _load(server.port, seconds, offset, connections)
    calls = await _evalsha(redis_url) - calls0
    await asyncio.sleep(TAIL_S)
    instructions = _dump(server.pid, folder)
    taken = idle * (time.monotonic() - started)
    _callgrind(server.pid, "-i", "off")
    per = (instructions - taken) / max(1, ok)
    return per, ok, ok / calls if calls else 0.0, taken / max(1, instructions)


IDLE_S = 5.0
TAIL_S = 3.0


async def main(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from gateway.queueing.embedded import EmbeddedRedis

    folder = tempfile.mkdtemp(prefix="gateway-cost-")
    redis = EmbeddedRedis(Path(folder) / "r", appendfsync="always")
    redis.start_sync()
    servers: dict[str, Server] = {}
    try:
        kinds = [("raw", "raw", ""), ("plain", "plain", ""), ("gateway", "gateway", "")]
        if args.before:
            kinds.append(("gateway-before", "gateway", args.before))
            # this tree loaded the same way as the older one (its modules from the tree's
            # folder, the adapter plugins of this environment off), so that only the trees
            # differ: the plugins (examples/line) are no part of either
            kinds[2] = ("gateway", "gateway", str(ROOT))
        for label, kind, src in kinds:
            servers[label] = Server(kind, redis.url, f"cost-{label}", src, folder)
        offset = 0
        for server in servers.values():  # warm-up, not counted (instrumentation off)
            await _load(server.port, 2.0, offset, args.connections)
            offset += 10_000_000
        figures: dict[str, list[float]] = {label: [] for label in servers}
        for r in range(args.rounds):
            order = list(servers.items())
            if r % 2:
                order.reverse()
            for label, server in order:
                per, ok, batch, idle = await measure(
                    server, redis.url, args.seconds, offset, args.connections, folder
                )
                offset += 10_000_000
                figures[label].append(per)
                extra = f", {batch:.1f} contacts per EVALSHA" if label.startswith("gateway") else ""
                print(f"round {r + 1} {label:14} {per / 1000:8.1f} K instructions a request "
                      f"({ok} requests{extra}; idle work taken off: {idle:.1%})", flush=True)
    finally:
        for server in servers.values():
            server.stop()
        redis.stop_sync()
        shutil.rmtree(folder, ignore_errors=True)
    best = {label: min(values) for label, values in figures.items()}
    print()
    print("| server | instructions a request (least of the rounds) | / plain |")
    print("|---|---:|---:|")
    for label, value in best.items():
        print(f"| {label} | {value / 1000:.1f} K | {value / best['plain']:.2f} |")
    if "gateway-before" in best:
        print(f"gateway after / before: {best['gateway'] / best['gateway-before']:.3f}")


if __name__ == "__main__":
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("gateway_cost: needs valgrind (callgrind) on the path")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    arguments = parser.parse_args()
    asyncio.run(main(arguments))
