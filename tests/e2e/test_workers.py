"""``gateway serve --workers 2`` as real processes: HTTP, SMTP and FastAGI each on one port
served by both workers; a worker killed with SIGKILL mid-load loses no acknowledged contact and
its replacement replays its spool; one holder per lease; SIGTERM to the parent exits 0 and
leaves no worker and no Valkey behind."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.store import decode_fields
from gateway.server.workers import run_dir
from gateway.testing import eventually
from tests.channels.chat.fakes import BOT_ID, BOT_TOKEN, FakeBotApi
from tests.channels.voice.fakes import agi_fixture, fake_call
from tests.harness import free_ports

PREFIX = "workers"


def write_config(
    tmp: Path, http: int, smtp: int, agi: int, redis_url: str = "", extra: str = ""
) -> Path:
    cfg = tmp / "gateway.toml"
    cfg.write_text(
        f"""
[gateway]
data_dir = "{tmp / "var"}"
workers = 2

[redis]
url = "{redis_url}"
prefix = "{PREFIX}"
write_timeout = "300ms"

[http]
listen = "127.0.0.1:{http}"

[api]
open_to_loopback = true

[fleet]
lease_ttl = "6s"  # a 2 s Redis outage costs no lease; a killed holder's is taken over

[limits]
sender_contacts = 0

[adapters.mailbox]
type = "smtp"
listen = "127.0.0.1:{smtp}"
domains = ["localhost"]

[adapters.pbx]
type = "asterisk"
agi_listen = "127.0.0.1:{agi}"
{extra}"""
    )
    return cfg


class Workers:
    """A ``gateway serve`` parent and a look at each worker through its own socket."""

    def __init__(self, tmp: Path, redis_url: str = "", extra: str = "") -> None:
        self.http, self.smtp, self.agi = free_ports(3)
        self.data_dir = tmp / "var"
        self.cfg = write_config(tmp, self.http, self.smtp, self.agi, redis_url, extra)
        self.log = tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "-c", str(self.cfg)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                process_group=0,  # a group of its own, as a shell's job: Ctrl-C is killpg
            )

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def worker(self, slot: int) -> dict[str, Any] | None:
        """Worker ``slot``'s /readyz (its pid, leases, spool), or None while it does not answer."""
        path = run_dir(self.data_dir) / f"worker-{slot}.sock"
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(path)),
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as session,
                session.get("http://worker/readyz") as resp,
            ):
                detail: dict[str, Any] = await resp.json()
                return detail
        except (OSError, aiohttp.ClientError, TimeoutError):
            return None

    async def wait_serving(self) -> dict[int, int]:
        """Both workers answer; return their pids by slot."""
        assert self.proc is not None
        pids: dict[int, int] = {}

        async def both() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"gateway exited: {self.tail()}")
            for slot in (0, 1):
                detail = await self.worker(slot)
                if detail is None:
                    return False
                pids[slot] = detail["worker"]["pid"]
            return True

        await eventually(both, timeout_s=90, step_s=0.1)
        return pids

    def children(self) -> list[int]:
        assert self.proc is not None
        pid = self.proc.pid
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mail(port: int, n: int) -> str:
    """Send one message; the contact id from the 250, or '' when it was not taken."""
    body = f"From: citizen{n}@example.org\r\nTo: 12345@localhost\r\nSubject: n{n}\r\n\r\nroad\r\n"
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail(f"citizen{n}@example.org")
            client.rcpt("12345@localhost")
            code, reply = client.data(body.encode())
    except (OSError, smtplib.SMTPException):
        return ""
    text = reply.decode()
    return text.rsplit(" ", 1)[-1] if code == 250 else ""


async def call(port: int, n: int) -> str:
    """One FastAGI intake; the contact id the gateway set, or '' when it was not taken."""
    header = agi_fixture("sip_call.agi").replace(b"1795594483.1", f"9{n}.1".encode())
    try:
        transcript = await fake_call(port, header)
    except OSError:
        return ""
    variables = transcript.variables
    if variables.get("GATEWAY_STATUS") in ("OK", "SPOOLED"):
        return variables.get("GATEWAY_CONTACT_ID", "")
    return ""


