"""End to end in subprocesses: ``gateway serve``, ``POST /v1/intake``, ``gateway tail --json``,
and the gateway and Redis killed mid-load with every acknowledged contact counted."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson

from gateway.contact.clock import MICROS_PER_SECOND, parse_time
from gateway.server.workers import default_count
from gateway.testing import eventually
from tests.harness import free_port

PY = sys.executable


def write_config(
    tmp: Path,
    port: int,
    redis_url: str = "",
    extra: str = "",
    workers: int = 0,
    write_timeout: str = "300ms",
) -> Path:
    """``workers`` 0: the default, one worker per core."""
    cfg = tmp / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
data_dir = "{tmp / "var"}"
workers = {workers}

[redis]
url = "{redis_url}"
write_timeout = "{write_timeout}"

[http]
listen = "127.0.0.1:{port}"

[api]
open_to_loopback = true
{extra}
"""
    )
    return cfg


def start_serve(cfg: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PY, "-m", "gateway", "serve", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def wait_healthy(session: aiohttp.ClientSession, port: int, proc) -> None:
    async def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {proc.stderr.read().decode()}")
        try:
            async with session.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await eventually(healthy, timeout_s=60)  # a restart after kill -9 on a loaded machine


async def test_serve_intake_tail_and_clean_sigterm(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path, port)
    proc = start_serve(cfg)
    try:
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, port, proc)
            body = {"channel": "sms", "sender": {"address": "+8613800138000"}, "text": "路灯不亮"}
            async with session.post(f"http://127.0.0.1:{port}/v1/intake", json=body) as resp:
                assert resp.status == 202
                receipt = await resp.json()
        tail = subprocess.run(
            [PY, "-m", "gateway", "tail", "--json", "--count", "5", "-c", str(cfg)],
            capture_output=True,
            timeout=60,
            check=True,
        )
        lines = [orjson.loads(line) for line in tail.stdout.splitlines()]
        (contact,) = lines
        assert contact["id"] == receipt["id"]
        assert contact["text"] == "路灯不亮"
        received, enqueued = parse_time(contact["received_at"]), parse_time(contact["enqueued_at"])
        assert received <= enqueued
        assert parse_time(contact["deadline"]["due_at"]) == received + 180 * MICROS_PER_SECOND
        assert contact["deadline"] == receipt["deadline"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_nothing_acknowledged_is_lost_when_gateway_and_redis_are_killed(tmp_path, own_redis):
    """Eight clients post for a while; Redis is SIGKILLed and restarted, then the gateway is
    SIGKILLed and restarted. Every contact that got a 202 is on the stream exactly once."""
    port = free_port()
    cfg = write_config(tmp_path, port, own_redis.url)
    proc = start_serve(cfg)
    acked: dict[str, str] = {}
    stop = asyncio.Event()

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while not stop.is_set():
            external_id = f"c{n}-{i}"
            i += 1
            body = {"channel": "web", "external_id": external_id, "text": "load"}
            try:
                async with session.post(f"http://127.0.0.1:{port}/v1/intake", json=body) as resp:
                    if resp.status == 202:
                        acked[external_id] = (await resp.json())["id"]
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await wait_healthy(session, port, proc)
            clients = [asyncio.create_task(client(n, session)) for n in range(8)]
            await asyncio.sleep(1.0)
            before_kill = len(acked)
            own_redis.kill_sync()
            await asyncio.sleep(1.0)
            own_redis.start_sync()
            await asyncio.sleep(1.0)
            proc.kill()
            proc.wait()
            await asyncio.sleep(0.5)
            proc = start_serve(cfg)
            await wait_healthy(session, port, proc)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*clients)
            assert before_kill > 0 and len(acked) > before_kill
            async def replayed() -> bool:  # the restarted gateway replays what was spooled
                async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
                depths = [x for x in text.splitlines() if x.startswith("gateway_spool_depth")]
                # one line per worker (label worker="K"), each of them answering
                return len(depths) == default_count(0) and all(
                    x.endswith(" 0.0") for x in depths
                )

            await eventually(replayed, step_s=0.1)
        import redis

        client_ = redis.Redis.from_url(own_redis.url)
        entries = client_.xrange("{gateway}:contacts")
        client_.close()
        seen: dict[str, str] = {}
        for _, fields in entries:
            contact = orjson.loads(fields[b"contact"])
            assert contact["external_id"] not in seen, "a contact was written twice"
            seen[contact["external_id"]] = contact["id"]
        missing = [e for e in acked if e not in seen]
        assert not missing, f"{len(missing)} acknowledged contacts lost"
        assert all(seen[e] == acked[e] for e in acked)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
