"""MO per second through a carrier link (SMPP deliver_sm, CMPP_DELIVER) into Redis, next to a
bare codec baseline, in one run.

A separate process plays the carrier (SMSC or ISMG): it accepts one bind, then keeps ``window``
MO messages (UCS-2 Chinese, each with its own sender) unanswered at a time for ``seconds`` and
counts the answers with status 0. Targets, in alternating rounds:

- bare SMPP ESME: our codec parses each deliver_sm and answers at once (no Intake, no Redis);
- the gateway's ``smpp`` adapter: each deliver_sm becomes a contact in Redis before its answer;
- the gateway's ``cmpp`` adapter (3.0): the same through CMPP_DELIVER.

    .venv/bin/python bench/carrier_bench.py                  # about a minute
    .venv/bin/python bench/carrier_bench.py --seconds 3 --rounds 1 --windows 1 10
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.channels.sms import cmpp_pdu as C
from gateway.channels.sms import smpp_pdu as P

TEXT = "您好，我家楼下的路灯已经坏了一个星期，晚上出行很不安全，请尽快派人维修。"


def _frame_smpp(command_id: int, seq: int, body: bytes) -> bytes:
    return P.Pdu(command_id, 0, seq, body).encode()


async def _carrier(proto: str, window: int, seconds: float, port_out: Any) -> tuple[int, int,
                                                                                   list[float]]:
    """Accept one link, then drive MO through it; return (ok, errors, latencies)."""
    head_size = 16 if proto == "smpp" else 12
    linked: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
        asyncio.get_running_loop().create_future())

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not linked.done():
            linked.set_result((reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port_out.put(server.sockets[0].getsockname()[1])
    reader, writer = await linked
    sent: dict[int, float] = {}
    latencies: list[float] = []
    errors = 0
    slots = asyncio.Semaphore(window)
    ready = asyncio.Event()

    async def read() -> None:
        nonlocal errors
        while True:
            head = await reader.readexactly(head_size)
            if proto == "smpp":
                length, command_id, status, seq = struct.unpack(">IIII", head)
            else:
                (length, command_id, seq), status = struct.unpack(">III", head), 0
            body = await reader.readexactly(length - head_size)
            if proto == "smpp" and command_id in (P.BIND_TRANSCEIVER, P.ENQUIRE_LINK):
                writer.write(_frame_smpp(command_id | P.RESP, seq, P.message_id_body("SMSC")))
                ready.set()
            elif proto == "cmpp" and command_id in (C.CONNECT, C.ACTIVE_TEST):
                reply = bytes(20) + bytes([C.V30]) if command_id == C.CONNECT else b"\0"
                writer.write(C.Packet(command_id | C.RESP, seq, reply).encode())
                ready.set()
            elif seq in sent:
                if proto == "cmpp":
                    status = int.from_bytes(body[8:12], "big")
                if status == 0:
                    latencies.append(time.perf_counter() - sent.pop(seq))
                else:
                    sent.pop(seq)
                    errors += 1
                slots.release()

    reading = asyncio.create_task(read())
    await ready.wait()
    deadline = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < deadline:
        await slots.acquire()
        n += 1
        sender = f"86138{n % 100000000:08d}"
        content = TEXT.encode("utf-16-be")
        if proto == "smpp":
            sm = P.ShortMessage(sender, "12345", content, source_addr_ton=1, data_coding=8)
            data = _frame_smpp(P.DELIVER_SM, n, sm.body())
        else:
            d = C.Deliver(msg_id=(os.getpid() << 32) + n, dest_id="12345",
                          src_terminal_id=sender[2:], msg_content=content, msg_fmt=8)
            data = C.Packet(C.DELIVER, n, d.encode(C.V30)).encode()
        sent[n] = time.perf_counter()
        writer.write(data)
        await writer.drain()
    for _ in range(window):  # let the last ones come back
        await asyncio.wait_for(slots.acquire(), 30)
    reading.cancel()
    writer.close()
    server.close()
    return len(latencies), errors, latencies


def _carrier_process(proto: str, window: int, seconds: float, port_out: Any, out: Any) -> None:
    out.put(asyncio.run(_carrier(proto, window, seconds, port_out)))


async def _bare_esme(port: int, stop: asyncio.Event) -> None:
    """Our codec alone: parse each deliver_sm, answer status 0 at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_frame_smpp(P.BIND_TRANSCEIVER, 1, P.Bind("bench", "pw").body()))
    try:
        while not stop.is_set():
            head = await reader.readexactly(16)
            length, command_id, _, seq = P.header(head)
            body = await reader.readexactly(length - 16)
            if command_id == P.DELIVER_SM:
                P.ShortMessage.parse(body)
                writer.write(_frame_smpp(P.DELIVER_SM | P.RESP, seq, P.message_id_body("")))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _run(target: str, window: int, seconds: float, redis_url: str, tmp: Path,
               run: str) -> tuple[int, int, list[float]]:
    from gateway.server.config import parse_settings
    from gateway.server.runtime import Gateway

    ctx = mp.get_context("spawn")
    port_out, out = ctx.Queue(), ctx.Queue()
    proto = "cmpp" if target == "cmpp" else "smpp"
    proc = ctx.Process(target=_carrier_process, args=(proto, window, seconds, port_out, out))
    proc.start()
    port = await asyncio.to_thread(port_out.get)
    stop = asyncio.Event()
    gateway = None
    bare = None
    if target == "bare":
        bare = asyncio.create_task(_bare_esme(port, stop))
    else:
        table: dict[str, Any] = (
            {"type": "smpp", "host": "127.0.0.1", "port": port, "system_id": "bench",
             "password": "pw", "window": max(window, 1)} if target == "smpp" else
            {"type": "cmpp", "host": "127.0.0.1", "port": port, "source_addr": "901234",
             "shared_secret": "s", "version": "3.0"})
        settings, configs = parse_settings({
            "gateway": {"data_dir": str(tmp / run), "instance": f"bench-{run}"},
            "redis": {"url": redis_url, "prefix": f"bench-{run}"},
            "http": {"listen": "127.0.0.1:0"},
            "adapters": {target: table},
        })
        gateway = Gateway(settings, configs)
        await gateway.start()
    result = await asyncio.to_thread(out.get)
    await asyncio.to_thread(proc.join)
    stop.set()
    if bare is not None:
        bare.cancel()
    if gateway is not None:
        await gateway.stop()
    return result  # type: ignore[no-any-return]


