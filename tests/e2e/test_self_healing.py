"""A real ``gateway serve`` whose open-file limit is used up by idle connections: the spool
replayer fails, is restarted by the supervisor once descriptors are free again, and still
replays what a later Redis outage spools; SIGTERM then exits 0 and stops the embedded server."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
from pathlib import Path

import aiohttp
import redis

from gateway.testing import eventually
from tests.e2e.test_restarts import post, servers_on
from tests.e2e.test_serve import PY, wait_healthy, write_config
from tests.harness import free_port

NOFILE = 160
# One process (workers = 1): the open-file limit and the loop restarted are one process's.


# [limits] max_connections (default: a quarter of the open-file limit) keeps idle connections
# from using up the files; these tests take it off to see what happens when they do run out.
UNCAPPED = "[limits]\nmax_connections = 100000\n"


def start_limited(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    """``gateway serve`` with at most NOFILE open files; its log lines go to ``log``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    with open(log, "wb") as err:
        return subprocess.Popen(
            [PY, "-m", "gateway", "serve", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=limit,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def exhaust_until(port: int, log: Path, line: str) -> None:
    """Open idle connections until the gateway has no descriptor left and ``line`` shows in
    its log; then close them all."""
    held: list[socket.socket] = []
    try:
        for _ in range(400):
            if line in log.read_text(errors="replace"):
                return
            if len(held) < 4 * NOFILE:
                for _ in range(20):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    held.append(s)
            await asyncio.sleep(0.05)
        raise AssertionError(f"{line!r} never logged:\n{log.read_text(errors='replace')}")
    finally:
        for s in held:
            s.close()


async def test_replayer_heals_after_the_open_files_ran_out(tmp_path, own_redis):
    port = free_port()
    cfg = write_config(tmp_path, port, own_redis.url, UNCAPPED, workers=1)
    log = tmp_path / "gateway.log"
    proc = start_limited(cfg, log)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_healthy(session, port, proc)
            await exhaust_until(port, log, "loop replayer failed")
            await wait_healthy(session, port, proc)
            own_redis.stop_sync()
            spooled = await post(session, port, "during-outage")
            assert spooled["status"] == "spooled"
            own_redis.start_sync()
            client = redis.Redis.from_url(own_redis.url)

            def landed() -> bool:
                return bool(client.xlen("{gateway}:contacts"))

            await eventually(landed, timeout_s=60)  # the restarted replayer moved it
            client.close()

            async def redis_back() -> bool:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                return "gateway_redis_up 1.0" in text and "gateway_spool_depth 0.0" in text

            await eventually(redis_back, timeout_s=30)
            after = await post(session, port, "after-outage")
            assert after["status"] == "enqueued"  # Redis is used again, not the spool

            async def replayer() -> dict:
                async with session.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    body = await resp.json()
                    return body["loops"]["replayer"] if resp.status == 200 else {}

            state = await eventually(replayer, timeout_s=30)
            assert state["state"] == "running" and state["restarts"] >= 1
            assert "Too many open files" in state["last_error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_shutdown_after_the_open_files_ran_out_exits_0_and_stops_the_server(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port, extra=UNCAPPED, workers=1)  # the embedded server
    log = tmp_path / "gateway.log"
    proc = start_limited(cfg, log)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_healthy(session, port, proc)
            assert len(servers_on((tmp_path / "var" / "redis").resolve())) == 1
            await exhaust_until(port, log, "loop replayer failed")
            await wait_healthy(session, port, proc)
            assert (await post(session, port, "after"))["status"] == "enqueued"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")
        assert not servers_on((tmp_path / "var" / "redis").resolve())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
