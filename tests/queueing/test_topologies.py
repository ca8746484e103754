"""The one-hash-tag key layout on a Redis Cluster of three masters and behind Sentinel."""

from __future__ import annotations

import asyncio
import random
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.queueing.embedded import find_server_binary
from gateway.testing import eventually
from tests.queueing.test_intake import inbound


def free_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(1000):
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise AssertionError("no free port pair")


def spawn(args: list[str], cwd: Path) -> subprocess.Popen[bytes]:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [find_server_binary(), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def wait_ping(port: int) -> redis.Redis:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    for _ in range(200):
        try:
            client.ping()
            return client
        except redis.ConnectionError:
            time.sleep(0.02)
    raise AssertionError(f"server on {port} did not start")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Three masters sharing the 16384 slots."""
    ports = [free_port() for _ in range(3)]
    procs = [
        spawn(
            [
                "--port",
                str(p),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"n{p}.conf",
                "--appendonly",
                "yes",
                "--save",
                "",
            ],
            tmp_path / f"node{p}",
        )
        for p in ports
    ]
    try:
        clients = [wait_ping(p) for p in ports]
        ranges = [(0, 5460), (5461, 10922), (10923, 16383)]
        for client, (lo, hi) in zip(clients, ranges, strict=True):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
        for _ in range(300):
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t and "cluster_known_nodes:3" in t for t in text):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("cluster did not form")
        for c in clients:
            c.close()
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


async def test_intake_and_replies_on_a_three_master_cluster(cluster, start_gateway):
    gw = await start_gateway(url=f"redis://127.0.0.1:{cluster[0]}", redis={"cluster": True})
    receipts = await asyncio.gather(
        *(gw.intake.submit(inbound(external_id=f"c{i % 50}")) for i in range(100))
    )
    assert len({r.contact_id for r in receipts}) == 50
    assert {r.status for r in receipts} == {"enqueued", "duplicate"}
    contacts = await gw.read_contacts()
    assert len(contacts) == 50
    stamped = await gw.queue.stamp(contacts[0].id, "responded", gw.clock.now_us(), "test")
    assert stamped is not None and stamped.met is True
    # every key lives on the one node that owns the hash tag's slot
    slot = redis.Redis(port=cluster[0]).execute_command("CLUSTER", "KEYSLOT", gw.keys.contacts)
    for key in (gw.keys.events, gw.keys.deadlines, gw.keys.contact(contacts[0].id)):
        assert redis.Redis(port=cluster[0]).execute_command("CLUSTER", "KEYSLOT", key) == slot


async def test_intake_behind_sentinel(tmp_path, start_gateway):
    master_port, sentinel_port = free_port(), free_port()
    master = spawn(
        ["--port", str(master_port), "--appendonly", "yes", "--save", ""], tmp_path / "m"
    )
    conf = tmp_path / "s" / "sentinel.conf"
    conf.parent.mkdir()
    conf.write_text(
        f"port {sentinel_port}\nsentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    sentinel = spawn([str(conf), "--sentinel"], tmp_path / "s")
    try:
        wait_ping(master_port).close()
        wait_ping(sentinel_port).close()
        gw = await start_gateway(
            url="",
            redis={"sentinel": {"hosts": [f"127.0.0.1:{sentinel_port}"], "master": "mymaster"}},
        )
        assert gw.embedded is None
        receipt = await gw.intake.submit(inbound())
        assert receipt.status == "enqueued"
        direct = redis.Redis(port=master_port)
        assert direct.xlen(gw.keys.contacts) == 1
        direct.close()
    finally:
        for proc in (sentinel, master):
            proc.terminate()
            proc.wait(10)


async def test_min_replicas_spools_until_a_replica_has_the_batch(tmp_path, start_gateway):
    master_port, replica_port = free_port(), free_port()
    master = spawn(
        ["--port", str(master_port), "--appendonly", "yes", "--save", ""], tmp_path / "m"
    )
    replica_args = [
        "--port",
        str(replica_port),
        "--replicaof",
        "127.0.0.1",
        str(master_port),
        "--save",
        "",
    ]
    replica = spawn(replica_args, tmp_path / "r")
    try:
        wait_ping(master_port).close()
        probe = wait_ping(replica_port)
        await eventually(lambda: probe.info("replication").get("master_link_status") == "up")
        probe.close()
        gw = await start_gateway(
            url=f"redis://127.0.0.1:{master_port}",
            redis={"min_replicas": 1, "write_timeout": "500ms"},
        )
        assert (await gw.intake.submit(inbound(external_id="r1"))).status == "enqueued"
        replica.terminate()
        replica.wait(10)
        await asyncio.sleep(0.2)
        assert (await gw.intake.submit(inbound(external_id="r2"))).status == "spooled"
        replica = spawn(replica_args, tmp_path / "r")
        await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
        assert sorted(c.external_id for c in await gw.read_contacts()) == ["r1", "r2"]
        on_replica = redis.Redis(host="127.0.0.1", port=replica_port)
        await eventually(lambda: on_replica.xlen(gw.keys.contacts) == 2)
        assert on_replica.xlen(gw.keys.contacts) == 2
        on_replica.close()
    finally:
        for proc in (replica, master):
            proc.terminate()
            proc.wait(10)
