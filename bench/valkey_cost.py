"""Valkey's work per contact in instructions (callgrind): a figure the machine's load does not move.

On a shared 2-core machine Valkey's CPU time per contact (``INFO cpu``, what
``bench/aggregator_bench.py`` prints) moves by 20-40 % from run to run, more than most changes
to the scripts. This bench runs the embedded server's binary under valgrind's callgrind and
counts the instructions Valkey executes (every thread; not the kernel's work: the AOF's
``write`` and ``fdatasync`` are system time and not counted) while a gateway in its own process
writes ``--contacts`` new contacts through ``Intake.submit`` (64 at a time, each from its own
sender, surge warnings on: ``bench/aggregator_bench.py``'s load), and then while the dashboard
aggregator reads their ``enqueued`` events. Printed per contact: instructions for the writes
and for the aggregator's pass, Valkey commands (``INFO commandstats``), AOF bytes and memory.
With ``--replies``, then the rest of a contact's usual life: each is replied to (its
``responded`` stamp, ``Intake.stamp``: the hash read and ``stamp.lua``, which since the
thirteenth session takes the wallboard's step itself) and the aggregator's pass (it steps the
outcome with ``aggregate.lua`` in older trees, skips the marked event since); the same
figures for those two; then one event
each that is not a stamp (``emit.lua``, a ``delivered`` receipt; the aggregator does not read
it here). With
``--deadlines`` (instead), none is replied to: the deadline watcher's sweeps claim each one's
warning and then its breach (``claim.lua``, its ``now`` moved on, which takes the breach's
wallboard step since the thirteenth session), and the aggregator's pass (stepping the
breaches in older trees; per contact breached: the bench's 64 warm-up contacts too). With
``--expiry``
(instead), every key a contact makes (the dedupe key, the rate counter, the sender's 'first'
key, the contact hash) expires after a few seconds: the server's instructions while they
expire, beyond the same time with nothing to expire, per key and per contact.

    .venv/bin/python -m bench.valkey_cost                       # about a minute
    .venv/bin/python -m bench.valkey_cost --before DIR --rounds 2
    .venv/bin/python -m bench.valkey_cost --replies             # and the reply's stamp and step

``--before DIR``: a source tree holding an older ``gateway`` package (``git archive <commit>
gateway | tar -x -C DIR``), measured the same way in its own process on the same server, in
alternating order. Needs ``valgrind`` (callgrind) on the path. ``VALKEY_COST_KEEP=1`` keeps the
callgrind files (their names are printed) for ``callgrind_annotate --inclusive=yes``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _callgrind(pid: int, folder: str, action: str) -> int:
    """Zero (``-z``) or dump (``-d``) the server's counters; a dump answers its instructions."""
    before = set(glob.glob(f"{folder}/callgrind.out.*"))
    subprocess.run(["callgrind_control", action, str(pid)], capture_output=True, check=True)
    if action != "-d":
        return 0
    total = 0
    for _ in range(100):  # the dump is written by the server's next instrumented step
        new = set(glob.glob(f"{folder}/callgrind.out.*")) - before
        if new:
            break
        time.sleep(0.05)
    for name in new:
        with open(name) as fh:
            for line in fh:
                if line.startswith(("summary:", "totals:")):
                    total = int(line.split()[1])
        if not os.environ.get("VALKEY_COST_KEEP"):
            os.unlink(name)
        else:
            print("kept", name, flush=True)
    return total


async def _figures(redis: Any) -> tuple[int, int, int]:
    stats = await redis.info("commandstats")
    calls = sum(
        int(v["calls"]) for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_evalsha")
    )
    aof = int((await redis.info("persistence"))["aof_current_size"])
    memory = int((await redis.info("memory"))["used_memory"])
    return calls, aof, memory


EXPIRY_S = 10
"""``--expiry``: the windows and the retention every key of a contact expires after (longer
than the writes take, so that every key expires while the server is left alone)."""


async def _expiry(redis: Any, pid: int, folder: str, settle_s: float) -> tuple[int, int]:
    """Valkey's instructions and the keys it expired in ``settle_s`` seconds left alone."""
    gone = int((await redis.info("stats"))["expired_keys"])
    await asyncio.to_thread(_callgrind, pid, folder, "-z")
    await asyncio.sleep(settle_s)
    total = await asyncio.to_thread(_callgrind, pid, folder, "-d")
    return total, int((await redis.info("stats"))["expired_keys"]) - gone