async def stream_ids(url: str) -> Counter[str]:
    client = aioredis.Redis.from_url(url)
    try:
        entries = await client.xrange(f"{{{PREFIX}}}:contacts")
    finally:
        await client.aclose()
    return Counter(decode_fields(fields)["id"] for _, fields in entries)


async def test_two_workers_share_each_port_and_sigterm_leaves_no_process(tmp_path):
    gw = Workers(tmp_path)
    gw.start()
    try:
        await gw.wait_serving()
        children = gw.children()
        assert len(children) == 3  # two workers and the embedded Valkey
        acked: list[str] = []
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection each time
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(24):
                body = {"channel": "web", "external_id": f"w{n}", "text": "路灯不亮"}
                async with session.post(
                    f"http://127.0.0.1:{gw.http}/v1/intake", json=body
                ) as resp:
                    assert resp.status == 202
                    acked.append((await resp.json())["id"])
            async with session.get(f"http://127.0.0.1:{gw.http}/metrics") as resp:
                metrics = await resp.text()
        for n in range(6):
            acked.append(await asyncio.to_thread(mail, gw.smtp, n))
            acked.append(await call(gw.agi, n))
        assert all(acked)
        # whichever worker took the scrape, /metrics shows both, each counting what it took
        served = {
            line.split('worker="')[1][0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith('gateway_contacts_enqueued_total{adapter="api"')
        }
        assert set(served) == {"0", "1"} and sum(served.values()) == 24
        on_stream = await stream_ids(EmbeddedRedis(gw.data_dir).url)
        assert sorted(on_stream) == sorted(acked) and max(on_stream.values()) == 1
        assert gw.stop() == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived the parent"
    finally:
        gw.kill()


async def test_readyz_on_the_shared_port_answers_for_every_worker(tmp_path):
    """The shared port's /readyz answered for whichever worker took the connection, so a
    stopped or unready worker was seen only by the probes the kernel happened to give it. Now
    any worker answers for the instance: each worker's own state under ``workers``, 503 while
    one of them does not answer (here: SIGSTOPped), 200 again once it does."""
    gw = Workers(tmp_path)
    gw.start()
    try:
        pids = await gw.wait_serving()

        async def readyz() -> tuple[int, dict[str, Any]] | None:
            try:
                async with (
                    aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(force_close=True),
                        timeout=aiohttp.ClientTimeout(total=3),
                    ) as session,
                    session.get(f"http://127.0.0.1:{gw.http}/readyz") as resp,
                ):
                    return resp.status, await resp.json()
            except (aiohttp.ClientError, TimeoutError):  # taken by the stopped worker
                return None

        for _ in range(8):  # new connections: both workers answer some of them
            status, body = await eventually(readyz)
            assert status == 200 and body["status"] == "ready", body
            workers = body["workers"]
            assert {k: w["worker"]["pid"] for k, w in workers.items()} == {
                str(k): pid for k, pid in pids.items()
            }
            assert all(w["ready"] and w["redis"] and w["spool"] for w in workers.values())
            assert body["redis"] is True and body["spool_depth"] == 0
        os.kill(pids[1], signal.SIGSTOP)
        try:
            status, body = await eventually(readyz, timeout_s=60)
            assert status == 503 and body["status"] == "unready", body
            assert body["workers"]["1"] == {"ready": False, "answering": False}
            assert body["workers"]["0"]["ready"] is True
            assert body["workers"]["0"]["worker"]["pid"] == pids[0]
        finally:
            os.kill(pids[1], signal.SIGCONT)

        async def ready_again() -> bool:
            answer = await readyz()
            return answer is not None and answer[0] == 200

        await eventually(ready_again, timeout_s=60)
        assert gw.stop() == 0
    finally:
        gw.kill()


