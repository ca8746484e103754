"""``gateway serve --workers N``: CPU per contact and throughput from 1 to N workers.

    .venv/bin/python -m bench.workers_bench [--max-workers 2] [--seconds 5] [--rounds 2]

Every setup is a real ``gateway serve`` (its own data folder and embedded Valkey with
``appendfsync always``, the per-sender limit off) started once; then in alternating rounds each
is loaded for ``--seconds`` by ``bench.loadgen`` (POST /v1/intake, 64 keep-alive connections,
the intake bench's Chinese text) in a process of its own pinned (``sched_setaffinity``, as
``taskset``) to the last core. Measured per round from ``/proc/<pid>/stat`` (every thread):
the CPU of the gateway's processes (parent and workers) and of its Valkey per acknowledged
contact; printed is the best round of each. Setups: ``--workers 1`` .. ``--max-workers``
unpinned, and ``--workers 1`` with the gateway and its Valkey pinned to core 0 (``taskset -c
0``), so the load generator has the other core: the throughput of one core. Ratios are to
``--workers 1`` of the same run; the load average is printed, because the machine is shared.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.intake_bench import body
from bench.loadgen import build_request, run_load
from bench.procs import HOST, children, cpu_s, free_port, is_valkey


@dataclass
class Setup:
    label: str
    workers: int
    pin: str = ""
    """``taskset -c`` list for the gateway and its Valkey ('' = any core)."""
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    def start(self, root: Path) -> None:
        self.port = free_port()
        folder = root / self.label
        folder.mkdir()
        cfg = folder / "gateway.toml"
        cfg.write_text(
            f'[gateway]\ndata_dir = "{folder / "var"}"\nworkers = {self.workers}\n'
            f'log_level = "WARNING"\n[http]\nlisten = "{HOST}:{self.port}"\n'
            "[api]\nopen_to_loopback = true\n[limits]\nsender_contacts = 0\n"
        )
        argv = [sys.executable, "-m", "gateway", "serve", "-c", str(cfg)]
        if self.pin:
            argv = ["taskset", "-c", self.pin, *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # taskset execs the gateway: the same pid

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/readyz", timeout=2) as resp:
                ok = resp.status == 200
        except OSError:
            return False
        kids = [p for p in children(self.pid) if not is_valkey(p)]
        return ok and (self.workers == 1 or len(kids) == self.workers)

    def cpu(self) -> tuple[float, float]:
        """(gateway processes, Valkey) CPU seconds so far."""
        gateway, valkey = cpu_s(self.pid), 0.0
        for child in children(self.pid):
            if is_valkey(child):
                valkey += cpu_s(child)
            else:
                gateway += cpu_s(child)
        return gateway, valkey

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _load(port: int, seconds: float, offset: int, cpu: int, out: Any) -> None:
    """The load generator's process, pinned to ``cpu``."""
    os.sched_setaffinity(0, {cpu})
    import uvloop

    headers = {"Content-Type": "application/json"}
    result = uvloop.run(
        run_load(
            HOST,
            port,
            lambda i: build_request(HOST, port, "POST", "/v1/intake", body(offset + i), headers),
            connections=64,
            seconds=seconds,
            expect=202,
        )
    )
    out.put((result.ok, result.errors, result.seconds, result.percentile_ms(0.99)))


def load(port: int, seconds: float, offset: int, cpu: int) -> tuple[int, int, float, float]:
    out: Any = multiprocessing.Queue()
    process = multiprocessing.Process(target=_load, args=(port, seconds, offset, cpu, out))
    process.start()
    result = out.get(timeout=seconds + 120)
    process.join(30)
    return result  # type: ignore[no-any-return]


def main(max_workers: int, seconds: float, rounds: int) -> None:
    cores = sorted(os.sched_getaffinity(0))
    loadgen_cpu = cores[-1]
    setups = [Setup(f"workers-{n}", n) for n in range(1, max_workers + 1)]
    if len(cores) >= 2:
        setups.append(Setup("workers-1-pinned", 1, pin=str(cores[0])))
    root = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    print(f"cores {len(cores)}, load generator on core {loadgen_cpu}, load average "
          f"{os.getloadavg()[0]:.1f} at start", flush=True)
    try:
        for setup in setups:
            setup.start(root)
        for setup in setups:
            deadline = time.monotonic() + 180
            while not setup.ready():
                if time.monotonic() > deadline:
                    raise SystemExit(f"{setup.label} did not start")
                time.sleep(0.2)
        offset = 0
        for setup in setups:  # warm up every setup once (first requests, JIT of caches)
            load(setup.port, 1.0, offset, loadgen_cpu)
            offset += 1_000_000
        for r in range(rounds):
            for setup in setups:
                g0, v0 = setup.cpu()
                ok, errors, took, p99 = load(setup.port, seconds, offset, loadgen_cpu)
                g1, v1 = setup.cpu()
                offset += 1_000_000
                setup.rounds.append(
                    {
                        "rate": ok / took,
                        "errors": errors,
                        "gateway_us": (g1 - g0) / max(ok, 1) * 1e6,
                        "valkey_us": (v1 - v0) / max(ok, 1) * 1e6,
                        "p99": p99,
                        "load": os.getloadavg()[0],
                    }
                )
                print(f"round {r + 1} {setup.label:17} {ok / took:7.0f}/s  gateway "
                      f"{setup.rounds[-1]['gateway_us']:5.0f} µs  valkey "
                      f"{setup.rounds[-1]['valkey_us']:4.0f} µs/contact  p99 {p99:6.1f} ms  "
                      f"errors {errors}", flush=True)
    finally:
        for setup in setups:
            setup.stop()
        shutil.rmtree(root, ignore_errors=True)
    base = max(setups[0].rounds, key=lambda x: x["rate"])
    print(f"\nbest round of each (load average {os.getloadavg()[0]:.1f} at the end):")
    print("| setup | contacts/s | vs 1 worker | gateway CPU µs/contact | vs 1 worker "
          "| Valkey CPU µs/contact | client p99 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for setup in setups:
        best = max(setup.rounds, key=lambda x: x["rate"])
        least = min(x["gateway_us"] for x in setup.rounds)
        print(f"| {setup.label} | {best['rate']:,.0f} | {best['rate'] / base['rate']:.2f} | "
              f"{least:.0f} | {least / min(x['gateway_us'] for x in setups[0].rounds):.2f} | "
              f"{min(x['valkey_us'] for x in setup.rounds):.0f} | {best['p99']:.1f} ms |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    a = parser.parse_args()
    main(a.max_workers, a.seconds, a.rounds)
