"""Restarts and faults: a gateway restarted mid-call, calls that never reached FastAGI, an
Asterisk restart, a stopped (SIGSTOP) gateway. AMI transcripts replayed over TCP, real Redis."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from gateway.channels.voice.report import voice_report
from gateway.contact.clock import FixedClock
from gateway.records import Contact
from gateway.testing import eventually
from tests.channels.voice.fakes import FakeAmi, agi_fixture, ami_fixture, fake_call
from tests.channels.voice.serve import configure
from tests.channels.voice.test_ami import (
    SECRET,
    T0,
    events_of,
    intake_call,
    of_type,
    voice_with_ami,
)
from tests.harness import free_ports

UID = "1795594483.1"


def split_after(transcript: bytes, event: str) -> tuple[bytes, bytes]:
    """The transcript up to and including the first ``event``, and the rest."""
    marker = f"Event: {event}\r\n".encode()
    start = transcript.index(marker)
    end = transcript.index(b"\r\n\r\n", start) + 4
    return transcript[:end], transcript[end:]


async def callbacks_of(gw: Any, n: int = 1) -> list[Contact]:
    async def probe() -> list[Contact] | None:
        found = [c for c in await gw.read_contacts() if c.meta.get("callback")]
        return found if len(found) >= n else None

    return await eventually(probe)  # type: ignore[no-any-return]


async def test_gateway_restarted_while_the_call_waits_still_records_it(
    start_gateway: Any,
) -> None:
    """Defect: the tracker lived in one process; a restarted gateway never wrote the outcome
    of a call that was waiting in the queue, and made no callback."""
    ami = FakeAmi([])
    first = await voice_with_ami(start_gateway, ami)
    contact_id = await intake_call(first)
    joined, rest = split_after(ami_fixture("abandoned.ami", contact_id=contact_id),
                               "QueueCallerJoin")
    # the first gateway sees the call join the queue ...
    ami.sessions.append((joined, False))
    client = first.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    tracker = first.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    await eventually(lambda: tracker.calls.get(UID) is not None and tracker.calls[UID].queue)
    store = first.adapters["asterisk"].store  # type: ignore[attr-defined]

    async def saved() -> bool:  # the state write after the event (a 0.1 s sleep before)
        raw = (await store.load()).get(UID)
        return raw is not None and json.loads(raw).get("queue") == "hotline"

    await eventually(saved)
    # ... and stops (the call is still waiting); a new process takes over the PBX
    await first.stop()
    ami.live_channels = [UID]  # Status after the new login: the caller still waits
    ami.sessions.append((rest, False))
    second = await voice_with_ami(start_gateway, ami)
    (event,) = await events_of(second, "abandoned")
    assert event.contact_id == contact_id
    assert event.at == T0 + 25_731_002
    assert event.detail["queue"] == "hotline"  # known from the first process's state
    (callback,) = await callbacks_of(second)
    assert callback.thread == contact_id
    assert callback.sender.address == "+8613800138000"
    assert callback.recipient == "12345"


async def test_call_that_never_reached_fastagi_gets_a_contact_from_ami(
    start_gateway: Any,
) -> None:
    """Defect: calls made while the gateway's FastAGI was unreachable got no contact at all.
    The dialplan's arrival stamp (GATEWAY_ARRIVED) is its received_at."""
    ami = FakeAmi([(ami_fixture("agi_failed.ami"), False)])
    gw = await voice_with_ami(start_gateway, ami, languages={"12345": "zh"})

    async def made() -> list[Contact] | None:
        found = [c for c in await gw.read_contacts() if c.external_id == UID]
        return found or None

    (contact,) = await eventually(made)
    assert contact.meta["reached_agi"] is False
    assert contact.received_at == T0 + 287  # GATEWAY_ARRIVED, not the queue join 2 s later
    assert contact.origin_at == T0 + 287
    assert contact.sender.address == "+8613800138000"
    assert contact.recipient == "12345"
    assert contact.language == "zh"
    assert contact.deadline.due_at == T0 + 287 + 15_000_000
    (event,) = await events_of(gw, "abandoned")
    assert event.contact_id == contact.id
    assert event.met is False
    (callback,) = await callbacks_of(gw)
    assert callback.thread == contact.id
    # the same call's intake arriving late (a stopped gateway resumed) is the same contact
    again = await intake_call(gw)
    assert again == contact.id
    # `gateway report` counts the call (defect: calls made while the gateway was down were
    # missing) and keeps its callback out of the calls
    report = voice_report(await gw.read_contacts(), await gw.read_events(),
                          since=T0 - 1_000_000, until=T0 + 3_600_000_000)
    assert (report.offered, report.abandoned, report.answered) == (1, 1, 0)
    assert report.callbacks == 1