async def main(seconds: float, rounds: int, windows: list[int]) -> None:
    from gateway.queueing.embedded import EmbeddedRedis

    load_before = os.getloadavg()[0]
    targets = [(t, w) for w in windows for t in ("bare", "smpp", "cmpp")]
    results: dict[tuple[str, int], list[tuple[int, int, list[float]]]] = {k: [] for k in targets}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = EmbeddedRedis(tmp / "redis")
        redis.start_sync()
        try:
            for r in range(rounds):
                for i, (target, window) in enumerate(targets):
                    results[(target, window)].append(
                        await _run(target, window, seconds, redis.url, tmp, f"r{r}t{i}"))
        finally:
            redis.stop_sync()
    load = os.getloadavg()[0]
    print(f"\nMO through one carrier link, {rounds} x {seconds:g}s per target "
          f"(load average {load_before:.1f} before, {load:.1f} after)")
    print(f"{'target':38} {'window':>6} {'MO/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    rates: dict[tuple[str, int], float] = {}
    names = {"bare": "bare codec ESME (no Intake)", "smpp": "smpp adapter -> Redis",
             "cmpp": "cmpp adapter (3.0) -> Redis"}
    for (target, window), runs in results.items():
        ok = sum(x[0] for x in runs)
        errors = sum(x[1] for x in runs)
        lat = sorted(v for x in runs for v in x[2])
        rate = ok / (seconds * len(runs))
        rates[(target, window)] = rate
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        print(f"{names[target]:38} {window:6d} {rate:8.0f} {p50:8.2f} {p99:8.2f} {errors:6d}")
    for window in windows:
        bare = rates[("bare", window)] or 1
        print(f"window {window}: smpp / bare {rates[('smpp', window)] / bare:.2f}, "
              f"cmpp / bare {rates[('cmpp', window)] / bare:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, nargs="+", default=[1, 10, 100])
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.windows))
