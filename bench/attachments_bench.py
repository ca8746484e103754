"""Durable attachment writes: one file at a time against one group commit, in one run.

``one by one``: each 2 KB file stored on its own, as the store did before its group commit
(write, fsync, rename, fsync of its folder, then the next file). ``group``: the same number of
new files through ``AttachmentStore.put_many_sync`` (all written, then fsynced at the same
time, renamed, then their folders fsynced at the same time), what concurrent SMTP sessions and
webhooks now share. ``syncfs``: the same through ``put_many_sync(sync_fs=True)`` (written, one
``syncfs``, renamed, one more), how files already held in Redis are written after their answer.
CPU is this process's (all threads; the kernel's journal thread is not counted). Alternating
rounds, the median of each; the files land in the store's 256 fan-out folders as real
contacts' files do. The temporary store is made next to the
repository (``var/``), on the file system the gateway's data would be on here.

    .venv/bin/python -m bench.attachments_bench            # about 20 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gateway.contact.attachments import AttachmentStore

ROOT = Path(__file__).resolve().parents[1]


def one_by_one(store: AttachmentStore, files: list[bytes]) -> float:
    started = time.perf_counter()
    for data in files:
        store.put_sync(data, "m.eml", "message/rfc822")
    return time.perf_counter() - started


def group(store: AttachmentStore, files: list[bytes]) -> float:
    started = time.perf_counter()
    results = store.put_many_sync([(data, "m.eml", "message/rfc822") for data in files])
    assert not [r for r in results if isinstance(r, Exception)]
    return time.perf_counter() - started


def group_syncfs(store: AttachmentStore, files: list[bytes]) -> float:
    started = time.perf_counter()
    results = store.put_many_sync(
        [(data, "m.eml", "message/rfc822") for data in files], sync_fs=True
    )
    assert not [r for r in results if isinstance(r, Exception)]
    return time.perf_counter() - started


def main(rounds: int, sizes: list[int]) -> None:
    (ROOT / "var").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="bench-attachments-", dir=ROOT / "var"))
    try:
        store = AttachmentStore(folder, max_size=1 << 20)
        print(f"2 KB files, {rounds} alternating rounds, median; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")
        print(f"{'files':>6} {'one by one':>14} {'group':>14} {'syncfs':>14} "
              f"{'one by one / group':>20} {'cpu µs/file: group':>19} {'syncfs':>7}")
        kinds = (("one", one_by_one), ("group", group), ("syncfs", group_syncfs))
        for n in sizes:
            times: dict[str, list[float]] = {k: [] for k, _ in kinds}
            cpu: dict[str, list[float]] = {k: [] for k, _ in kinds}
            for _ in range(rounds):
                for name, fn in kinds:
                    files = [os.urandom(2048) for _ in range(n)]  # new bytes: new files
                    cpu0 = time.process_time()
                    times[name].append(fn(store, files))
                    cpu[name].append((time.process_time() - cpu0) / n)
            one, grouped, synced = (statistics.median(times[k]) for k, _ in kinds)
            cpu_group, cpu_synced = (statistics.median(cpu[k]) * 1e6 for k in ("group", "syncfs"))
            print(f"{n:6d} {one * 1e3:11.1f} ms {grouped * 1e3:11.1f} ms {synced * 1e3:11.1f} ms "
                  f"{one / grouped:20.1f} {cpu_group:19.0f} {cpu_synced:7.0f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 64])
    args = parser.parse_args()
    main(args.rounds, args.sizes)
