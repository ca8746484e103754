"""The dashboard aggregator's cost per contact, and Valkey's, from figures the load hardly moves.

A gateway (its own process, the aggregator's loop stopped) takes ``--contacts`` new contacts
through ``Intake.submit`` (64 at a time, each from its own sender, as ``bench/intake_bench.py``
sends them; surge warnings on); then the aggregator reads
the ``enqueued`` events as its loop does: 200 a read, and behind a backlog (every read full)
twice the last full read's, up to 1,000 (``--batch N``: N a read, to see what a larger read
holds the loop for; ``--most M``: reads grow up to M, ``--most N`` keeps them at N; neither
is used by ``--tail``). Printed, per contact:

- Valkey's commands (``INFO commandstats``, the commands scripts run included) and its CPU
  (``used_cpu_user + used_cpu_sys``) for the writes and for the aggregator's pass;
- the aggregator's CPU time per contact and per full batch (``time.thread_time`` around
  ``poll``: what one batch holds the event loop for), and its Python function calls per
  contact (cProfile, over a second read of the same events: a redelivery does the same work).

    .venv/bin/python -m bench.aggregator_bench                   # about 20 s
    .venv/bin/python -m bench.aggregator_bench --before DIR      # and an older tree
    .venv/bin/python -m bench.aggregator_bench --before DIR --rounds 3   # a fresh server each

``--senders N``: the contacts come from N senders in turn, so a sender's third contact and
every later one may raise its citizen's repeat surge (``repeat = 3``): with ``--senders``
a third of ``--contacts``, every sender's third contact is its first repeat of the day, as
when an outage brings citizens back to the line. Printed besides: the repeat surges written
and the aggregator's wall time per contact and per full batch (its round trips to Valkey,
which are waits and not CPU: under load each is a wait for the loop and for Valkey's fsync).

    .venv/bin/python -m bench.aggregator_bench --contacts 3000 --senders 1000 --before DIR

``--busy MS`` keeps the event loop busy while the aggregator reads, as a worker's loop is under
a load it can hardly take: a callback that spins for MS ms runs once in every turn of the loop,
so each of the reader's round trips waits a turn or more. Its wall time per batch then counts
its round trips (the CPU figures include the spinning and mean nothing then).

    .venv/bin/python -m bench.aggregator_bench --busy 20 --before DIR --rounds 1
    .venv/bin/python -m bench.aggregator_bench --busy 20 --outcomes --before DIR --rounds 1
    .venv/bin/python -m bench.aggregator_bench --busy 20 --outcomes closed --before DIR

``--outcomes``: then every contact is answered (a ``responded`` event each, stamped as a case
system's reply is: ``RedisQueue.stamp``, 64 at a time), and the reader's pass over those events
is timed the same way. Printed besides: what the writes cost Valkey (commands and CPU an
event) and the gateway (CPU an event). Since the thirteenth session a stamp takes its event's
wallboard step itself and the reader skips the event; an older tree's reader steps them, 50
to a part, each part reading its contacts first: compare the two trees' sums.
``--outcomes closed`` closes every contact instead, with the write a close through the API
ends with (``RedisQueue.emit``, a ``closed`` event each, ``once`` where the tree has it: its
``stamp:closed`` mark checked and set in the call; an older tree's route read and set the
mark in round trips of their own, not in this write; the route's read of the contact is not
in it either): since the fourteenth session ``emit.lua`` takes the step, ``emit`` reading the
contact's facts first.

``--tail RATE`` instead drives a gateway over HTTP at a paced RATE (``bench/intake_bench.py``'s
load) in phases with the aggregator's loop on and off in turns, and prints the edge-to-enqueue
p50 and p99 of each phase (``enqueued_at - received_at`` of the records): what the aggregator
adds to the tail, measured side by side.

    .venv/bin/python -m bench.aggregator_bench --tail 300 --seconds 6 --rounds 2

``--before DIR``: a source tree holding an older ``gateway`` package (``git archive <commit>
gateway | tar -x -C DIR``), measured the same way in its own process on the same Valkey.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import inspect
import os
import pstats
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bench.procs import child_path, each_tree, intake_load

TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。" * 3


Figures = tuple[dict[str, int], float, dict[str, int]]


async def _server_figures(redis: Any) -> Figures:
    stats = await redis.info("commandstats")
    calls = {name[len("cmdstat_"):]: int(v["calls"]) for name, v in stats.items()}
    usec = {name[len("cmdstat_"):]: int(v["usec"]) for name, v in stats.items()}
    cpu = await redis.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), usec


def _delta(a: Figures, b: Figures, n: int) -> tuple[float, float, str, str]:
    calls = {k: v - a[0].get(k, 0) for k, v in b[0].items() if v - a[0].get(k, 0) > 0}
    usec = {k: v - a[2].get(k, 0) for k, v in b[2].items() if v - a[2].get(k, 0) > 0}
    scripts = sum(v for k, v in calls.items() if k in ("evalsha", "eval"))
    commands = sum(calls.values()) - scripts
    top = ", ".join(
        f"{k} {v / n:.2f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])[:12]
    )
    # commandstats' own time (the script's counts its commands' too): where a contact's
    # Valkey time goes inside commands; the rest of the CPU is I/O, parsing and the AOF
    timed = ", ".join(
        f"{k} {v / n:.1f}" for k, v in sorted(usec.items(), key=lambda kv: -kv[1])[:12]
    )
    return commands / n, (b[1] - a[1]) * 1e6 / n, top, timed


@contextlib.asynccontextmanager
async def bench_gateway(
    redis_url: str, tag: str, mobiles: str, sections: dict[str, Any] | None = None,
    senders: int = 100_000_000, **redis_settings: Any,
) -> AsyncIterator[tuple[Any, Any, Callable[[int], Any]]]:
    """A started gateway of the tree on the path (its aggregator stopped, driven by hand),
    64 contacts written and aggregated to warm it (senders of their own), its heap settled as
    ``gateway serve`` settles it, and ``inbound(i)``:
    a new web contact of sender ``<mobiles><i % senders>``; ``sections``: more settings
    (``{"intake": {...}}``). Also used by bench/valkey_cost.py."""
    from bench.intake_bench import gateway_classes
    from gateway.records import Inbound, Sender

    parse_settings, Gateway = gateway_classes()
    settings, configs = parse_settings({
        "gateway": {"data_dir": tempfile.mkdtemp(prefix=f"{tag}-gw-"), "instance": "bench"},
        "redis": {"url": redis_url, "prefix": f"{tag}-{os.getpid()}", **redis_settings},
        "http": {"listen": "127.0.0.1:0"},
        "api": {"open_to_loopback": True},
        "watcher": {"enabled": False},
        **(sections or {}),
    })
    gateway = Gateway(settings, configs)
    await gateway.start()
    try:
        aggregator = gateway.cases.aggregator
        await aggregator.stop()
        await aggregator.ensure_group()
        now = gateway.clock.now_us()

        def inbound(i: int) -> Inbound:
            # the warm-up's contacts (i < 0) from senders of their own: none of them counts
            # as an earlier contact of a measured sender's
            number = f"{mobiles}{i % senders:08d}" if i >= 0 else f"{mobiles}9{-i:07d}"
            return Inbound(
                channel="web", adapter="bench", external_id=f"{tag}-{i}",
                sender=Sender(number), recipient="12345",
                received_at=now + i, text=TEXT, subject="路灯损坏",
            )

        await asyncio.gather(*(gateway.intake.submit(inbound(-1 - i)) for i in range(64)))
        await aggregator.catch_up()  # warm: scripts loaded, caches filled
        from gateway.server.runtime import settle_heap

        settle_heap()  # the collector's settings of `gateway serve`
        yield gateway, aggregator, inbound
    finally:
        await gateway.stop()


async def _measure(
    redis_url: str, contacts: int, label: str, senders: int = 0, batch: int = 0,
    busy_ms: float = 0.0, outcomes: str = "", most: int = 0,
) -> None:
    async with bench_gateway(
        redis_url, "agg", "+86138", senders=senders or 100_000_000
    ) as (gateway, aggregator, inbound):
        if batch:  # another read size than the aggregator's own (its loop reads 200)
            aggregator.batch = batch
        if most:  # reads grow up to another size than five times the first (an older tree's
            aggregator.most = most  # reader has no such attribute: its reads stay the same)
        redis = gateway.redis
        start = await _server_figures(redis)
        ids: list[str] = []
        for i in range(0, contacts, 64):
            ids += [r.contact_id for r in await asyncio.gather(
                *(gateway.intake.submit(inbound(j)) for j in range(i, min(contacts, i + 64)))
            )]
        written = await _server_figures(redis)
        profile = cProfile.Profile()
        batches, walls, wall, total_cpu, sizes = await _passes(aggregator, busy_ms)
        done = await _server_figures(redis)
        surges = sum(
            1 for _, f in await redis.xrange(gateway.keys.events) if f[b"type"] == b"surge"
        )
        # the Python calls in a second pass over the same events (a redelivery: same work)
        await redis.xgroup_setid(gateway.keys.events, "gateway-aggregate", "0")
        cursor = getattr(gateway.keys, "agg_cursor", None)  # a cursor reader's (this tree)
        if cursor is not None:
            await redis.delete(cursor)
            await aggregator.ensure_group()  # takes the cursor again: from the start
        profile.enable()
        while await aggregator.poll():
            pass
        profile.disable()
        if outcomes:  # each contact answered (or closed): an outcome event each
            from gateway.records import Event

            at = gateway.clock.now_us()
            # the route's close: once (checked and marked in emit.lua) where the tree has it
            once = {"once": True} if "once" in inspect.signature(gateway.queue.emit).parameters \
                else {}
            before_stamps = await _server_figures(redis)
            stamp_cpu = time.process_time()
            for i in range(0, len(ids), 64):
                await asyncio.gather(*(
                    gateway.queue.emit(Event(c, "closed", at, "bench"), **once)
                    if outcomes == "closed" else gateway.queue.stamp(c, outcomes, at, "bench")
                    for c in ids[i : i + 64]
                ))
            stamp_cpu = time.process_time() - stamp_cpu
            stamped = await _server_figures(redis)
            stepped = await _passes(aggregator, busy_ms)
            read_all = await _server_figures(redis)
    w_cmds, w_cpu, w_top, w_us = _delta(start, written, contacts)
    a_cmds, a_cpu, a_top, a_us = _delta(written, done, contacts)
    calls = getattr(pstats.Stats(profile), "total_calls", 0)
    if os.environ.get("AGG_PROFILE"):
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    batch_ms = 1000 * sorted(batches)[len(batches) // 2] if batches else float("nan")
    most_ms = 1000 * max(batches) if batches else float("nan")
    wall_ms = 1000 * sorted(walls)[len(walls) // 2] if walls else float("nan")
    wall_most = 1000 * max(walls) if walls else float("nan")
    print(
        f"{label}: {contacts} contacts\n"
        f"  intake:     Valkey {w_cmds:5.1f} commands/contact, {w_cpu:6.1f} us CPU/contact"
        f"  ({w_top})\n"
        f"              us in commands/contact: {w_us}\n"
        f"  aggregator: Valkey {a_cmds:5.1f} commands/contact, {a_cpu:6.1f} us CPU/contact"
        f"  ({a_top})\n"
        f"              us in commands/contact: {a_us}\n"
        f"  aggregator: {calls / contacts:.0f} Python calls/contact,"
        f" {total_cpu * 1e6 / contacts:.1f} us CPU/contact, CPU per full batch ({sizes}):"
        f" median {batch_ms:.1f} ms, most {most_ms:.1f} ms of {len(batches)}\n"
        f"  aggregator: wall {wall * 1e6 / contacts:.1f} us/contact, per full batch:"
        f" median {wall_ms:.1f} ms, most {wall_most:.1f} ms;"
        f" {surges} repeat surges written"
        f" ({senders or contacts} senders)"
        + (f"; the loop kept busy {busy_ms:g} ms a turn" if busy_ms else ""),
        flush=True,
    )
    if outcomes:
        cpus, walls, wall, _, sizes = stepped
        wall_ms = 1000 * sorted(walls)[len(walls) // 2] if walls else float("nan")
        batch_ms = 1000 * sorted(cpus)[len(cpus) // 2] if cpus else float("nan")
        s_cmds, s_cpu, s_top, s_us = _delta(before_stamps, stamped, len(ids))
        r_cmds, r_cpu, r_top, _ = _delta(stamped, read_all, len(ids))
        print(
            f"  writes:     Valkey {s_cmds:5.1f} commands/event, {s_cpu:6.1f} us CPU/event"
            f"  ({s_top}); gateway {stamp_cpu * 1e6 / len(ids):.1f} us CPU/event\n"
            f"              us in commands/event: {s_us}\n"
            f"  outcomes:   Valkey {r_cmds:5.1f} commands/event, {r_cpu:6.1f} us CPU/event"
            f"  ({r_top}) in the reader's pass\n"
            f"  outcomes:   {len(ids)} {outcomes!r} events: wall {wall * 1e6 / len(ids):.1f}"
            f" us/event, per full batch ({sizes}): median {wall_ms:.1f} ms"
            f" (CPU {batch_ms:.1f} ms)",
            flush=True,
        )


async def _passes(
    aggregator: Any, busy_ms: float = 0.0
) -> tuple[list[float], list[float], float, float, str]:
    """Poll until nothing is left (the loop spun ``busy_ms`` a turn meanwhile, ``_busy``): the
    CPU and wall times of each full batch (at least ``batch`` events), the whole wall time,
    the CPU time of the polls that read something, and the full batches' sizes."""
    cpus: list[float] = []
    walls: list[float] = []
    sizes: list[int] = []
    total_cpu = 0.0
    stop_busy = _busy(busy_ms) if busy_ms else None
    wall = time.perf_counter()
    try:
        while True:
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            n = await aggregator.poll()
            if n == 0:
                span = f"{min(sizes)}-{max(sizes)} events" if sizes else "none"
                return cpus, walls, time.perf_counter() - wall, total_cpu, span
            cpu = time.thread_time() - cpu0
            total_cpu += cpu
            if n >= aggregator.batch:
                sizes.append(n)
                cpus.append(cpu)
                walls.append(time.perf_counter() - wall0)
    finally:
        if stop_busy is not None:
            stop_busy()


