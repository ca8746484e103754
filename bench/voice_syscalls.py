"""What one paced FastAGI call costs the serving process in system calls, loop turns and
wake-ups: the bare asyncio server, the FastAGI layer alone and the whole gateway (``mset``).

    .venv/bin/python -m bench.voice_syscalls --rate 300 --seconds 3 [--before DIR]

Counts, unlike times, hardly move with the machine's load, so this compares small changes to
the call path on a shared machine. The servers run as ``bench/voice_bench.py``'s (``--serve``
children, one per tree; the bare server in a child of its own), ``voice_bench``'s callers
paced in another child. Each target is driven twice:

- without tracing: the serving process's wake-ups a call (times it was put on a CPU, all its
  threads: ``/proc/<pid>/task/*/schedstat``), its voluntary and involuntary context switches,
  its CPU a call; for the gateway also its Valkey's wake-ups and CPU a call;
- under ``strace -c -f`` (slower: ptrace stops at every system call): the system calls a
  call by name. ``epoll_wait``/``epoll_pwait`` is one a turn of uvloop's loop.

Each run's counts are taken less what the process does idle for as long (measured right
after it: the gateway's background loops), unless ``--no-idle``. At low rates (``--rate
50``) every call runs alone, so the counts are the lone call's path; at higher rates calls
overlap, and how many share a loop turn or a batch depends on how fast the process runs
(under strace, much slower): read those against each other within one run only.

A gateway run counts until its dashboard aggregator has read the run's events (its work is
part of a call's cost, as in ``voice_bench``). At paced rates every call is a batch of its
own. ``--before DIR`` (``git archive <commit> | tar -x -C DIR``) runs an older tree's layer
and gateway in the same alternating rounds; the fewest of ``--rounds`` is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.procs import children, cpu_s, is_valkey  # noqa: E402
from bench.voice_bench import FIRST_CALLER, Servers, drive, logging_off  # noqa: E402


def wakeups(pid: int) -> tuple[int, int, int]:
    """Times the process's threads were put on a CPU, and its voluntary and involuntary
    context switches, all threads."""
    runs = vol = invol = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            runs += int((task / "schedstat").read_text().split()[2])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    vol += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    invol += int(line.split()[1])
        except OSError:
            continue
    return runs, vol, invol


_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:(\d+)\s+)?(\w+)\s*$")


def strace_counts(path: Path) -> dict[str, int]:
    """``strace -c``'s table: system call -> calls."""
    counts: dict[str, int] = {}
    for row in path.read_text().splitlines():
        m = _ROW.match(row)
        if m and m.group(3) != "total":
            counts[m.group(3)] = int(m.group(1))
    return counts


class Bare:
    """The bare asyncio server of ``voice_bench`` in a child of its own."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--bare", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        assert self.proc.stdout is not None
        self.port = int((await self.proc.stdout.readline()).decode())

    async def ask(self, command: str) -> None:
        pass

    async def stop(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            await self.proc.wait()


async def bare_child() -> None:
    from bench.voice_bench import bare_server

    server = await bare_server()
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


async def measure(
    pid: int, port: int, run: str, args: argparse.Namespace, settle: Any, trace: bool,
    valkey: int = 0,
) -> dict[str, float]:
    """A paced run's counts a call, less what the process does idle for as long (its
    background loops: the deadline watcher's ticks, the admission probe, leases...)."""
    busy, seconds, calls = await _counts(pid, port, run, args, settle, trace, valkey)
    if args.no_idle:
        return {k: v / calls for k, v in busy.items()}
    idle, idle_s, _ = await _counts(pid, 0, run, args, None, trace, valkey)
    return {k: (v - idle.get(k, 0.0) * seconds / idle_s) / calls for k, v in busy.items()}


