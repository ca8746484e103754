"""The PBX's own arrival stamp: the answer deadline runs from when the citizen called, even when
the gateway was slow or stopped (SIGSTOP of a real ``gateway serve``)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from gateway.channels.voice.intake import arrival
from gateway.contact.clock import MICROS_PER_SECOND, FixedClock, parse_time
from gateway.testing import eventually
from tests.channels.voice.fakes import agi_fixture, fake_call
from tests.channels.voice.serve import served_gateways

T0 = 1_795_594_483_000_000


def with_query(header: bytes, query: str) -> bytes:
    return header.replace(b"agi_network_script: intake\n",
                          b"agi_network_script: intake?" + query.encode() + b"\n")


def test_arrival_stamp_is_trusted_within_bounds() -> None:
    edge = T0 + 3 * MICROS_PER_SECOND
    # STRFTIME(,,%s.%6q) gives microseconds: the earlier stamp is the deadline's start
    assert arrival("1795594483.000287", edge, 120) == (T0 + 287, T0 + 287, True)
    assert arrival("1795594483", edge, 120) == (T0, T0, True)  # ${EPOCH}
    # a PBX clock a little ahead of ours: our stamp, theirs shown
    assert arrival("1795594484.5", T0, 120) == (T0, T0 + 1_500_000, True)
    # far off either way (a stale variable, a PBX clock minutes off): not trusted
    assert arrival("1795594083", edge, 120) == (edge, T0 - 400 * MICROS_PER_SECOND, False)
    assert arrival("1795594583", edge, 120)[0] == edge
    for bad in ("", "soon", "-5", "1e9", "${GATEWAY_ARRIVED}"):
        assert arrival(bad, edge, 120) == (edge, None, False)


async def test_contact_shows_both_stamps_and_the_deadline_runs_from_the_pbx(
    start_gateway: Any,
) -> None:
    clock = FixedClock(T0 + 9 * MICROS_PER_SECOND)  # the gateway sees the call 9 s late
    gw = await start_gateway(
        adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0"}}, clock=clock
    )
    header = with_query(agi_fixture("sip_call.agi"), "arrived=1795594483.250000")
    call = await fake_call(gw.adapters["asterisk"].port, header)  # type: ignore[attr-defined]
    assert call.variables["GATEWAY_ANSWER_BY"] == "1795594498"  # 483.25 + 15, whole seconds
    (contact,) = await gw.read_contacts()
    assert contact.received_at == T0 + 250_000
    assert contact.origin_at == T0 + 250_000
    assert parse_time(contact.meta["edge_received_at"]) == T0 + 9 * MICROS_PER_SECOND
    assert contact.deadline.due_at == T0 + 15_250_000


async def test_a_silent_fastagi_peer_is_cut_off_by_the_read_timeout(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"asterisk": {
        "type": "asterisk", "agi_listen": "127.0.0.1:0",
        "agi_read_timeout": "200ms", "session_timeout": "1h",
    }})
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.adapters["asterisk"].port  # type: ignore[attr-defined]
    )
    writer.write(b"agi_network: yes\nagi_network_script: intake\n")  # then nothing
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the gateway
    writer.close()


async def test_stopped_gateway_still_measures_from_the_pbx_stamp(
    start_gateway: Any, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """Defect: with the gateway stopped (SIGSTOP) the call sat in AGI() and was stamped when
    the gateway woke up, so the deadline ran late. A real ``gateway serve`` is stopped while
    Asterisk's FastAGI connection waits in its backlog, then continued."""
    async with served_gateways(tmp_path, redis_url, prefix) as (served,):
        reader = await start_gateway()  # same Redis and prefix, to read what was written
        served.signal(signal.SIGSTOP)
        called = time.time_ns() // 1000  # what ${STRFTIME(,,%s.%6q)} gives in the dialplan
        stamp = f"{called // MICROS_PER_SECOND}.{called % MICROS_PER_SECOND:06d}"
        header = with_query(agi_fixture("sip_call.agi"), f"arrived={stamp}")
        pending = asyncio.create_task(fake_call(served.agi_port, header))
        await asyncio.sleep(1.5)  # the call waits in AGI(): Asterisk has no read timeout
        assert not pending.done()
        served.signal(signal.SIGCONT)
        call = await asyncio.wait_for(pending, 30)
        assert call.variables["GATEWAY_STATUS"] == "OK"
        (contact,) = await reader.read_contacts()
        edge = parse_time(contact.meta["edge_received_at"])
        assert edge - called >= 1_500_000  # the gateway itself saw it at least 1.5 s late
        assert contact.received_at == called  # the deadline runs from the dialplan's stamp
        assert contact.deadline.due_at == called + 15 * MICROS_PER_SECOND


async def test_readiness_fails_while_the_event_loop_lags(start_gateway: Any) -> None:
    """FastAGI answers come late when the loop is late: /readyz says so, so that hagi:// or a
    load balancer picks another gateway, and recovers when the loop does."""
    gw = await start_gateway(adapters={"asterisk": {
        "type": "asterisk", "agi_listen": "127.0.0.1:0", "max_loop_lag": "150ms",
    }})
    ok, _ = gw.supervisor.ready()
    assert ok
    stop = asyncio.Event()

    async def hog() -> None:  # CPU-bound work on the loop, as an overloaded gateway has
        while not stop.is_set():
            time.sleep(0.4)
            await asyncio.sleep(0.01)

    task = asyncio.create_task(hog())
    try:
        async def degraded() -> bool:
            ok, loops = gw.supervisor.ready()
            return not ok and loops["asterisk-loop-lag"]["state"] == "degraded"  # type: ignore[index]

        await eventually(degraded)
        assert await degraded()
    finally:
        stop.set()
        await task
    await eventually(lambda: gw.supervisor.ready()[0])
    assert gw.supervisor.ready()[0]
