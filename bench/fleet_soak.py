"""Fleet soak: several ``gateway serve`` processes on one Redis, killed with SIGKILL and
restarted at random under mixed load, with Redis itself killed and restarted now and then.

Instances have different adapter sets: ``i0`` only the HTTP intake API, the others also a
Telegram bot in polling mode (against a local fake Bot API speaking the real wire format) and
Kannel SMS. Load, all the time: ``POST /v1/intake`` to every live instance, Telegram updates
queued at the fake Bot API (taken by whichever instance holds the bot's lease), Kannel get-url
requests to the SMS instances. Every few seconds one instance is killed (every other time the
one polling Telegram) and started again.

Counted: what was acknowledged (202 from the intake API, 200 from the Kannel URL, a Telegram
update confirmed by a later getUpdates offset), what is on ``{p}:contacts`` at the end (after
every instance is up again and every spool is empty), lost and duplicated; how many instances
believed they held each lease at once (sampled through ``/readyz``); the most getUpdates
requests in flight at once (Telegram allows one per bot); each take-over time, from killing
a lease holder to another instance holding the lease.

    .venv/bin/python -m bench.fleet_soak                           # 10 cycles, about a minute
    .venv/bin/python -m bench.fleet_soak --cycles 100 --redis-restarts 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from gateway.queueing.embedded import EmbeddedRedis, find_server_binary
from gateway.queueing.keys import Keys
from tests.channels.chat.fakes import BOT_ID, BOT_TOKEN, FakeBotApi, message
from tests.channels.sms.test_kannel import AUTH, SECRET, get_url
from tests.harness import free_ports

PREFIX = "fleet"
SAMPLE_WINDOW_S = 0.3
"""A look at every instance's leases counts only if all answered within this."""
TELEGRAM_LEASE = f"telegram:{BOT_ID}"


@dataclass
class Instance:
    name: str
    port: int
    cfg: Path
    sms: bool
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        log = self.cfg.with_suffix(".log").open("ab")  # the instance's stderr, every start
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "-c", str(self.cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()

    def tail(self, lines: int = 30) -> str:
        """The end of the instance's log (why it exited)."""
        text = self.cfg.with_suffix(".log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Report:
    instances: int
    cycles: int
    redis_restarts: int
    sentinel: bool = False
    seconds: float = 0.0
    acknowledged: Counter[str] = field(default_factory=Counter)
    """By kind: intake, sms, telegram."""
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    on_stream: int = 0
    unacknowledged: int = 0
    """Stored, but the answer never reached the client (its instance was killed mid-request)."""
    kills: int = 0
    holder_kills: int = 0
    takeovers_s: list[float] = field(default_factory=list)
    lease_samples: int = 0
    slow_samples: int = 0
    most_holders: dict[str, int] = field(default_factory=dict)
    most_polling: int = 0
    conflicts: int = 0

    def lines(self) -> list[str]:
        over = sorted(self.takeovers_s)
        take = (
            f"median {over[len(over) // 2]:.1f} s, max {over[-1]:.1f} s ({len(over)})"
            if over
            else "none measured"
        )
        return [
            f"instances {self.instances}, kill -9 cycles {self.kills} "
            f"({self.holder_kills} of the Telegram lease holder), "
            + (
                f"Sentinel failovers (master kill -9) {self.redis_restarts}"
                if self.sentinel
                else f"Redis kill -9 + restart {self.redis_restarts}"
            )
            + f", {self.seconds:.0f} s",
            "acknowledged "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.acknowledged.items()))
            + f" (total {sum(self.acknowledged.values())}); on the stream {self.on_stream} "
            f"({self.unacknowledged} stored whose answer was cut off by a kill)",
            f"lost {len(self.lost)}, duplicated {len(self.duplicated)}",
            f"lease samples {self.lease_samples} ({self.slow_samples} too slow to count), "
            "most holders at once "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.most_holders.items())),
            f"getUpdates in flight at once: at most {self.most_polling}, "
            f"409 conflicts {self.conflicts}",
            f"take-over after killing the holder: {take}",
        ]


