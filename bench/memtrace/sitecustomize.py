"""Memory tracing for ``bench/soak_mixed.py --trace-memory`` (never installed, never imported by
the gateway): the soak puts this folder on the gateway's ``PYTHONPATH`` with
``SOAK_MEMTRACE_DIR`` set, so every gateway process (parent and workers) imports this file at
start. From a daemon thread it starts ``tracemalloc`` 20 s after the process started (what the
start allocated is not traced), and writes 30 s later and then every minute
``<role>-<pid>-<k>.snap`` (a tracemalloc snapshot) and ``.types`` (live objects counted by
type, JSON) to that folder; the soak diffs each process's first and last."""

from __future__ import annotations

import gc
import json
import os
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path


def _role() -> str:
    raw = os.environ.get("GATEWAY_WORKER")
    return f"worker-{json.loads(raw)['slot']}" if raw else "gateway"


def _dump(folder: Path, k: int) -> None:
    name = f"{_role()}-{os.getpid()}-{k:03d}"
    gc.collect()
    tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    ).dump(str(folder / f"{name}.snap"))
    counts = Counter(type(o).__qualname__ for o in gc.get_objects())
    (folder / f"{name}.types").write_text(json.dumps(counts))


def _run(folder: Path) -> None:
    time.sleep(20)  # the imports and the start run untraced (traced, they take minutes)
    tracemalloc.start(8)
    time.sleep(30)
    k = 0
    while True:
        _dump(folder, k)
        k += 1
        time.sleep(60)


_folder = os.environ.get("SOAK_MEMTRACE_DIR")
if _folder:
    Path(_folder).mkdir(parents=True, exist_ok=True)
    threading.Thread(target=_run, args=(Path(_folder),), daemon=True, name="memtrace").start()