def _busy(ms: float) -> Callable[[], None]:
    """Spin ``ms`` in every turn of the running loop until the function returned is called."""
    loop = asyncio.get_running_loop()
    handle: asyncio.Handle | None = None

    def spin() -> None:
        nonlocal handle
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
        handle = loop.call_soon(spin)

    handle = loop.call_soon(spin)

    def stop() -> None:
        if handle is not None:
            handle.cancel()

    return stop


async def _tail(redis_url: str, rate: float, seconds: float, rounds: int) -> None:
    """Edge-to-enqueue under paced HTTP load, the aggregator's loop on and off in turns."""
    from bench.intake_bench import HOST, edge_to_enqueue, free_port
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway, settle_heap

    port = free_port()
    prefix = f"tail{port}"
    settings, configs = parse_settings({
        "gateway": {"data_dir": tempfile.mkdtemp(prefix="agg-tail-"), "instance": "bench"},
        "redis": {"url": redis_url, "prefix": prefix},
        "http": {"listen": f"{HOST}:{port}"},
        "api": {"open_to_loopback": True},
    })
    gateway = Gateway(settings, configs)
    await gateway.start()
    settle_heap()
    aggregator = gateway.cases.aggregator
    offset = 0
    try:
        for r in range(rounds):
            for phase in ("on", "off"):
                if phase == "off":
                    await aggregator.stop()
                elif r:
                    aggregator.start(gateway.supervisor)
                since_ms = int(time.time() * 1000)
                ok = await intake_load(port, seconds, offset, rate=rate)
                offset += 10_000_000
                p50, p99, _ = await edge_to_enqueue(redis_url, prefix, since_ms)
                print(
                    f"round {r + 1}, aggregator {phase:3}: {ok} contacts at {rate:.0f}/s,"
                    f" edge-to-enqueue p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                    flush=True,
                )
    finally:
        await gateway.stop()


