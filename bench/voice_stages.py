"""Where a paced FastAGI call's time goes: every call's stages timed inside the gateway.

    .venv/bin/python -m bench.voice_stages --rate 1000 --seconds 5 --rounds 2

The gateway (``set_with = "mset"``, the embedded Valkey with ``appendfsync always``, the
settings of ``bench/voice_bench.py --serve``) runs in this process with bench-only hooks
around its voice and intake steps; ``voice_bench``'s callers run paced in a child process and
report each call's time from before its connect to the socket's close. Each call is cut into:

- ``outside``: the caller's time not inside the gateway's session (connect, the accept
  backlog, the close reaching the caller, the callers' own process);
- ``header``: accept to the intake script's start (the header block's bytes, the session task);
- ``prepare``: the script's start to ``Intake.submit`` (the contact built from the headers);
- ``to batch``: submit to the coalescer's batch task running (a call_soon, a task), or to
  the batch written from the session's own step (``start_batch``: about 0);
- ``encode``: the batch's start to the link's write (encoding, packing, the link's peek);
- ``valkey``: the write to the reply's bytes read (Valkey's work and fsync, the scheduling
  of Valkey and of this process);
- ``wake``: the reply read to the batch task resumed (or to the reply's callback answering
  a batch written from the session's step);
- ``answer``: the batch's results back to the session (futures, the receipt);
- ``mset``: the receipt to ``EXEC MSet`` written (channel variables, the command);
- ``mset rtt``: MSet written to its reply read (the caller's process);
- ``close``: the reply to the session's end.

Printed: each stage's p50/p99, the mean of each stage over the slowest 1 % of calls against
all calls (which stage holds their extra), how the slow calls bunch in time, the batch sizes,
the loop's lag, and Valkey's ``LATENCY LATEST`` (threshold 1 ms), slow log and the commands it
ran during the measured rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("outside", "header", "prepare", "to batch", "encode", "valkey", "wake", "answer",
          "mset", "mset rtt", "close")

_CALL: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "call", default=None)
_BATCH: contextvars.ContextVar[list[dict[str, float]] | None] = contextvars.ContextVar(
    "batch", default=None)


class Hooks:
    """Bench-only wrappers that stamp each call's steps (``time.monotonic``)."""

    def __init__(self) -> None:
        self.calls: dict[str, dict[str, float]] = {}
        self.batches: list[tuple[float, int]] = []
        self.side: list[tuple[float, float]] = []
        """The other link sends (aggregator, surge...): when written, how long to the reply."""
        self.direct = 0
        """Batches written from the session's own step (``RedisQueue.start_batch``)."""
        self.on = False

    def install(self) -> None:
        from gateway.channels.voice import intake as voice_intake
        from gateway.channels.voice import server as voice_server
        from gateway.queueing import batching, link, store
        from gateway.queueing import intake as queue_intake

        hooks = self
        now = time.monotonic

        script_call = voice_intake.IntakeScript.__call__

        async def script(self: Any, session: Any) -> None:
            if not hooks.on:
                return await script_call(self, session)
            rec = {"accept": session.connection.started, "script": now()}
            hooks.calls[session.env.get("agi_uniqueid", "")] = rec
            session.connection._stages = rec  # type: ignore[attr-defined]
            _CALL.set(rec)
            await script_call(self, session)

        voice_intake.IntakeScript.__call__ = script  # type: ignore[method-assign]

        submit = queue_intake.Intake.submit

        async def intake_submit(self: Any, inbound: Any, **kw: Any) -> Any:
            rec = _CALL.get()
            if rec is not None:
                rec["submit"] = now()
            try:
                return await submit(self, inbound, **kw)
            finally:
                if rec is not None:
                    rec["submitted"] = now()

        queue_intake.Intake.submit = intake_submit  # type: ignore[method-assign]

        run = batching.Coalescer._run

        async def batch_run(self: Any, batch: list[Any]) -> None:
            recs = [hooks.calls.get(getattr(getattr(item, "inbound", None), "external_id", ""))
                    for item, _, _ in batch]
            found = [r for r in recs if r is not None]
            t = now()
            for r in found:
                r["batch"] = t
                r["size"] = len(batch)
            if hooks.on:
                hooks.batches.append((t, len(batch)))
            _BATCH.set(found)
            await run(self, batch)
            t = now()
            for r in found:
                r["results"] = t

        batching.Coalescer._run = batch_run  # type: ignore[method-assign]

        send = link.Link.send
        start = link.Link.start
        received = link.Link.data_received

        def link_start(self: Any, payload: bytes, count: int, answer: Any) -> None:
            recs = _BATCH.get()
            t = now()

            def answered(replies: Any, error: Any) -> None:
                t2 = now()
                if recs:
                    for r in recs:
                        r["write"] = t
                        r["reply"] = getattr(self, "_stage_in", t2)
                elif hooks.on:
                    hooks.side.append((t, t2 - t))
                answer(replies, error)

            start(self, payload, count, answered)

        async def link_send(self: Any, payload: bytes, count: int) -> Any:
            recs = _BATCH.get()
            try:
                return await send(self, payload, count)
            finally:
                t2 = now()
                for r in recs or ():
                    r["woke"] = t2  # the batch task resumed

        def link_received(self: Any, data: bytes) -> None:
            self._stage_in = now()
            received(self, data)

        link.Link.start = link_start  # type: ignore[method-assign]
        link.Link.send = link_send  # type: ignore[method-assign]
        link.Link.data_received = link_received  # type: ignore[method-assign]

        # a contact's batch of one, written from the session's own step (no batch task)
        start_batch = store.RedisQueue.start_batch

        def direct(self: Any, batch: list[Any], answer: Any, **kw: Any) -> bool:
            rec = _CALL.get()
            found = [rec] if rec is not None else []
            t = now()

            def answered(results: Any, error: Any) -> None:
                t2 = now()
                for r in found:
                    r["woke"] = t2  # no task to wake: the reply's callback answers
                answer(results, error)
                t3 = now()
                for r in found:
                    r["results"] = t3

            token = _BATCH.set(found)
            try:
                started = start_batch(self, batch, answered, **kw)
            finally:
                _BATCH.reset(token)
            if started:
                for r in found:
                    r["batch"] = t
                    r["size"] = 1
                if hooks.on:
                    hooks.batches.append((t, 1))
                    hooks.direct += 1
            return started

        store.RedisQueue.start_batch = direct  # type: ignore[method-assign]

        set_variables = voice_intake.set_variables

        async def timed_set(channel: Any, variables: Any, *, mset: bool = False) -> None:
            rec = _CALL.get()
            if rec is not None:
                rec["mset"] = now()
            await set_variables(channel, variables, mset=mset)
            if rec is not None:
                rec["mset_done"] = now()

        voice_intake.set_variables = timed_set  # type: ignore[assignment]

        # the written command and its reply: the channel's write, then the buffer's fill
        conn_write = voice_server._Connection.write

        def write(self: Any, data: bytes) -> None:
            rec = getattr(self, "_stages", None)
            if rec is not None and "mset" in rec and "mset_sent" not in rec:
                rec["mset_sent"] = now()
            conn_write(self, data)

        voice_server._Connection.write = write  # type: ignore[method-assign]

        session_run = voice_server.FastAgiServer._run

        async def run_session(self: Any, conn: Any) -> None:
            try:
                await session_run(self, conn)
            finally:
                rec = getattr(conn, "_stages", None)
                if rec is not None:
                    rec["closed"] = now()

        voice_server.FastAgiServer._run = run_session  # type: ignore[method-assign]