async def _counts(
    pid: int, port: int, run: str, args: argparse.Namespace, settle: Any, trace: bool,
    valkey: int = 0,
) -> tuple[dict[str, float], float, int]:
    """Totals over one run (``port`` 0: as long, with no calls), its seconds and calls."""
    ns = argparse.Namespace(concurrency=100, rate=args.rate, duration=args.seconds)
    out: dict[str, float] = {}
    tracer = None
    with tempfile.NamedTemporaryFile(prefix="agi-strace-", suffix=".txt") as f:
        if trace:
            tracer = await asyncio.create_subprocess_exec(
                "strace", "-c", "-f", "-p", str(pid), "-o", f.name,
                stderr=asyncio.subprocess.DEVNULL)
            await asyncio.sleep(0.5)  # attached to every thread
        w0, c0 = wakeups(pid), cpu_s(pid)
        v0 = (wakeups(valkey), cpu_s(valkey)) if valkey else None
        started = time.monotonic()
        if port:
            result = await drive(port, run, "open", ns)
            calls = max(1, result["sessions"])
        else:
            await asyncio.sleep(args.seconds + 0.3)
            calls = 1
        if settle is not None:
            await settle()
        seconds = time.monotonic() - started
        w1, c1 = wakeups(pid), cpu_s(pid)
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)
            await tracer.wait()
            for name, count in strace_counts(Path(f.name)).items():
                out[f"sys:{name}"] = count
        else:
            out["wakeups"] = w1[0] - w0[0]
            out["voluntary"] = w1[1] - w0[1]
            out["involuntary"] = w1[2] - w0[2]
            out["cpu_us"] = (c1 - c0) * 1e6
            if v0 is not None:
                v1 = (wakeups(valkey), cpu_s(valkey))
                out["valkey_wakeups"] = v1[0][0] - v0[0][0]
                out["valkey_cpu_us"] = (v1[1] - v0[1]) * 1e6
    return out, seconds, calls


async def main(args: argparse.Namespace) -> None:
    logging_off()
    bare = Bare()
    await bare.start()
    trees = [Servers("now", "")]
    if args.before:
        trees.append(Servers("before", args.before))
    for servers in trees:
        await servers.start()
    FIRST_CALLER[0] = int.from_bytes(os.urandom(2), "big") * 100
    try:
        targets: list[tuple[str, int, int, Any, int]] = []
        assert bare.proc is not None
        targets.append(("bare asyncio server", bare.proc.pid, bare.port, None, 0))
        for servers in trees:
            assert servers.proc is not None
            pid = servers.proc.pid
            valkey = next((c for c in children(pid) if is_valkey(c)), 0)
            tag = f", {servers.label}" if len(trees) > 1 else ""

            async def settle(s: Servers = servers) -> None:
                await s.ask("settle")

            targets.append((f"FastAGI layer (mset{tag})", pid, servers.ports["mset"]["layer"],
                            None, 0))
            targets.append((f"gateway (mset{tag})", pid, servers.ports["mset"]["gateway"],
                            settle, valkey))
        # a warm-up call each, then the rounds
        for label, pid, port, settle, _ in targets:
            await measure(pid, port, f"w{label[:3]}", argparse.Namespace(
                rate=args.rate, seconds=0.5, no_idle=True), settle, False)
        best: dict[tuple[str, bool], dict[str, float]] = {}
        for r in range(args.rounds):
            for trace in (False, True) if not args.no_strace else (False,):
                for n, (label, pid, port, settle, valkey) in enumerate(targets):
                    got = await measure(pid, port, f"r{r}{int(trace)}t{n}", args, settle, trace,
                                        valkey)
                    key = (label, trace)
                    old = best.get(key)
                    if old is None:
                        best[key] = got
                    else:  # the fewest of the rounds, each count on its own
                        for k, v in got.items():
                            old[k] = min(old.get(k, v), v)
        print(f"voice_syscalls: paced at {args.rate:g} calls/s, {args.seconds:g} s a run, "
              f"fewest of {args.rounds} rounds; a call's:")
        for label, *_ in targets:
            plain = best[(label, False)]
            line = (f"{label:<28} wake-ups {plain['wakeups']:5.2f} (voluntary "
                    f"{plain['voluntary']:5.2f}, involuntary {plain['involuntary']:5.2f}), "
                    f"CPU {plain['cpu_us']:6.0f} us")
            if "valkey_wakeups" in plain:
                line += (f"; its Valkey: wake-ups {plain['valkey_wakeups']:5.2f}, CPU "
                         f"{plain['valkey_cpu_us']:4.0f} us")
            print(line)
            traced = best.get((label, True))
            if traced:
                total = sum(v for k, v in traced.items() if k.startswith("sys:"))
                rows = sorted(((v, k[4:]) for k, v in traced.items() if k.startswith("sys:")),
                              reverse=True)
                print(f"{'':<28} system calls {total:5.2f}: " + ", ".join(
                    f"{name} {v:.2f}" for v, name in rows if v >= 0.01))
    finally:
        for servers in trees:
            await servers.stop()
        await bare.stop()


if __name__ == "__main__":
    if "--bare" in sys.argv:
        import uvloop

        uvloop.run(bare_child())
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", default="", metavar="DIR",
                        help="an older tree (git archive <commit> | tar -x -C DIR) as well")
    parser.add_argument("--no-strace", action="store_true",
                        help="only the wake-ups and CPU (no strace run)")
    parser.add_argument("--no-idle", action="store_true",
                        help="do not take off what each process does idle for as long")
    import uvloop

    uvloop.run(main(parser.parse_args()))
