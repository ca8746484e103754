"""The benches' processes: a free port, CPU seconds and RSS from ``/proc``, a gateway's
children (workers, the embedded Valkey) (``bench/workers_bench.py``, ``bench/soak_mixed.py``),
and the launchers of the benches that measure this tree and an older one (``--before DIR``) in
processes of their own on one Valkey, with ``bench/intake_bench.py``'s load from another
process (``each_tree``, ``child_path``, ``intake_load``: ``bench/aggregator_bench.py``,
``bench/intake_calls.py``)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    """Resident set size in MiB (0 once the process is gone)."""
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


def role(pid: int) -> str:
    """``valkey``, ``worker-K`` (from its ``GATEWAY_WORKER`` environment) or ``gateway``."""
    if is_valkey(pid):
        return "valkey"
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    for item in environ:
        if item.startswith(b"GATEWAY_WORKER="):
            return f"worker-{json.loads(item.split(b'=', 1)[1])['slot']}"
    return "gateway"


def tree(pid: int) -> dict[str, int]:
    """A ``gateway serve`` parent and its children by role (``gateway``, ``worker-K``,
    ``valkey``)."""
    found = {"gateway": pid}
    for child in children(pid):
        found[role(child)] = child
    return found


def each_tree(module: str, args: list[str], before: str, prefix: str) -> None:
    """Run ``python -m module *args --child SRC URL`` for this tree (SRC empty) and then, with
    ``before``, for that older tree, each in its own process, on one embedded Valkey started
    for the run (``prefix`` names its folder)."""
    sys.path.insert(0, str(ROOT))
    from gateway.queueing.embedded import EmbeddedRedis

    server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix=prefix)) / "r")
    server.start_sync()
    try:
        for src in ("", before) if before else ("",):
            subprocess.run([sys.executable, "-m", module, *args, "--child", src, server.url],
                           check=True, cwd=ROOT)
    finally:
        server.stop_sync()


def child_path(src: str) -> None:
    """In a child of ``each_tree``: ``bench`` importable, and the older tree's ``gateway``
    first on the path when ``src`` is one (its adapter plugins off: they are written against
    today's modules)."""
    sys.path.insert(0, str(ROOT))
    if src:
        sys.path.insert(0, src)
        from bench.intake_bench import without_plugins

        without_plugins()


def _intake_load(port: int, seconds: float, offset: int, rate: float | None, out: Any) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.intake_bench import drive

    class Port:
        pass

    target: Any = Port()
    target.port = port
    out.put(asyncio.run(drive(target, seconds, offset, rate=rate)).ok)


async def intake_load(
    port: int,
    seconds: float,
    offset: int,
    rate: float | None = None,
    started: Callable[[], None] | None = None,
) -> int:
    """``bench/intake_bench.py``'s load (64 connections, new contacts numbered from
    ``offset``; paced at ``rate`` or as fast as it goes) on ``POST /v1/intake`` at ``port``,
    from a process of its own; returns the contacts taken (202). ``started`` is called once
    the load process runs (a profiler turned on then counts none of the launch)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    load = ctx.Process(target=_intake_load, args=(port, seconds, offset, rate, out))
    load.start()
    if started is not None:
        started()
    ok: int = await asyncio.to_thread(out.get)
    await asyncio.to_thread(load.join)
    return ok