def _unslot() -> None:
    """``_Connection`` keeps its attributes in slots; a subclass with a ``__dict__`` takes the
    stage record (the server makes its connections through ``lambda: _Connection(self)``)."""
    from gateway.channels.voice import server as voice_server

    class Conn(voice_server._Connection):
        pass

    voice_server._Connection = Conn  # type: ignore[misc]


class Steps:
    """Each task's steps timed (a task factory wraps every coroutine the loop runs as a task):
    how long one step of a task held the loop, by the task's coroutine. The callbacks that are
    not task steps (protocol callbacks, timers) are not counted."""

    def __init__(self) -> None:
        self.on = False
        self.held: dict[str, list[float]] = {}
        """Coroutine name -> the loop thread's CPU time of each step (seconds)."""

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        steps = self
        import gc

        self.collections: list[tuple[int, float]] = []
        started = [0.0]

        def collected(phase: str, info: dict[str, int]) -> None:
            if not steps.on:
                return
            if phase == "start":
                started[0] = time.perf_counter()
            else:
                steps.collections.append((info["generation"], time.perf_counter() - started[0]))

        gc.callbacks.append(collected)

        class Timed:
            __slots__ = ("coro", "name")

            def __init__(self, coro: Any) -> None:
                self.coro = coro
                self.name = getattr(coro, "__qualname__", type(coro).__name__)
                frame = getattr(coro, "cr_frame", None)
                state = frame.f_locals.get("state") if frame is not None else None
                if self.name == "Supervisor._supervise" and state is not None:
                    self.name = f"loop {state.name} (supervised)"

            def _time(self, method: Any, *args: Any) -> Any:
                if not steps.on:
                    return method(*args)
                t = time.thread_time()
                try:
                    return method(*args)
                finally:
                    steps.held.setdefault(self.name, []).append(time.thread_time() - t)

            def send(self, value: Any) -> Any:
                return self._time(self.coro.send, value)

            def throw(self, *args: Any) -> Any:
                return self._time(self.coro.throw, *args)

            def close(self) -> Any:
                return self.coro.close()

            def __await__(self) -> Any:
                return self

            def __iter__(self) -> Any:
                return self

            def __next__(self) -> Any:
                return self.send(None)

        import collections.abc

        collections.abc.Coroutine.register(Timed)

        def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
            return asyncio.Task(Timed(coro), loop=loop, **kw)

        loop.set_task_factory(factory)

    def report(self) -> None:
        for generation in (0, 1, 2):
            ms = [t * 1000 for g, t in self.collections if g == generation]
            if ms:
                print(f"garbage collections of generation {generation}: {len(ms)}, "
                      f"p50 {pct(ms, 0.5):.2f} ms, max {max(ms):.2f} ms")
        rows = []
        for name, held in self.held.items():
            rows.append((sum(held), name, held))
        rows.sort(reverse=True)
        print("the loop held by task steps (the loop thread's CPU a step), by coroutine:")
        print(f"{'steps':>9} {'total ms':>9} {'p99 ms':>7} {'max ms':>7} {'>0.5ms':>6} "
              f"{'>1ms':>5} {'>2ms':>5}  coroutine")
        for total, name, held in rows[:14]:
            ms = [h * 1000 for h in held]
            print(f"{len(ms):9d} {total * 1000:9.1f} {pct(ms, 0.99):7.2f} {max(ms):7.2f} "
                  f"{sum(m > 0.5 for m in ms):6d} {sum(m > 1 for m in ms):5d} "
                  f"{sum(m > 2 for m in ms):5d}  {name[:60]}")


