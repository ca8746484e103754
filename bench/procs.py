"""What the benches read of processes: a free port, CPU seconds and RSS from ``/proc``, a
gateway's children (workers, the embedded Valkey). Shared by the benches that run a real
``gateway serve`` (``bench/workers_bench.py``, ``bench/soak_mixed.py``)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

HOST = "127.0.0.1"
TICK = os.sysconf("SC_CLK_TCK")


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