def _child(
    src: str, redis_url: str, contacts: int, senders: int, batch: int, busy_ms: float,
    outcomes: str, most: int,
) -> None:
    child_path(src)
    import uvloop

    uvloop.run(_measure(
        redis_url, contacts, src or "now", senders, batch, busy_ms, outcomes, most
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--contacts", type=int, default=5000)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument(
        "--senders", type=int, default=0,
        help="the contacts from this many senders in turn (default: each its own)",
    )
    parser.add_argument(
        "--tail", type=float, default=0.0, metavar="RATE",
        help="instead: edge-to-enqueue at RATE contacts/s over HTTP, aggregator on and off",
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="of each --tail phase")
    parser.add_argument(
        "--rounds", type=int, default=2,
        help="of --tail phases; else of the runs, each on a fresh server",
    )
    parser.add_argument(
        "--batch", type=int, default=0,
        help="events a read (default the aggregator's own, 200): what a larger read holds",
    )
    parser.add_argument(
        "--most", type=int, default=0,
        help="behind a backlog reads grow up to this (default five times --batch)",
    )
    parser.add_argument(
        "--busy", type=float, default=0.0, metavar="MS",
        help="spin MS ms in every turn of the loop while the aggregator reads (a loaded worker)",
    )
    parser.add_argument(
        "--outcomes", nargs="?", const="responded", default="", choices=("responded", "closed"),
        help="then an outcome event a contact, a reply stamped (responded, the default) or a "
             "close (closed), read and stepped (wall time a batch)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.contacts, args.senders, args.batch, args.busy,
               args.outcomes, args.most)
        return
    if args.tail:
        import uvloop

        from gateway.queueing.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="bench-agg-")) / "r")
        server.start_sync()
        try:
            uvloop.run(_tail(server.url, args.tail, args.seconds, args.rounds))
        finally:
            server.stop_sync()
        return
    for _ in range(args.rounds):  # each round on a fresh server
        each_tree(
            "bench.aggregator_bench",
            ["--contacts", str(args.contacts), "--senders", str(args.senders),
             "--batch", str(args.batch), "--most", str(args.most), "--busy", str(args.busy),
             *(["--outcomes", args.outcomes] if args.outcomes else [])],
            args.before, "bench-agg-",
        )


if __name__ == "__main__":
    main()
