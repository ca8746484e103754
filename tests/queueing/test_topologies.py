"""The one-hash-tag key layout on a Redis Cluster of three masters and behind Sentinel."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.queueing.embedded import find_server_binary
from gateway.testing import eventually
from tests.harness import free_ports
from tests.queueing.test_intake import inbound


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


def waits_done(client: redis.Redis) -> int:
    """How many WAIT commands the server has finished (a blocked one counts once answered)."""
    return int(client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0))


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    """Three masters sharing the 16384 slots."""
    ports = free_ports(3, bus=10000)  # a node and its cluster bus port
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
    master_port, sentinel_port = free_ports(2)
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
    master_port, replica_port = free_ports(2)
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
            redis={"min_replicas": 1, "write_timeout": "2s"},
        )
        assert (await gw.intake.submit(inbound(external_id="r1"))).status == "enqueued"
        replica.terminate()
        replica.wait(10)
        primary = redis.Redis(host="127.0.0.1", port=master_port)
        await eventually(lambda: primary.info("replication")["connected_slaves"] == 0)
        waits = waits_done(primary)
        assert (await gw.intake.submit(inbound(external_id="r2"))).status == "spooled"
        # the replayer tries (a WAIT the replica cannot answer) while the replica is away:
        # a Redis without replicas is an outage it waits out, not a failure of its loop
        # (ReplicationLagError went to the supervisor, which restarted the loop with a
        # back-off that reached 10 s)
        await eventually(lambda: waits_done(primary) >= waits + 2)
        replayer = gw.supervisor.states()["replayer"]
        assert replayer.restarts == 0, replayer.last_error
        assert replayer.state in ("running", "degraded")
        assert gw.spool.depth == 1 and not gw.intake.redis_up
        primary.close()
        replica = spawn(replica_args, tmp_path / "r")
        await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
        assert gw.supervisor.states()["replayer"].restarts == 0
        assert sorted(c.external_id for c in await gw.read_contacts()) == ["r1", "r2"]
        on_replica = redis.Redis(host="127.0.0.1", port=replica_port)
        await eventually(lambda: on_replica.xlen(gw.keys.contacts) == 2)
        assert on_replica.xlen(gw.keys.contacts) == 2
        on_replica.close()
    finally:
        for proc in (replica, master):
            proc.terminate()
            proc.wait(10)


async def test_min_replicas_a_duplicate_is_confirmed_only_once_a_replica_has_it(
    tmp_path, start_gateway
):
    """Instance one's write of a contact lands on the master while the replica is stopped (its
    WAIT times out: spooled); the peer repeats the contact at instance two. A duplicate writes
    nothing, and WAIT counts the replicas that have the connection's own last write: two's
    WAIT confirmed at once and two answered "duplicate", the contact on the master alone (a
    failover then lost it; the Sentinel fleet soak lost a window of contacts so, its replays
    of spooled contacts written before being duplicates). Two must spool it as well."""
    master_port, replica_port = free_ports(2)
    master = spawn(
        ["--port", str(master_port), "--appendonly", "yes", "--save", ""], tmp_path / "m"
    )
    replica = spawn(
        ["--port", str(replica_port), "--replicaof", "127.0.0.1", str(master_port),
         "--save", ""],
        tmp_path / "r",
    )
    stopped = False
    try:
        wait_ping(master_port).close()
        probe = wait_ping(replica_port)
        await eventually(lambda: probe.info("replication").get("master_link_status") == "up")
        probe.close()
        url = f"redis://127.0.0.1:{master_port}"
        section = {"min_replicas": 1, "write_timeout": "2s"}
        one = await start_gateway(url=url, redis=section, gateway={"instance": "one"})
        two = await start_gateway(url=url, redis=section, gateway={"instance": "two"})
        assert (await one.intake.submit(inbound(external_id="w1"))).status == "enqueued"
        assert (await two.intake.submit(inbound(external_id="w2"))).status == "enqueued"
        os.kill(replica.pid, signal.SIGSTOP)
        stopped = True
        assert (await one.intake.submit(inbound(external_id="r"))).status == "spooled"
        primary = redis.Redis(host="127.0.0.1", port=master_port)
        assert primary.xlen(one.keys.contacts) == 3  # on the master, on no replica
        primary.close()
        # two's next write on a new connection, which has written nothing (as one that last
        # wrote before "r"; two's own background writes would make the test pass by chance)
        await two.queue.redis.connection_pool.disconnect()
        assert (await two.intake.submit(inbound(external_id="r"))).status == "spooled"
        os.kill(replica.pid, signal.SIGCONT)
        stopped = False
        await eventually(lambda: one.spool.depth == two.spool.depth == 0)
        assert sorted(c.external_id for c in await one.read_contacts()) == ["r", "w1", "w2"]
    finally:
        if stopped:
            os.kill(replica.pid, signal.SIGCONT)
        for proc in (replica, master):
            proc.terminate()
            proc.wait(10)


async def test_min_replicas_a_holder_counts_only_renewals_a_replica_has(tmp_path):
    """A failover loses what the master had acknowledged and no replica had yet: a lease's
    renewals too, so the promoted replica's copy expires with the last renewal it got, while
    a holder that counted the lost ones still believes in its lease; another instance then
    takes it on the promoted replica and both run at once (the Sentinel fleet soak's "two
    holders"). With ``min_replicas`` a renewal counts only once ``WAIT`` confirms it, as the
    acquisition: here the holder gives its lease up before the failover's successor starts."""
    import redis.asyncio as aioredis

    from gateway.queueing.coordination import Leases
    from gateway.queueing.keys import Keys
    from tests.queueing.test_coordination import Recorder

    ttl = 1.5
    master_port, replica_port = free_ports(2)
    master = spawn(["--port", str(master_port), "--save", ""], tmp_path / "m")
    replica = spawn(
        ["--port", str(replica_port), "--replicaof", "127.0.0.1", str(master_port),
         "--save", ""],
        tmp_path / "r",
    )
    stopped = False
    on_master = aioredis.Redis(port=master_port, socket_timeout=0.5)
    on_replica = aioredis.Redis(port=replica_port, socket_timeout=0.5)
    keys = Keys("lease-failover")
    rec = Recorder()
    tasks: list[asyncio.Task[None]] = []
    try:
        wait_ping(master_port).close()
        probe = wait_ping(replica_port)
        await eventually(lambda: probe.info("replication").get("master_link_status") == "up")
        probe.close()
        a = Leases(on_master, keys, "a", ttl, min_replicas=1, replica_timeout_ms=100)
        tasks.append(asyncio.create_task(a.exclusive("job", rec.work("a"))))
        await eventually(lambda: _true(rec.running == {"a"}))
        await asyncio.sleep(ttl / 3 + 0.1)  # a renewal the replica has
        os.kill(replica.pid, signal.SIGSTOP)  # the replica falls behind (a saturated machine,
        stopped = True  # its own appendfsync always) by more than its socket's buffer ...
        await on_master.set(keys.state("test", "filler"), b"x" * (32 << 20))
        await asyncio.sleep(ttl * 4 / 3)  # ... for renewals the master acknowledges
        master.kill()  # the master dies; the replica, promoted, has the lease as it had it
        master.wait(10)
        os.kill(replica.pid, signal.SIGCONT)
        stopped = False
        await on_replica.execute_command("REPLICAOF", "NO", "ONE")
        b = Leases(on_replica, keys, "b", ttl)
        tasks.append(asyncio.create_task(b.exclusive("job", rec.work("b"))))
        await eventually(lambda: _true("b" in rec.running))
        await eventually(lambda: _true("a" not in rec.running))
        assert rec.most_at_once == 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if stopped:
            os.kill(replica.pid, signal.SIGCONT)
        await on_master.aclose()
        await on_replica.aclose()
        for proc in (replica, master):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


async def _true(value: object) -> bool:
    return bool(value)