async def test_asterisk_restart_closes_unanswered_calls_honestly_and_calls_back(
    start_gateway: Any,
) -> None:
    """Defect: the ``closed`` event of a call cut by an Asterisk restart said ``met: true``,
    though nobody answered, and no callback was made."""
    clock = FixedClock(T0)
    ami = FakeAmi([], uptime=1)
    gw = await voice_with_ami(start_gateway, ami, clock)
    contact_id = await intake_call(gw)
    clock.advance(5)  # Asterisk restarts 4 s into the call; the next login says Uptime: 1
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    (closed,) = await events_of(gw, "closed")
    assert closed.contact_id == contact_id
    assert closed.detail == {"reason": "asterisk restarted", "answered": False}
    assert closed.at <= closed.due_at  # within the deadline, and still not met
    assert closed.met is False
    (callback,) = await callbacks_of(gw)
    assert callback.thread == contact_id
    assert callback.meta["reason"] == "asterisk restarted"


async def test_only_one_instance_follows_a_pbx(start_gateway: Any) -> None:
    """Two gateways on one Redis and one Asterisk: one AMI follower (the lease), one outcome;
    when it stops, the other takes over with the open calls."""
    ami = FakeAmi([])
    first = await voice_with_ami(start_gateway, ami)
    second = await start_gateway(
        adapters={"asterisk": {
            "type": "asterisk", "agi_listen": "127.0.0.1:0", "linkedid_lookup": True,
            "ami": {"host": "127.0.0.1", "port": ami.port, "username": "gateway",
                    "secret": SECRET, "reconnect_min": "20ms", "reconnect_max": "100ms"},
        }},
        fleet={"lease_ttl": "600ms"},
        clock=FixedClock(T0),
    )
    await eventually(lambda: ami.accepted == 1)  # the first follows AMI (it may log in late)
    await asyncio.sleep(0.3)  # time for the second to take the lease, were it free
    assert not second.adapters["asterisk"].tracker.active  # type: ignore[attr-defined]
    assert ami.accepted == 1
    contact_id = await intake_call(second)  # FastAGI works on both
    await first.stop()
    ami.live_channels = [UID]
    ami.channel_info[UID] = {"variables": {"GATEWAY_CONTACT_ID": contact_id}}
    ami.sessions.append((ami_fixture("abandoned.ami", contact_id=contact_id), False))
    (event,) = await events_of(second, "abandoned")
    assert event.contact_id == contact_id
    assert len(of_type(await second.read_events(), "abandoned")) == 1


