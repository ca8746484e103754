"""Unavailability per restart of ``gateway serve`` with the embedded server.

A gateway process is started on a data folder holding ``--contacts`` contacts, then killed with
SIGKILL and started again ``--cycles`` times. For each restart: the time from the kill to the
first ``202`` of the new process (a client posting every 10 ms), and whether exactly one server
runs on the folder afterwards; the baseline is the first start on an empty folder, in the same
run. Figures: docs/reliability.md ("Restarts").

    .venv/bin/python -m bench.restart_bench                  # 10 cycles, about half a minute
    .venv/bin/python -m bench.restart_bench --cycles 3 --contacts 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.queueing.embedded import is_server_of


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def first_202(session: aiohttp.ClientSession, url: str, n: int) -> float:
    body = {"channel": "web", "external_id": f"probe-{n}", "text": "probe"}
    while True:
        try:
            async with session.post(url, json=body) as resp:
                if resp.status == 202:
                    return time.monotonic()
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.01)


async def main(cycles: int, contacts: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "gateway.toml"
        cfg.write_text(
            f'[gateway]\ndata_dir = "{tmp}/var"\nworkers = 1\n[http]\nlisten = "127.0.0.1:{port}"\n'
            "[api]\nopen_to_loopback = true\n"
        )
        redis_dir = (Path(tmp) / "var" / "redis").resolve()
        url = f"http://127.0.0.1:{port}/v1/intake"
        began = time.monotonic()
        proc = start(cfg)
        gaps: list[float] = []
        single = 0
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            cold = await first_202(session, url, -1) - began
            for i in range(contacts):
                body = {"channel": "web", "external_id": f"fill-{i}", "text": "x" * 200}
                async with session.post(url, json=body) as resp:
                    assert resp.status == 202
            for n in range(cycles):
                killed = time.monotonic()
                proc.kill()
                proc.wait()
                proc = start(cfg)
                gaps.append(await first_202(session, url, n) - killed)
                pids = [p for p in os.listdir("/proc") if p.isdigit()]
                single += sum(is_server_of(int(p), redis_dir) for p in pids) == 1
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    gaps.sort()
    print(f"baseline, first start on an empty folder (spawn to first 202): {cold:.2f} s")
    print(f"restarts after SIGKILL with {contacts} contacts in the folder: {cycles}")
    print(
        f"unavailable (kill to first 202): median {statistics.median(gaps):.2f} s, "
        f"min {gaps[0]:.2f} s, max {gaps[-1]:.2f} s"
    )
    print(f"exactly one server on the folder after the restart: {single}/{cycles}")
    print(f"exit code after SIGTERM: {code}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--contacts", type=int, default=2000)
    args, _ = parser.parse_known_args()
    asyncio.run(main(args.cycles, args.contacts))