async def test_ctrl_c_stops_the_workers_then_valkey_and_leaves_no_process(tmp_path):
    """A terminal's Ctrl-C is SIGINT to the whole foreground process group: the parent, its
    workers and (before the fix) the embedded Valkey, which then died under the draining
    workers and was restarted by the parent's supervisor mid-shutdown (an ERROR traceback on
    every `make run` stopped with Ctrl-C). Valkey has its own group: the parent stops it last.
    A deprecated config key is warned about once, by the parent (it was once per process)."""
    gw = Workers(tmp_path, extra='[adapters.o]\ntype = "open311"\nphone_region = "FR"\n')
    gw.start()
    try:
        await gw.wait_serving()
        children = gw.children()
        assert len(children) == 3
        assert gw.proc is not None
        os.killpg(gw.proc.pid, signal.SIGINT)
        assert gw.proc.wait(timeout=90) == 0, gw.tail()
        for pid in children:
            assert not Path(f"/proc/{pid}").exists(), f"pid {pid} outlived the parent"
        log = gw.log.read_text(errors="replace")
        assert "embedded-redis failed" not in log and "started again" not in log, gw.tail()
        assert log.count("adapters.o.phone_region: deprecated") == 1, gw.tail()
    finally:
        gw.kill()


async def test_a_worker_killed_mid_load_loses_nothing_and_its_spool_is_replayed(
    tmp_path, own_redis
):
    """HTTP, SMTP and FastAGI clients run all along. Redis is killed, so both workers spool;
    worker 0 is killed with SIGKILL while its spool holds contacts; Redis comes back. Every
    acknowledged contact ends up on the stream once, worker 0's replacement empties the dead
    worker's spool, and no lease (watcher, surge, a Telegram poller) is ever held by
    both workers."""
    bot = FakeBotApi()  # a Telegram bot in polling mode: its poller is one more singleton
    await bot.start()
    gw = Workers(
        tmp_path,
        own_redis.url,
        f"""
[adapters.tg]
type = "telegram"
token = "{BOT_TOKEN}"
mode = "polling"
poll_timeout = "1s"
api_base = "{bot.api_base}"
file_base = "{bot.file_base}"
""",
    )
    gw.start()
    acked: list[str] = []
    stop = asyncio.Event()
    holders: Counter[str] = Counter()  # the most workers seen holding each lease at once

    async def web(n: int, session: aiohttp.ClientSession) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body = {"channel": "web", "external_id": f"c{n}-{i}", "text": "load"}
            try:
                async with session.post(
                    f"http://127.0.0.1:{gw.http}/v1/intake", json=body
                ) as resp:
                    if resp.status == 202:
                        acked.append((await resp.json())["id"])
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.05)

    async def mails() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            acked.append(await asyncio.to_thread(mail, gw.smtp, n))

    async def calls() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            acked.append(await call(gw.agi, n))

    leases_seen = asyncio.Event()
    singletons = {"watcher", "surge", f"telegram:{BOT_ID}"}
    held_now: Counter[str] = Counter()

    async def watch_leases() -> None:
        while not leases_seen.is_set():
            seen: Counter[str] = Counter()
            for detail in await asyncio.gather(gw.worker(0), gw.worker(1)):
                seen.update((detail or {}).get("leases", {}).keys())
            for name, count in seen.items():
                holders[name] = max(holders[name], count)
            held_now.clear()
            held_now.update(seen)
            await asyncio.sleep(0.1)

    async def spooled(slot: int) -> bool:
        detail = await gw.worker(slot)
        return detail is not None and detail["spool_depth"] > 0

    try:
        pids = await gw.wait_serving()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            load = [asyncio.create_task(web(n, session)) for n in range(4)]
            load += [asyncio.create_task(mails()), asyncio.create_task(calls())]
            watcher = asyncio.create_task(watch_leases())
            await asyncio.sleep(1.0)
            own_redis.kill_sync()
            await eventually(lambda: spooled(0), timeout_s=30, step_s=0.1)
            os.kill(pids[0], signal.SIGKILL)
            await asyncio.sleep(0.5)
            own_redis.start_sync()
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*load)

        async def replaced_and_drained() -> bool:
            details = [await gw.worker(0), await gw.worker(1)]
            return (
                all(d is not None and d["spool_depth"] == 0 for d in details)
                and details[0] is not None
                and details[0]["worker"]["pid"] != pids[0]
            )

        await eventually(replaced_and_drained, timeout_s=60, step_s=0.2)
        # the killed worker's leases taken over: each singleton held by one worker again
        await eventually(lambda: singletons <= set(held_now), timeout_s=60, step_s=0.2)
        leases_seen.set()
        await watcher
        assert not list((gw.data_dir / "spool" / "worker-0").glob("segment-*.log"))
        taken = [contact_id for contact_id in acked if contact_id]
        on_stream = await stream_ids(own_redis.url)
        assert not set(taken) - set(on_stream), "acknowledged but not on the stream"
        assert max(on_stream.values()) == 1
        assert max(holders.values()) == 1, holders
        assert gw.stop() == 0
    finally:
        leases_seen.set()
        gw.kill()
        await bot.stop()


