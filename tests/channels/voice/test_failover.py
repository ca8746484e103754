"""No single point of failure for FastAGI: the sample dialplan tries each gateway in turn, and
skips one that is down (connect refused) or stopped (connect accepted, nothing answers).

Two real ``gateway serve`` processes share one Redis; a client plays the sample dialplan's
intake as Asterisk 22 runs it (``tests.channels.voice.fakes.dialplan_intake``)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

from gateway.contact.clock import MICROS_PER_SECOND, parse_time
from gateway.testing import eventually
from tests.channels.voice.fakes import agi_fixture, dialplan_intake
from tests.channels.voice.serve import served_gateways

ROOT = Path(__file__).resolve().parents[3]
WAIT = 3.0  # the sample's GATEWAY_AGI_WAIT
ANSWERS = 60.0  # the wait on a gateway that must answer (a bound: the machine may be loaded)


def call(uniqueid: str) -> tuple[bytes, int]:
    """A FastAGI header block for a new call, with the dialplan's arrival stamp; the stamp."""
    called = time.time_ns() // 1000  # what ${STRFTIME(,,%s.%6q)} gives at the first priority
    stamp = f"{called // MICROS_PER_SECOND}.{called % MICROS_PER_SECOND:06d}"
    header = agi_fixture("sip_call.agi").replace(
        b"agi_uniqueid: 1795594483.1\n", f"agi_uniqueid: {uniqueid}\n".encode()
    ).replace(b"agi_network_script: intake\n",
              f"agi_network_script: intake?arrived={stamp}\n".encode())
    return header, called


def test_sample_dialplan_tries_the_next_gateway_when_one_is_down_or_stopped() -> None:
    """Defect: the sample dialplan named one gateway; with it down every call took the fail
    path (no FastAGI contact), and with it stopped (SIGSTOP) a call waited in AGI() until the
    process ran again, since Asterisk has no FastAGI read timeout."""
    text = (ROOT / "deploy/asterisk/extensions.conf").read_text()
    block = text.split("\n[globals]\n", 1)[1].split("\n[", 1)[0]
    found = dict(re.findall(r"^(GATEWAY_AGI_\w+)=(.*)$", block, re.M))
    assert found["GATEWAY_AGI_1"].startswith("agi://") and "GATEWAY_AGI_2" in found
    assert float(found["GATEWAY_AGI_WAIT"]) == WAIT
    intake = text.split("\n[from-citizens]\n", 1)[1].split("\n[", 1)[0]
    steps = [line.split("=>", 1)[1].strip() for line in intake.splitlines()
             if line.lstrip().startswith(("exten", "same"))]
    at = steps.index("n(try),Set(TIMEOUT(absolute)=${GATEWAY_AGI_WAIT})")
    assert steps[at + 1].startswith("n,AGI(${GATEWAY_AGI_${GATEWAY_TRY}}?arrived=")
    assert steps[at + 2] == "n,Set(TIMEOUT(absolute)=0)"
    assert "n,Set(AGIEXITONHANGUP=yes)" in steps[:at]  # AGI() returns when the timeout fires
    assert "T,1,Goto(${GATEWAY_DIALLED},next)" in steps
    assert 'n,GotoIf($["${GATEWAY_AGI_${GATEWAY_TRY}}" != ""]?try:failed)' in steps


async def test_a_killed_or_stopped_gateway_is_skipped_and_the_call_recorded_once(
    start_gateway: Any, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    async with served_gateways(tmp_path, redis_url, prefix, count=2) as (first, second):
        reader = await start_gateway()  # same Redis and prefix, to read what was written
        ports = [first.agi_port, second.agi_port]

        header, _ = call("1795594483.1")
        both_up = await dialplan_intake(ports, header, [ANSWERS, ANSWERS])
        assert both_up.attempts == [(first.agi_port, "OK")]

        first.signal(signal.SIGKILL)
        header, _ = call("1795594483.2")
        killed = await dialplan_intake(ports, header, [ANSWERS, ANSWERS])
        assert killed.attempts == [(first.agi_port, "FAILURE"), (second.agi_port, "OK")]

        await first.start()
        accepted, _ = await first.agi_sessions()
        first.signal(signal.SIGSTOP)  # the kernel still accepts: connect succeeds
        header, called = call("1795594483.3")
        stopped = await dialplan_intake(ports, header, [WAIT, ANSWERS])
        assert stopped.attempts == [(first.agi_port, "T"), (second.agi_port, "OK")]

        # The stopped gateway runs again and reads the header Asterisk left in its backlog:
        # it deduplicates on the uniqueid, so the call still has one contact.
        first.signal(signal.SIGCONT)

        async def stale_session_done() -> bool:
            return await first.agi_sessions() == (accepted + 1, 0.0)

        await eventually(stale_session_done, timeout_s=30)
        contacts = await reader.read_contacts()
        assert sorted(c.external_id for c in contacts) == [
            "1795594483.1", "1795594483.2", "1795594483.3"
        ]
        late = next(c for c in contacts if c.external_id == "1795594483.3")
        assert late.received_at == called  # the deadline runs from the dialplan's stamp
        assert parse_time(late.meta["edge_received_at"]) - called >= WAIT * MICROS_PER_SECOND