async def _measure(
    redis_url: str, pid: int, folder: str, contacts: int, label: str, replies: bool,
    deadlines: bool, expiry: bool = False, senders: int = 100_000_000,
) -> None:
    from bench.aggregator_bench import bench_gateway

    window = f"{EXPIRY_S}s"
    sections = {
        "intake": {"dedupe_window": window, "repeat_window": window},
        "limits": {"sender_window": window},
    } if expiry else None
    more = {"retention": window} if expiry else {}
    async with bench_gateway(
        redis_url, "cost", "+86137", sections, senders, write_timeout="60s", **more
    ) as (gateway, aggregator, inbound):
        if expiry:  # what the server does left alone, then while the contacts' keys expire
            redis = gateway.redis
            await asyncio.sleep(EXPIRY_S + 1)  # the warm-up's keys gone
            idle, _ = await _expiry(redis, pid, folder, EXPIRY_S + 2)
            for i in range(0, contacts, 64):
                await asyncio.gather(
                    *(gateway.intake.submit(inbound(j)) for j in range(i, min(contacts, i + 64)))
                )
            busy, gone = await _expiry(redis, pid, folder, EXPIRY_S + 2)
            per_key = (busy - idle) / max(1, gone)
            print(
                f"{label}: expiry; {gone} keys expired while left alone"
                f" ({gone / contacts:.1f} a contact): {per_key / 1000:,.1f} K instructions a key"
                f" beyond the idle server's, {per_key * gone / contacts / 1000:,.1f} K a contact",
                flush=True,
            )
            return
        redis = gateway.redis
        start = await _figures(redis)
        await asyncio.to_thread(_callgrind, pid, folder, "-z")
        ids: list[str] = []
        for i in range(0, contacts, 64):
            receipts = await asyncio.gather(
                *(gateway.intake.submit(inbound(j)) for j in range(i, min(contacts, i + 64)))
            )
            ids += [r.contact_id for r in receipts]
        write = await asyncio.to_thread(_callgrind, pid, folder, "-d")
        written = await _figures(redis)
        while await aggregator.poll():
            pass
        aggregate = await asyncio.to_thread(_callgrind, pid, folder, "-d")
        done = await _figures(redis)
        if replies:  # each contact replied to: its 'responded' stamp, then the aggregator's step
            events = gateway.intake
            for i in range(0, contacts, 64):
                await asyncio.gather(*(
                    events.stamp(cid, "responded", gateway.clock.now_us(), "bench")
                    for cid in ids[i : i + 64]
                ))
            stamp = await asyncio.to_thread(_callgrind, pid, folder, "-d")
            stamped = await _figures(redis)
            while await aggregator.poll():
                pass
            outcome = await asyncio.to_thread(_callgrind, pid, folder, "-d")
            settled = await _figures(redis)
            # then one event each that is not a stamp (``emit.lua``: a delivery receipt)
            from gateway.records import Event

            for i in range(0, contacts, 64):
                await asyncio.gather(*(
                    gateway.queue.emit(Event(cid, "delivered", gateway.clock.now_us(), "bench"))
                    for cid in ids[i : i + 64]
                ))
            emit = await asyncio.to_thread(_callgrind, pid, folder, "-d")
            emitted = await _figures(redis)
        if deadlines:  # none replied to: each one's warning, then its breach, fall due
            from gateway.cases.watcher import DeadlineWatcher
            from gateway.server.config import WatcherSection

            watcher = DeadlineWatcher(
                gateway.queue, gateway.clock, gateway.metrics, WatcherSection()
            )
            await asyncio.to_thread(_callgrind, pid, folder, "-z")
            before = await _figures(redis)
            # the warnings when every warning and no deadline is due, then the deadlines
            ((_, first_due),) = await redis.zrange(
                gateway.keys.deadlines, 0, 0, withscores=True
            )
            warned = await watcher._sweep("warning", int(first_due) - 1)
            breached = await watcher._sweep("breached", int(first_due) + 86400 * 1_000_000)
            sweep = await asyncio.to_thread(_callgrind, pid, folder, "-d")
            swept = await _figures(redis)
            while await aggregator.poll():
                pass
            breach = await asyncio.to_thread(_callgrind, pid, folder, "-d")
            counted = await _figures(redis)
    n = contacts
    print(
        f"{label}: {n} contacts; per contact: intake {write / n / 1000:,.1f} K instructions,"
        f" {(written[0] - start[0]) / n:.1f} commands, {(written[1] - start[1]) / n:,.0f} AOF"
        f" bytes, {(written[2] - start[2]) / n:,.0f} bytes of memory; aggregator"
        f" {aggregate / n / 1000:,.1f} K instructions, {(done[0] - written[0]) / n:.1f}"
        f" commands; both {(write + aggregate) / n / 1000:,.1f} K instructions",
        flush=True,
    )
    if replies:
        print(
            f"{label}: replies; per contact: 'responded' stamp {stamp / n / 1000:,.1f} K"
            f" instructions, {(stamped[0] - done[0]) / n:.1f} commands,"
            f" {(stamped[1] - done[1]) / n:,.0f} AOF bytes; the aggregator's step"
            f" {outcome / n / 1000:,.1f} K instructions,"
            f" {(settled[0] - stamped[0]) / n:.1f} commands, {(settled[1] - stamped[1]) / n:,.0f}"
            f" AOF bytes; an emitted 'delivered' event {emit / n / 1000:,.1f} K instructions,"
            f" {(emitted[0] - settled[0]) / n:.1f} commands,"
            f" {(emitted[1] - settled[1]) / n:,.0f} AOF bytes",
            flush=True,
        )


    if deadlines:
        n = max(1, breached)  # the bench's warm-up contacts too
        print(
            f"{label}: deadlines ({warned} warnings, {breached} breaches); per contact: the"
            f" watcher's sweeps {sweep / n / 1000:,.1f} K instructions,"
            f" {(swept[0] - before[0]) / n:.1f} commands, {(swept[1] - before[1]) / n:,.0f} AOF"
            f" bytes; the aggregator's step {breach / n / 1000:,.1f} K instructions,"
            f" {(counted[0] - swept[0]) / n:.1f} commands",
            flush=True,
        )