async def test_a_worker_that_cannot_start_stops_the_whole_start_with_an_error(tmp_path):
    """Worker 0's spool folder is a file: that worker fails before it ever serves, so the
    parent stops the other worker and Valkey and exits non-zero instead of restarting it for
    ever; the ports are free again."""
    gw = Workers(tmp_path)
    (gw.data_dir / "spool").mkdir(parents=True, mode=0o700)
    (gw.data_dir / "spool" / "worker-0").write_text("not a folder")
    gw.start()
    assert gw.proc is not None
    code = await asyncio.to_thread(gw.proc.wait, 90)
    assert code != 0
    assert "worker 0 exited" in gw.tail() and "before it served" in gw.tail()
    assert EmbeddedRedis(gw.data_dir).leftover_pids() == []
    for port in (gw.http, gw.smtp, gw.agi):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nobody listens or holds it any more


async def test_a_crash_looping_workers_spool_is_handed_to_a_serving_worker(
    tmp_path, own_redis
):
    """Worker 1 holds spooled contacts (Redis was away) and is killed; every start of its
    replacement then fails (its spool's quarantine folder is a file), so its spool waited for
    ever. The parent hands the segments of a worker that has not served for 10 s to a serving
    one, whose replayer puts them on the stream."""
    gw = Workers(tmp_path, own_redis.url)
    gw.start()
    try:
        pids = await gw.wait_serving()
        own_redis.kill_sync()
        acked: list[str] = []
        connector = aiohttp.TCPConnector(force_close=True)  # the kernel picks a worker each time
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker_1_spooled() -> bool:
                body = {"channel": "web", "external_id": f"s{len(acked)}", "text": "路灯不亮"}
                async with session.post(
                    f"http://127.0.0.1:{gw.http}/v1/intake", json=body
                ) as resp:
                    assert resp.status == 202
                    acked.append((await resp.json())["id"])
                detail = await gw.worker(1)
                return detail is not None and detail["spool_depth"] > 0

            await eventually(worker_1_spooled, timeout_s=60, step_s=0.05)
        spool = gw.data_dir / "spool" / "worker-1"
        (spool / "quarantine").rmdir()
        (spool / "quarantine").write_text("not a folder: every start of worker 1 fails\n")
        os.kill(pids[1], signal.SIGKILL)
        own_redis.start_sync()

        async def all_on_stream() -> bool:
            return not set(acked) - set(await stream_ids(own_redis.url))

        await eventually(all_on_stream, timeout_s=90, step_s=0.5)
        assert max((await stream_ids(own_redis.url)).values()) == 1
        assert not list(spool.glob("segment-*.log"))
        assert "handed to worker 0" in gw.log.read_text(errors="replace"), gw.tail()
    finally:
        gw.kill()