async def test_live_capture_of_an_answered_call(start_gateway: Any) -> None:
    """``live_answered.ami``: the events a real Asterisk 22.10.1 sent the sample manager user
    (its event filters) for one call through the sample dialplan into a queue whose member
    answers at once; the arrival stamp and the edge stamp are the ones that call had."""
    edge = 1_796_083_602_890_081
    ami = FakeAmi([])
    gw = await voice_with_ami(start_gateway, ami, FixedClock(edge))
    header = agi_fixture("sip_call.agi").replace(b"1795594483.1", b"1796083602.1").replace(
        b"agi_network_script: intake\n",
        b"agi_network_script: intake?arrived=1796083602.887972&linkedid=1796083602.0\n")
    call = await fake_call(gw.adapters["asterisk"].port, header)  # type: ignore[attr-defined]
    contact_id = call.variables["GATEWAY_CONTACT_ID"]
    ami.sessions.append((ami_fixture("live_answered.ami", contact_id=contact_id), False))
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    (event,) = await events_of(gw, "answered")
    assert event.contact_id == contact_id
    assert event.at == 1_796_083_602_899_922  # AgentConnect's Timestamp
    assert event.elapsed_ms == 11  # from the dialplan's stamp, as the live run recorded
    assert event.met is True
    assert event.detail["member"] == "Live Seat"
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    await eventually(lambda: not tracker.calls)  # the root channel's Hangup ends it
    assert of_type(await gw.read_events(), "abandoned") == []


async def test_outcome_waiting_for_a_spooled_contact_survives_the_followers_kill(
    start_gateway: Any, tmp_path: Path, redis_url: str, prefix: str, redis_client: Any
) -> None:
    """Defect: an outcome (and its callback) that could not be written yet lived only in the
    follower's memory: a follower killed meanwhile lost it for good. Three real processes:
    FastAGI on one whose Redis is unreachable (the contact waits in its spool), the AMI
    follower killed -9 while the outcome waits for that contact, a successor that takes the
    lease; then the spooling instance gets its Redis back and replays the contact."""
    ami = FakeAmi([])
    await ami.start()
    follow = (f'settle = "0s"\nami = {{ host = "127.0.0.1", port = {ami.port}, '
              f'username = "gateway", secret = "{SECRET}", reconnect_min = "20ms", '
              f'reconnect_max = "100ms" }}')
    fleet = '[fleet]\nlease_ttl = "1s"'
    ports = free_ports(6)  # the three instances' ports, all distinct
    spooling = configure(tmp_path, 1, "unix:///nonexistent/redis.sock", prefix,
                         ports=(ports[0], ports[1]))
    follower = configure(tmp_path, 2, redis_url, prefix, follow, fleet, ports=(ports[2], ports[3]))
    successor = configure(tmp_path, 3, redis_url, prefix, follow, fleet,
                          ports=(ports[4], ports[5]))
    try:
        await spooling.start()
        call = await fake_call(spooling.agi_port, agi_fixture("sip_call.agi"))
        assert call.variables["GATEWAY_STATUS"] == "SPOOLED"
        contact_id = call.variables["GATEWAY_CONTACT_ID"]
        ami.sessions.append((ami_fixture("abandoned.ami", contact_id=contact_id), False))
        await follower.start()
        calls = f"{{{prefix}}}:state:asterisk:calls:127.0.0.1:{ami.port}"

        async def waiting() -> bool:  # decided, not written: the contact is not in Redis
            raw = await redis_client.hget(calls, UID)
            record = json.loads(raw) if raw else {}
            return bool(record.get("outcome") == "abandoned" and not record["written"])

        await eventually(waiting, 30)
        follower.signal(signal.SIGKILL)
        await successor.start()
        spooling.signal(signal.SIGKILL)  # back with its Redis: the spool is replayed
        spooling.config.write_text(spooling.config.read_text().replace(
            "unix:///nonexistent/redis.sock", redis_url))
        await spooling.start()
        reader = await start_gateway()  # same Redis and prefix, to read what was written
        (event,) = await events_of(reader, "abandoned", timeout=30)
        assert event.contact_id == contact_id
        assert event.at == T0 + 25_731_002
        (callback,) = await callbacks_of(reader)
        assert callback.thread == contact_id

        async def dropped() -> bool:  # done: the record is dropped, at the tracker's next flush
            return not await redis_client.hexists(calls, UID)

        await eventually(dropped)
    finally:
        for gw in (spooling, follower, successor):
            gw.stop()
        await ami.stop()
