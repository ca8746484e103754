"""FastAGI's aim in instructions (callgrind): the whole gateway's work per session against the
FastAGI layer's alone, a ratio the machine's load does not move.

Issue 16's aim is the whole gateway at 0.8 of the FastAGI layer alone in sessions per server
core. ``bench/voice_bench.py`` reads it from CPU time, and on the shared 2-core machine the
ratio moved by up to a fifth between runs of the same code (ninth session: 0.77 and 0.90 with
``SET VARIABLE``, 0.70 and 0.56 with MSet). This bench runs the same two servers under
valgrind's callgrind, as ``bench/gateway_cost.py`` runs the intake servers:

- ``layer``: ``voice_bench``'s FastAGI layer alone (our server and intake script with an
  in-memory Intake), both modes, in a process of its own;
- ``gateway``: ``voice_bench --serve``'s whole gateway (Redis intake into its own embedded
  Valkey, the dashboard's aggregator), both modes, in another;

each with its heap settled as ``gateway serve`` settles it, and its instrumentation switched on
only once it has started and taken a warm-up. For each server and mode (``--set-with``: five
``SET VARIABLE`` one after the other, or one ``EXEC MSet``; both by default) ``voice_bench``'s
callers (a process of their own; connect, the AGI header block, the intake, the five variables,
close) run ``--concurrency`` calls at a time for ``--seconds``, and the server process's
user-space instructions are counted (the interpreter, uvloop, hiredis...; not the kernel's side
of its system calls). The rate of the work a server does with no calls (its timers: the
gateway's leases and probes, the aggregator's polls; counted ``IDLE_S`` before each run) is
taken off for the run's length, and a gateway run is counted on for ``TAIL_S`` and until the
aggregator has read the run's events (its work is part of a contact's cost). Printed per
session: the layer's instructions, the gateway's (and the contacts an ``EVALSHA``, the intake
batches' size), their ratio ``layer / gateway`` (the sessions per core the aim reads: 0.8) and
what the gateway adds (``gateway - layer``).

    .venv/bin/python -m bench.voice_cost --rounds 2                   # about 3-3.5 minutes
    .venv/bin/python -m bench.voice_cost --before DIR --rounds 2      # about 5 minutes

``--before DIR``: a source tree holding an older ``gateway`` package (``git archive <commit>
| tar -x -C DIR``), its gateway measured the same way in a process of its own (with its own
Valkey), in alternating rounds. As in ``gateway_cost``, the gateways run without the deadline
watcher (no deadline falls due in a run of seconds: it only ticks) and with a 60 s write
timeout (nothing spooled for a write that only looks slow under valgrind). Under callgrind a
server runs 30-60 times slower than Valkey answers, so every contact is written as a batch of
its own (0.9 contacts an ``EVALSHA``, the aggregator's polls counted in, at 16 callers as at
100): the regime of paced calls, not the real bench's peak (3-4 contacts an ``EVALSHA``), where
a batch's fixed cost is shared. A round's figure for the same code moves by up to ~2 % (the
layer's by ~1.5 %; one gateway ``set_variable`` round of eight came out 5 % under the others),
the ratio by ±0.02: read a difference in the ratio under ~0.03 as none. Needs ``valgrind``
(callgrind) on the path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import voice_bench  # noqa: E402
from bench.gateway_cost import IDLE_S, TAIL_S, _callgrind, _dump  # noqa: E402

MODES = ("set_variable", "mset")


# ------------------------------------------------------------------ servers (under valgrind)


async def _layer() -> None:
    """The layer alone, both modes, speaking ``voice_bench --serve``'s protocol: one JSON line
    of ports, then an answer a command line until ``quit``."""
    voice_bench.logging_off()
    layers = {mode: await voice_bench.protocol_only_server(mode) for mode in MODES}
    voice_bench.settle_gc(argparse.Namespace(no_settle=False))
    print(json.dumps({"ports": {mode: {"layer": server.port}
                                for mode, server in layers.items()}}), flush=True)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() not in ("quit", ""):
        print("{}", flush=True)
    for server in layers.values():
        await server.stop()


def child(what: str, tree: str) -> None:
    """The server process (run under valgrind): the layer alone, or ``voice_bench``'s
    ``--serve`` gateway of this tree (``tree`` empty) or of ``tree``."""
    if tree:  # its gateway package first on the path, its adapter plugins off
        sys.path.insert(0, tree)
        from bench.intake_bench import without_plugins

        without_plugins()
    if what == "layer":
        voice_bench._runner()(_layer())
        return
    # no deadline watcher (in a run of seconds no deadline falls due: it only ticks, idle work
    # counted and taken off) and no spooling for a write that only looks slow under valgrind
    voice_bench.SETTINGS.update({
        "redis": {"write_timeout": "60s"},
        "watcher": {"enabled": False},
    })
    voice_bench._runner()(voice_bench.serve(argparse.Namespace(no_settle=False, pin=False)))


class Counted(voice_bench.Servers):
    """A server process under callgrind, its instrumentation off until ``measure``."""

    def __init__(self, label: str, what: str, tree: str, folder: Path) -> None:
        super().__init__(label, tree)
        self.what = what
        self.folder = folder / label
        self.folder.mkdir()
        self.pid = 0

    async def start(self) -> None:
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.voice_cost import child; "
                "child(*sys.argv[2:])")
        with open(self.folder / "valgrind.log", "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                "valgrind", "--tool=callgrind", "--instr-atstart=no",
                f"--callgrind-out-file={self.folder}/callgrind.out.%p",
                sys.executable, "-c", code, str(ROOT), self.what, self.tree,
                cwd=ROOT, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        self.pid = self.proc.pid
        try:
            self.ports = (await asyncio.wait_for(self._read(), 600))["ports"]
        except (TimeoutError, RuntimeError):
            tail = (self.folder / "valgrind.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.label} did not start:\n{tail}") from None


# ------------------------------------------------------------------ counting (this process)


async def measure(
    server: Counted, mode: str, run: str, args: argparse.Namespace
) -> dict[str, Any]:
    """One run of callers against ``server``'s ``mode``: instructions a session (the idle rate
    taken off), sessions, contacts an ``EVALSHA`` (gateways) and the share taken off."""
    gateway = server.what == "gateway"
    folder = str(server.folder)
    _callgrind(server.pid, "-i", "on")
    _callgrind(server.pid, "-z")
    started = time.monotonic()
    await asyncio.sleep(IDLE_S)
    idle = _dump(server.pid, folder) / (time.monotonic() - started)
    valkey0 = (await server.ask("valkey"))["valkey"] if gateway else {}
    _callgrind(server.pid, "-z")
    started = time.monotonic()
    callers = argparse.Namespace(concurrency=args.concurrency, rate=0.0, duration=args.seconds)
    result = await voice_bench.drive(server.ports[mode][server.what], run, "closed", callers)
    if gateway:
        await asyncio.sleep(TAIL_S)
        await server.ask("settle")  # the aggregator has read the run's events
    instructions = _dump(server.pid, folder)
    taken = idle * (time.monotonic() - started)
    _callgrind(server.pid, "-i", "off")
    sessions = max(1, result["sessions"])
    figure = {"per": (instructions - taken) / sessions, "sessions": result["sessions"],
              "idle": taken / max(1, instructions)}
    if gateway:
        valkey1 = (await server.ask("valkey"))["valkey"]
        scripts = valkey1["scripts"] - valkey0["scripts"]
        figure["batch"] = (valkey1["contacts"] - valkey0["contacts"]) / max(1, scripts)
    return figure


async def main(args: argparse.Namespace) -> None:
    started = time.monotonic()
    modes = MODES if args.set_with == "both" else (args.set_with,)
    folder = Path(tempfile.mkdtemp(prefix="voice-cost-"))
    # with --before, this tree loaded the same way as the older one (its modules from the
    # tree's folder, the adapter plugins of this environment off), so that only the trees differ
    now = str(ROOT) if args.before else ""
    servers = [Counted("layer", "layer", now, folder), Counted("gateway", "gateway", now, folder)]
    if args.before:
        servers.append(Counted("gateway-before", "gateway", args.before, folder))
    figures: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        await asyncio.gather(*(server.start() for server in servers))
        print(f"servers up under callgrind in {time.monotonic() - started:.0f} s", flush=True)
        run = str(int(time.time()))
        warm = argparse.Namespace(concurrency=args.concurrency, rate=0.0, duration=2.0)
        for server in servers:  # warm-up, not counted (instrumentation off)
            for mode in modes:
                await voice_bench.drive(server.ports[mode][server.what], f"{run}w", "closed", warm)
        for r in range(args.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for server in order:
                for mode in modes:
                    figure = await measure(server, mode, f"{run}{r}{server.label}{mode}", args)
                    figures.setdefault((server.label, mode), []).append(figure)
                    print(f"round {r + 1} {server.label:14} {mode:12} {said(figure)}", flush=True)
    finally:
        for server in servers:
            await server.stop()
        shutil.rmtree(folder, ignore_errors=True)
    report(figures, modes, args.rounds, bool(args.before))
    print(f"\nvoice_cost took {time.monotonic() - started:.0f} s")


def said(figure: dict[str, Any]) -> str:
    batch = f", {figure['batch']:.1f} contacts an EVALSHA" if "batch" in figure else ""
    return (f"{figure['per'] / 1000:8.1f} K instructions a session ({figure['sessions']} "
            f"sessions{batch}; idle work taken off: {figure['idle']:.1%})")


def report(
    figures: dict[tuple[str, str], list[dict[str, Any]]],
    modes: tuple[str, ...],
    rounds: int,
    before: bool,
) -> None:
    def per(label: str, mode: str) -> list[float]:
        return [figure["per"] for figure in figures[(label, mode)]]

    print()
    for mode in modes:  # each round's ratio, the spread the least-of-rounds figures hide
        ratios = [lay / whole for lay, whole in zip(per("layer", mode), per("gateway", mode),
                                                   strict=True)]
        print(f"{mode}: layer / gateway by round: " + ", ".join(f"{x:.3f}" for x in ratios))
    print()
    print(f"| mode | layer | gateway | layer / gateway (aim >= 0.8) | gateway adds |"
          f"{' gateway before | after / before |' if before else ''}")
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if before else ""))
    for mode in modes:
        layer, whole = min(per("layer", mode)), min(per("gateway", mode))
        row = (f"| {mode} | {layer / 1000:.1f} K | {whole / 1000:.1f} K | {layer / whole:.3f} | "
               f"{(whole - layer) / 1000:.1f} K |")
        if before:
            old = min(per("gateway-before", mode))
            row += f" {old / 1000:.1f} K | {whole / old:.3f} |"
        print(row)
    print(f"(instructions a session, the least of {rounds} round{'s' if rounds > 1 else ''})")


if __name__ == "__main__":
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("voice_cost: needs valgrind (callgrind) on the path")
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--set-with", choices=("both", *MODES), default="both")
    parser.add_argument("--before", default="", metavar="DIR",
                        help="source tree of an older gateway")
    voice_bench._runner()(main(parser.parse_args()))