def _child(
    src: str, redis_url: str, pid: int, folder: str, contacts: int, replies: bool,
    deadlines: bool, expiry: bool, senders: int,
) -> None:
    from bench.procs import child_path

    child_path(src)
    import uvloop

    uvloop.run(_measure(
        redis_url, pid, folder, contacts, src or "now", replies, deadlines, expiry, senders
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--contacts", type=int, default=1000)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument("--rounds", type=int, default=1, help="alternating with --before")
    parser.add_argument(
        "--config", action="append", default=[], metavar="NAME=VALUE",
        help="a server setting to try (e.g. hash-max-listpack-value=2048); repeatable",
    )
    parser.add_argument(
        "--replies", action="store_true",
        help="then reply to each contact: its 'responded' stamp and the aggregator's step",
    )
    parser.add_argument(
        "--deadlines", action="store_true",
        help="or let each contact's warning and deadline fall due: the watcher and the step",
    )
    parser.add_argument(
        "--expiry", action="store_true",
        help=f"instead: every key of a contact made to expire after {EXPIRY_S} s; the server's"
        " instructions while they expire, against the same time with nothing to expire",
    )
    parser.add_argument(
        "--senders", type=int, default=100_000_000,
        help="the contacts come from this many senders in turn (500 of 1,000: each sender's"
        " second contact a repeat); default: each its own",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        src, url, pid, folder = args.child
        _child(src, url, int(pid), folder, args.contacts, args.replies, args.deadlines,
               args.expiry, args.senders)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valkey_cost: needs valgrind (callgrind) on the path")
    sys.path.insert(0, str(ROOT))
    from gateway.queueing.embedded import find_server_binary

    folder = tempfile.mkdtemp(prefix="bench-vk-cost-")
    socket = f"{folder}/s.sock"
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/callgrind.out.%p",
         find_server_binary(""), "--port", "0", "--unixsocket", socket, "--dir", folder,
         "--appendonly", "yes", "--appendfsync", "always", "--save", "",
         *[part for kv in args.config for part in ("--" + kv.partition("=")[0],
                                                    kv.partition("=")[2])]],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
    )
    try:
        for _ in range(600):
            if os.path.exists(socket):
                break
            time.sleep(0.1)
        trees = ("", args.before) if args.before else ("",)
        for r in range(args.rounds):
            for src in trees if r % 2 == 0 else trees[::-1]:
                subprocess.run(
                    [sys.executable, "-m", "bench.valkey_cost", "--contacts", str(args.contacts),
                     *(["--replies"] if args.replies else []),
                     *(["--deadlines"] if args.deadlines else []),
                     *(["--expiry"] if args.expiry else []),
                     "--senders", str(args.senders), "--child", src,
                     f"unix://{socket}", str(server.pid), folder],
                    check=True, cwd=ROOT,
                )
    finally:
        server.terminate()
        server.wait(timeout=60)
        if not os.environ.get("VALKEY_COST_KEEP"):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