def stages(rec: dict[str, float], client: float) -> dict[str, float] | None:
    need = ("accept", "script", "submit", "batch", "write", "reply", "woke", "results",
            "submitted", "mset", "mset_sent", "mset_done", "closed")
    if any(k not in rec for k in need):
        return None
    ms = 1000.0
    inside = rec["closed"] - rec["accept"]
    return {
        "outside": (client - inside) * ms,
        "header": (rec["script"] - rec["accept"]) * ms,
        "prepare": (rec["submit"] - rec["script"]) * ms,
        "to batch": (rec["batch"] - rec["submit"]) * ms,
        "encode": (rec["write"] - rec["batch"]) * ms,
        "valkey": (rec["reply"] - rec["write"]) * ms,
        "wake": (rec["woke"] - rec["reply"]) * ms,
        "answer": (rec["submitted"] - rec["woke"]) * ms,
        "mset": (rec["mset_sent"] - rec["submitted"]) * ms,
        "mset rtt": (rec["mset_done"] - rec["mset_sent"]) * ms,
        "close": (rec["closed"] - rec["mset_done"]) * ms,
        "total": client * ms,
    }


def schedstat(pid: int | str) -> tuple[int, int]:
    """The process's time on a CPU and waiting on a run queue for one (ns, all its threads;
    ``/proc/<pid>/task/*/schedstat``): the wait is the time it was ready and not run."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(rows: list[tuple[float, dict[str, float]]], hooks: Hooks) -> None:
    cols = [*STAGES, "total"]
    print(f"{len(rows)} calls timed; ms per stage:")
    print(f"{'':>12} " + " ".join(f"{c:>9}" for c in cols))
    for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
        print(f"{label:>12} " + " ".join(
            f"{pct([r[c] for _, r in rows], q):9.2f}" for c in cols))
    ordered = sorted(rows, key=lambda x: x[1]["total"])
    slow = ordered[int(0.99 * len(ordered)):]
    typical = ordered[: len(ordered) // 2]
    for label, part in (("mean, all", rows), ("mean, p50-", typical), ("mean, 1 % slow", slow)):
        print(f"{label:>12} " + " ".join(
            f"{statistics.fmean(r[c] for _, r in part):9.2f}" for c in cols))
    # bunched in time? slow calls whose accepts fall within 20 ms of each other
    times = sorted(t for t, _ in slow)
    groups: list[list[float]] = []
    for t in times:
        if groups and t - groups[-1][-1] < 0.02:
            groups[-1].append(t)
        else:
            groups.append([t])
    print(f"the {len(slow)} slowest calls (total over {slow[0][1]['total']:.2f} ms) came in "
          f"{len(groups)} bunches (accepts within 20 ms): sizes "
          f"{sorted((len(g) for g in groups), reverse=True)[:15]}")
    sizes = [n for _, n in hooks.batches]
    if sizes:
        print(f"batches: {len(sizes)}, contacts a batch mean {statistics.fmean(sizes):.2f}, "
              f"max {max(sizes)}; calls in a batch of more than one: "
              f"{sum(n for n in sizes if n > 1)} of {sum(sizes)}; written from the "
              f"session's own step (no batch task): {hooks.direct}")
    if hooks.side:
        rtts = [d * 1000 for _, d in hooks.side]
        print(f"other sends on the links (aggregator, surge...): {len(rtts)}, round trip p50 "
              f"{pct(rtts, 0.5):.2f} ms p99 {pct(rtts, 0.99):.2f} ms")
        lo = min(t for t, _ in slow)
        near = sum(1 for t, d in hooks.side
                   if any(t - 0.002 <= a <= t + d for a, _ in slow)) if lo else 0
        print(f"  of them in flight within 2 ms before a slow call's accept or during it: {near}")


async def per_batch(gateway: Any, rounds: int) -> None:
    """``--per-batch``: the gateway's CPU (its loop thread's) for one batch of 1 and of 8 voice
    contacts written by ``write_batch`` (prepared first), and for one contact through the
    script's whole ``submit`` (admission, Intake, the coalescer's task), each awaited alone
    on an otherwise idle gateway: the fixed cost a batch pays against the cost a contact."""
    from bench.voice_bench import HEADER
    from gateway.channels.voice.agi import parse_header_block
    from gateway.channels.voice.intake import build_inbound
    from gateway.contact.clock import SYSTEM_CLOCK

    script = gateway.adapters["mset"].intake
    serial = [int(time.time() * 1000) % 10**6 * 100_000]

    def inbound() -> Any:
        serial[0] += 1
        text = HEADER.format(run="pb", n=serial[0], caller=serial[0] % 10**7)
        env = parse_header_block(text.encode()[:-2])
        return build_inbound(env, adapter="mset", received_at=SYSTEM_CLOCK.now_us(),
                             config=script.config)

    best: dict[str, float] = {}
    for _ in range(rounds):
        for label, n in (("PING on the side link", -1), ("write_batch, 1 contact", 1),
                         ("write_batch, 8 contacts", 8), ("submit, 1 contact", 0)):
            cpu = []
            for _ in range(300):
                items = [inbound() for _ in range(max(1, n))]
                prepared = [gateway.intake.prepare(i) for i in items] if n > 0 else []
                await asyncio.sleep(0.0005)
                t = time.thread_time()
                if n < 0:
                    await gateway.queue.execute([["PING"]])
                elif n:
                    await gateway.queue.write_batch(prepared, limited=True)
                else:
                    await script.intake.submit(items[0])
                cpu.append(time.thread_time() - t)
            best[label] = min(best.get(label, 1e9), statistics.median(cpu) * 1e6)
    for label, us in best.items():
        print(f"{label:<26} {us:6.1f} us of CPU (median of 300, best of {rounds} rounds)")


async def main(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from bench.voice_bench import FIRST_CALLER, drive, logging_off, settle_gc
    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.runtime import Gateway
    from tests.harness import settings_for

    logging_off()
    hooks = Hooks()
    _unslot()
    hooks.install()
    steps = Steps()
    if args.holds:
        steps.install(asyncio.get_running_loop())
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", appendfsync=args.appendfsync)
        await server.start()
        settings, configs = settings_for(
            Path(tmp) / "gw", server.url, "bench",
            adapters={"mset": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                               "set_with": "mset"}},
            sla={"voice_answer": "1h"},
        )
        gateway = Gateway(settings, configs, clock=SYSTEM_CLOCK)
        await gateway.start()
        settle_gc(args)
        valkey = aioredis.Redis.from_url(server.url)
        probe: Any = None
        try:
            if args.per_batch:
                await per_batch(gateway, args.rounds)
                return
            port = gateway.adapters["mset"].port  # type: ignore[attr-defined]
            FIRST_CALLER[0] = int(time.time()) % 10**6
            ns = argparse.Namespace(concurrency=args.closed or 100, rate=args.rate,
                                    duration=args.seconds)
            kind = "closed" if args.closed else "open"
            await drive(port, "warm", kind, ns)
            await asyncio.sleep(1)
            await valkey.config_set("latency-monitor-threshold", 1)
            await valkey.config_set("slowlog-log-slower-than", 1000)
            await valkey.execute_command("LATENCY", "RESET")
            await valkey.slowlog_reset()
            await valkey.config_resetstat()
            rows: list[tuple[float, dict[str, float]]] = []
            for r in range(args.rounds):
                hooks.calls.clear()
                hooks.on = steps.on = True
                if args.lag:
                    from bench.loop_lag import LagProbe

                    probe = LagProbe()
                    probe.start()
                run = f"s{int(time.time())}r{r}"
                pids = {"gateway": "self", "Valkey": server.process.pid if server.process else 0}
                sched0 = {name: schedstat(pid) for name, pid in pids.items() if pid}
                rewrite = args.rewrite and r % 2 == 1
                if rewrite:  # an append-only file rewrite (a fork, a child writing) under way
                    await valkey.execute_command("BGREWRITEAOF")
                result = await drive(port, run, kind, ns)
                sched1 = {name: schedstat(pid) for name, pid in pids.items() if pid}
                if probe is not None:
                    from bench.loop_lag import print_report

                    print_report(await probe.stop(), probe.stall_ms)
                    probe = None
                hooks.on = steps.on = False
                lat = result["latencies"]
                print(f"round {r}{' (BGREWRITEAOF at its start)' if rewrite else ''}: "
                      f"{result['sessions']} calls in {result['seconds']:.2f} s, "
                      f"caller's p50 {pct(lat, 0.5) * 1000:.2f} ms p99 "
                      f"{pct(lat, 0.99) * 1000:.2f} ms, server CPU "
                      f"{result['server_cpu'] / max(1, result['sessions']) * 1e6:.0f} us a call",
                      flush=True)
                calls = max(1, result["sessions"])
                print("  on a CPU / ready and waiting for one, us a call: " + ", ".join(
                    f"{name} {(sched1[name][0] - sched0[name][0]) / calls / 1000:.0f} / "
                    f"{(sched1[name][1] - sched0[name][1]) / calls / 1000:.0f}"
                    for name in sched0))
                for n, client in enumerate(lat):
                    rec = hooks.calls.get(f"{run}.{n}")
                    cut = stages(rec, client) if rec is not None else None
                    if cut is not None:
                        rows.append((rec["accept"], cut))  # type: ignore[index]
                await asyncio.sleep(0.5)
            report(rows, hooks)
            if args.holds:
                steps.report()
            latest = await valkey.execute_command("LATENCY", "LATEST")
            print("Valkey LATENCY LATEST (event, time, latest ms, max ms, [sum, count]):")
            for event in latest:
                print("   ", [x.decode() if isinstance(x, bytes) else x for x in event])
                history = await valkey.execute_command("LATENCY", "HISTORY", event[0])
                spikes = sorted((int(ms) for _, ms in history), reverse=True)
                print(f"      {len(history)} seconds with a spike; largest {spikes[:12]}")
            slow = await valkey.slowlog_get(64)
            print(f"Valkey slow log over 1 ms: {len(slow)} entries: " + json.dumps(
                [(e["duration"], (e["command"].decode(errors="replace")
                                  if isinstance(e["command"], bytes)
                                  else str(e["command"]))[:40]) for e in slow[:12]]))
            stats = await valkey.info("commandstats")
            top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:10]
            print("Valkey commandstats (calls, usec, usec a call):")
            for name, s in top:
                print(f"    {name:<28} {s['calls']:>8} {s['usec']:>10} {s['usec_per_call']:8.2f}")
            persistence = await valkey.info("persistence")
            print("Valkey AOF: " + ", ".join(
                f"{k}={persistence.get(k)}" for k in (
                    "aof_rewrites", "aof_last_write_status", "aof_delayed_fsync",
                    "aof_current_size")))
        finally:
            await valkey.aclose()
            await gateway.stop()
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lag", action="store_true", help="the loop-lag probe as well")
    parser.add_argument("--no-settle", action="store_true")
    parser.add_argument("--dir", default="", help="the data folder's parent (Valkey's "
                        "append-only file): /dev/shm takes the disk out of the picture")
    parser.add_argument("--appendfsync", default="always")
    parser.add_argument("--per-batch", action="store_true",
                        help="only the CPU of one batch of 1 and of 8 contacts, and of one "
                             "contact's whole submit, on an idle gateway")
    parser.add_argument("--closed", type=int, default=0, metavar="N",
                        help="N callers back to back instead of the paced rate (the closed "
                             "loop voice_bench's ratio is measured in)")
    parser.add_argument("--rewrite", action="store_true",
                        help="every other round starts with BGREWRITEAOF (how much a rewrite "
                             "under way moves the tail)")
    parser.add_argument("--holds", action="store_true",
                        help="time every task step (how long each kind holds the loop)")
    import uvloop

    uvloop.run(main(parser.parse_args()))