def write_config(root: Path, n: int, port: int, redis: str, bot: FakeBotApi, ttl: str) -> Path:
    """``redis``: the rest of the ``[redis]`` table (a url, or Sentinel's settings)."""
    sms = n > 0
    cfg = root / f"i{n}.toml"
    text = f"""
[gateway]
data_dir = "{root / f"i{n}"}"
instance = "i{n}"
workers = 1  # instances, each one process: kills, leases and /readyz are per instance

[redis]
prefix = "{PREFIX}"
write_timeout = "300ms"
{redis}

[http]
listen = "127.0.0.1:{port}"

[api]
open_to_loopback = true

[fleet]
lease_ttl = "{ttl}"

[limits]
sender_contacts = 0   # a load test: one fake citizen sends far more than 30 a minute
"""
    if sms:
        text += f"""
[adapters.tg]
type = "telegram"
token = "{BOT_TOKEN}"
mode = "polling"
poll_timeout = "1s"
api_base = "{bot.api_base}"
file_base = "{bot.file_base}"

[adapters.kannel]
type = "kannel"
path = "/sms/kannel"
secret = "{SECRET}"
region = "CN"
"""
    cfg.write_text(text)
    return cfg


class SentinelGroup:
    """A master, two replicas (append-only, ``appendfsync always``) and three Sentinels, all
    the bundled server binary on loopback TCP; ``failover`` kills the master with SIGKILL and
    brings it back as a replica of the master the Sentinels promoted."""

    MASTER = "mymaster"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.binary = find_server_binary()
        ports = free_ports(6)  # the master, brought back on its port after a kill, and all
        self.ports, self.sentinel_ports = ports[:3], ports[3:]
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.failovers = 0

    def _server(self, port: int, replica_of: int | None) -> None:
        folder = self.root / f"redis-{port}"
        folder.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
        ]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def start_sync(self) -> None:
        master, *replicas = self.ports
        self._server(master, None)
        for port in replicas:
            self._server(port, master)
        for port in self.sentinel_ports:
            conf = self.root / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [self.binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        self._wait(lambda: self.master_port() == master and self._replicas_online(master) == 2)
        self._wait(self._sentinels_ready)

    def _sentinels_ready(self) -> bool:
        """Every Sentinel knows both replicas and the other Sentinels (learned from the
        master's INFO every 10 s and from hello messages): only then can they fail over."""
        try:
            for port in self.sentinel_ports:
                replicas = self._ask(port, "SENTINEL", "replicas", self.MASTER)
                others = self._ask(port, "SENTINEL", "sentinels", self.MASTER)
                if len(replicas) < 2 or len(others) < len(self.sentinel_ports) - 1:
                    return False
        except Exception:
            return False
        return True

    def _ask(self, port: int, *command: str) -> Any:
        import redis

        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return client.execute_command(*command)
        finally:
            client.close()

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            with contextlib.suppress(Exception):
                _, found = self._ask(port, "SENTINEL", "get-master-addr-by-name", self.MASTER)
                return int(found)
        return None

    def _replicas_online(self, master: int) -> int:
        import redis

        with contextlib.suppress(Exception):
            client = redis.Redis(port=master, socket_timeout=1, socket_connect_timeout=1)
            try:
                info = client.info("replication")
            finally:
                client.close()
            return sum(
                1
                for key, value in info.items()
                if key.startswith("slave") and isinstance(value, dict)
                and value.get("state") == "online"
            )
        return 0

    def _wait(self, done: Any, timeout_s: float = 60.0) -> None:
        until = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > until:
                raise RuntimeError("the Sentinel group did not settle")
            time.sleep(0.1)

    def failover(self) -> None:
        old = self.master_port()
        assert old is not None
        # both replicas in sync first (the one brought back last may still be loading)
        self._wait(lambda: self._replicas_online(old) == 2, timeout_s=180)
        self._wait(self._sentinels_ready, timeout_s=60)
        self.servers[old].kill()
        self.servers[old].wait()
        self._wait(lambda: self.master_port() not in (None, old))
        new = self.master_port()
        self._server(old, new)
        assert new is not None
        self._wait(lambda: self._replicas_online(new) >= 1, timeout_s=180)
        self.failovers += 1

    def client(self) -> Any:
        return aioredis.Redis(port=self.master_port() or 0)

    def stop_sync(self) -> None:
        for proc in [*self.sentinels, *self.servers.values()]:
            if proc.poll() is None:
                proc.terminate()
        for proc in [*self.sentinels, *self.servers.values()]:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def config(self) -> str:
        hosts = ", ".join(f'"127.0.0.1:{p}"' for p in self.sentinel_ports)
        return (
            "min_replicas = 1\n\n[redis.sentinel]\n"
            f'hosts = [{hosts}]\nmaster = "{self.MASTER}"\n'
        )


class Soak:
    def __init__(
        self,
        root: Path,
        instances: int,
        cycles: int,
        redis_restarts: int,
        ttl_s: float,
        sentinel: bool = False,
    ) -> None:
        self.root = root
        self.cycles = cycles
        self.redis_restarts = redis_restarts
        self.ttl_s = ttl_s
        self.report = Report(instances, cycles, redis_restarts, sentinel=sentinel)
        self.group = SentinelGroup(root) if sentinel else None
        self.redis = EmbeddedRedis(root / "redis")
        self.bot = FakeBotApi()
        self.fleet: list[Instance] = []
        self.n_instances = instances
        self.ids = itertools.count()
        self.pushed_updates: list[int] = []
        self.running = True
        self.sms_ids: set[str] = set()
        self.intake_ids: set[str] = set()

    # ------------------------------------------------------------------ fleet

    async def healthy(self, session: aiohttp.ClientSession, inst: Instance) -> None:
        for _ in range(1200):
            if not inst.alive:
                raise RuntimeError(
                    f"{inst.name} exited with {inst.proc and inst.proc.poll()}:\n{inst.tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(inst.base + "/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{inst.name} did not become healthy")

    async def ready(self, session: aiohttp.ClientSession, inst: Instance) -> dict[str, Any]:
        async with session.get(inst.base + "/readyz") as resp:
            detail: dict[str, Any] = await resp.json(content_type=None)
            return detail

    async def holders(self, session: aiohttp.ClientSession) -> dict[str, list[str]]:
        """Lease name -> the live instances that say they hold it (one look at each)."""
        live = [i for i in self.fleet if i.alive]

        async def look(inst: Instance) -> tuple[str, list[str]]:
            try:
                return inst.name, list((await self.ready(session, inst)).get("leases", {}))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return inst.name, []

        seen: dict[str, list[str]] = {}
        for name, leases in await asyncio.gather(*(look(i) for i in live)):
            for lease in leases:
                seen.setdefault(lease, []).append(name)
        return seen

    async def watch_leases(self, session: aiohttp.ClientSession) -> None:
        while self.running:
            asked = time.monotonic()
            seen = await self.holders(session)
            if time.monotonic() - asked > SAMPLE_WINDOW_S:
                # the instances answered at moments too far apart (a slow /readyz while Redis
                # fails over): their answers are not one look at the fleet
                self.report.slow_samples += 1
                continue
            self.report.lease_samples += 1
            for lease, names in seen.items():
                most = self.report.most_holders.get(lease, 0)
                self.report.most_holders[lease] = max(most, len(names))
            await asyncio.sleep(0.2)

    # ------------------------------------------------------------------ load

    async def intake_load(self, session: aiohttp.ClientSession, inst: Instance) -> None:
        while self.running:
            if not inst.alive:
                await asyncio.sleep(0.05)
                continue
            external_id = f"web-{next(self.ids)}"
            body = {
                "channel": "web",
                "external_id": external_id,
                "sender": {"address": f"citizen{random.randrange(50)}@example.org"},
                "text": "路灯不亮",
            }
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.post(inst.base + "/v1/intake", json=body) as resp:
                    if resp.status == 202:
                        self.intake_ids.add(external_id)
            await asyncio.sleep(0.02)

    async def sms_load(self, session: aiohttp.ClientSession) -> None:
        sms = [i for i in self.fleet if i.sms]
        while self.running:
            inst = random.choice(sms)
            if inst.alive:
                n = next(self.ids)
                msg_id = f"00000000-0000-4000-8000-{n:012d}"
                query = get_url("短信投诉".encode("utf-16-be"), coding=2, charset="UTF-16BE",
                                msg_id=msg_id)
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(
                        f"{inst.base}/sms/kannel?{query}", headers=AUTH
                    ) as resp:
                        if resp.status == 200:
                            self.sms_ids.add(msg_id)
            await asyncio.sleep(0.05)

    async def telegram_load(self) -> None:
        update = 1000
        while self.running:
            update += 1
            self.bot.push({"update_id": update, "message": message(update, text=f"tg {update}")})
            self.pushed_updates.append(update)
            await asyncio.sleep(0.05)

    def confirmed_updates(self) -> list[int]:
        """Updates confirmed to Telegram: a later getUpdates asked for an offset past them."""
        offsets = [o for o in self.bot.offsets if o is not None]
        top = max(offsets, default=0)
        return [u for u in self.pushed_updates if u < top]

    # ------------------------------------------------------------------ the run

    async def kill_and_restart(self, session: aiohttp.ClientSession, cycle: int) -> None:
        seen = await self.holders(session)
        holder = seen.get(TELEGRAM_LEASE, [])
        by_name = {i.name: i for i in self.fleet}
        if cycle % 2 == 0 and holder:
            victim = by_name[holder[0]]
        else:
            victim = random.choice(self.fleet)
        was_holder = victim.name in holder
        killed_at = time.monotonic()
        victim.kill()
        self.report.kills += 1
        if was_holder:
            self.report.holder_kills += 1
        await asyncio.sleep(random.uniform(0.0, 1.0))
        victim.start()
        if was_holder:
            while True:
                now_held = [
                    n for n in (await self.holders(session)).get(TELEGRAM_LEASE, [])
                ]
                if now_held:
                    self.report.takeovers_s.append(time.monotonic() - killed_at)
                    break
                await asyncio.sleep(0.05)
        await self.healthy(session, victim)

    async def restart_redis(self) -> None:
        if self.group is not None:
            await asyncio.to_thread(self.group.failover)
            return
        # on this thread: the embedded server's parent-death signal follows the forking thread
        self.redis.kill_sync()
        await asyncio.sleep(random.uniform(0.2, 1.0))
        self.redis.start_sync()

    async def run(self) -> Report:
        started = time.monotonic()
        if self.group is not None:
            try:
                await asyncio.to_thread(self.group.start_sync)
            except BaseException:
                self.group.stop_sync()
                raise
        else:
            self.redis.start_sync()
        await self.bot.start()
        ttl = f"{self.ttl_s}s"
        ports = free_ports(self.n_instances)  # each instance comes back on its own port
        for n, port in enumerate(ports):
            redis = self.group.config() if self.group else f'url = "{self.redis.url}"'
            cfg = write_config(self.root, n, port, redis, self.bot, ttl)
            self.fleet.append(Instance(f"i{n}", port, cfg, sms=n > 0))
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                for inst in self.fleet:
                    inst.start()
                for inst in self.fleet:
                    await self.healthy(session, inst)
                load = [
                    *(asyncio.create_task(self.intake_load(session, i)) for i in self.fleet),
                    asyncio.create_task(self.sms_load(session)),
                    asyncio.create_task(self.telegram_load()),
                    asyncio.create_task(self.watch_leases(session)),
                ]
                redis_at = set(
                    random.sample(range(self.cycles), min(self.redis_restarts, self.cycles))
                )
                for cycle in range(self.cycles):
                    await asyncio.sleep(random.uniform(0.5, 1.5))
                    await self.kill_and_restart(session, cycle)
                    if cycle in redis_at:
                        await self.restart_redis()
                await asyncio.sleep(1.0)
                self.running = False
                await asyncio.gather(*load)
                await self.settle(session)
                await self.count()
            finally:
                self.running = False
                for inst in self.fleet:
                    inst.stop()
                await self.bot.stop()
                if self.group is not None:
                    self.group.stop_sync()
                else:
                    self.redis.stop_sync()
        self.report.most_polling = self.bot.most_polling
        self.report.conflicts = self.bot.conflicts
        self.report.seconds = time.monotonic() - started
        return self.report

    async def settle(self, session: aiohttp.ClientSession) -> None:
        """Wait until every spool is empty and every queued Telegram update is confirmed."""
        for inst in self.fleet:
            await self.healthy(session, inst)
        for _ in range(1200):
            depths = []
            for inst in self.fleet:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    depths.append(int((await self.ready(session, inst)).get("spool_depth", 1)))
            confirmed = len(self.confirmed_updates()) == len(self.pushed_updates)
            if len(depths) == len(self.fleet) and not any(depths) and confirmed:
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(
            f"the fleet did not settle: spool depths {depths}, "
            f"{len(self.confirmed_updates())} of {len(self.pushed_updates)} updates confirmed, "
            f"leases {await self.holders(session)}"
        )

    async def count(self) -> None:
        client = self.group.client() if self.group else aioredis.from_url(self.redis.url)
        try:
            entries = await client.xrange(Keys(PREFIX).contacts)
        finally:
            await client.aclose()
        seen: Counter[str] = Counter()
        for _, fields in entries:
            contact = orjson.loads(fields[b"contact"])
            seen[contact["external_id"]] += 1
        self.report.on_stream = len(entries)
        expected = set(self.intake_ids) | self.sms_ids
        expected |= {f"{BOT_ID_CHAT}:{u}" for u in self.confirmed_updates()}
        self.report.acknowledged.update(
            intake=len(self.intake_ids),
            sms=len(self.sms_ids),
            telegram=len(self.confirmed_updates()),
        )
        self.report.lost = sorted(k for k in expected if seen[k] == 0)
        self.report.duplicated = sorted(k for k, v in seen.items() if v > 1)
        self.report.unacknowledged = len(set(seen) - expected)


BOT_ID_CHAT = 777000001
"""The private chat of ``tests.channels.chat.fakes.message`` (external id
``<chat>:<message id>``)."""


async def soak(
    root: Path,
    *,
    instances: int = 3,
    cycles: int = 10,
    redis_restarts: int = 2,
    lease_ttl_s: float = 2.0,
    sentinel: bool = False,
) -> Report:
    return await Soak(root, instances, cycles, redis_restarts, lease_ttl_s, sentinel).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--redis-restarts", type=int, default=2)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument(
        "--sentinel",
        action="store_true",
        help="a master, two replicas and three Sentinels (min_replicas = 1); a Redis restart "
        "is then a failover: the master killed with SIGKILL",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = asyncio.run(
            soak(
                Path(tmp),
                instances=args.instances,
                cycles=args.cycles,
                redis_restarts=args.redis_restarts,
                lease_ttl_s=args.lease_ttl,
                sentinel=args.sentinel,
            )
        )
    for line in report.lines():
        print(line)
    if report.lost or report.duplicated:
        print("lost:", report.lost[:20], "duplicated:", report.duplicated[:20])
        sys.exit(1)


if __name__ == "__main__":
    main()
