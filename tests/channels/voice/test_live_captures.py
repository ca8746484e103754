"""Manager traffic captured from a real Asterisk 22.10.1 (fixtures/README.md): an Asterisk
restart and an Asterisk kill with a call waiting, a gateway reconnect with one call waiting and
one answered (the real ``Status`` answer), dialled callbacks (the real ``Originate`` answers),
replayed over TCP into a gateway on real Redis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.channels.voice.server import AgiSession, FastAgiServer
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK, FixedClock
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.voice.fakes import (
    FakeAmi,
    agi_fixture,
    ami_fixture,
    fake_call,
    live_originates,
    live_sessions,
    live_transcript,
    replay_asterisk,
)
from tests.channels.voice.test_ami import events_of, of_type, voice_with_ami
from tests.channels.voice.test_dial import outcome, reply
from tests.channels.voice.test_queue_log import DOWN, HISTORY, ROUTING
from tests.channels.voice.test_restarts import callbacks_of
from tools.agi_mset_check import VALUES, check

S = MICROS_PER_SECOND


async def intake(gw: Gateway, uniqueid: str, arrived: str, number: str = "12346") -> str:
    """The call's FastAGI step, as the sample dialplan ran it in the capture."""
    header = (agi_fixture("sip_call.agi")
              .replace(b"1795594483.1", uniqueid.encode())
              .replace(b"12345", number.encode())
              .replace(b"agi_network_script: intake\n",
                       f"agi_network_script: intake?arrived={arrived}\n".encode()))
    call = await fake_call(gw.adapters["asterisk"].port, header)  # type: ignore[attr-defined]
    return call.variables["GATEWAY_CONTACT_ID"]


async def replay(gw: Gateway, ami: FakeAmi, sessions: list[tuple[bytes, bool]]) -> None:
    ami.sessions.extend(sessions)
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    await eventually(ami.done.is_set)


async def test_core_restart_now_with_a_call_waiting(start_gateway: Any) -> None:
    """``core restart now`` 4 s into a call waiting in ``hotline-en``: Asterisk hangs the
    channels up first (QueueCallerAbandon, Hangup), then drops the link; the next login's
    FullyBooted says Uptime 0. The call is abandoned (not met) and called back, once."""
    clock = FixedClock(1_796_092_970_570_000)
    ami = FakeAmi([], booted=False)
    gw = await voice_with_ami(start_gateway, ami, clock)
    contact_id = await intake(gw, "1796092970.51", "1796092970.569310")
    clock.advance(10)  # the new Asterisk is up some seconds later
    await replay(gw, ami, live_sessions("live_restart.ami", contact_id=contact_id))
    (event,) = await events_of(gw, "abandoned")
    assert (event.contact_id, event.at, event.met) == (contact_id, 1_796_092_974_913_625, False)
    assert event.detail["reason"] == "abandon" and event.detail["queue"] == "hotline-en"
    (callback,) = await callbacks_of(gw)
    assert callback.thread == contact_id
    assert of_type(await gw.read_events(), "closed") == []  # the restart closes nothing more


async def test_asterisk_killed_with_a_call_waiting(start_gateway: Any) -> None:
    """Asterisk killed (-9) 4 s into a waiting call, started again 3 s later: the link drops
    with no hangup; the next login's FullyBooted says Uptime 0. The call is ``closed``
    (``asterisk restarted``, not met) and called back."""
    clock = FixedClock(1_796_093_010_390_000)
    ami = FakeAmi([], booted=False)
    gw = await voice_with_ami(start_gateway, ami, clock)
    contact_id = await intake(gw, "1796093010.1", "1796093010.380360")
    clock.advance(8)
    await replay(gw, ami, live_sessions("live_killed.ami", contact_id=contact_id))
    (closed,) = await events_of(gw, "closed")
    assert closed.contact_id == contact_id
    assert closed.detail == {"reason": "asterisk restarted", "answered": False}
    assert closed.met is False
    (callback,) = await callbacks_of(gw)
    assert callback.meta["reason"] == "asterisk restarted"
    assert of_type(await gw.read_events(), "abandoned") == []


async def test_reconnect_with_one_call_waiting_and_one_answered(start_gateway: Any) -> None:
    """The real ``Status`` answer after a reconnect: six channels (both calls' Local halves,
    the queue member's), the waiting caller in ``Queue``, the answered one in ``Queue`` with a
    BridgeID, unset variables as ``(null)``. The answered call is stamped from Status (not
    exact), the member's channels make no call, and the waiting call is followed to its
    abandon (the events that came after, replayed)."""
    clock = FixedClock(1_796_092_923_300_000)
    ami = FakeAmi([], live_channels=[])
    gw = await voice_with_ami(start_gateway, ami, clock, languages={"12345": "zh"})
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    waiting = await intake(gw, "1796092921.45", "1796092921.810208")
    answered = await intake(gw, "1796092923.47", "1796092923.227666", "12345")
    clock.advance(4)  # Status was asked 4 s into the second call
    ami.status_answer = ami_fixture("live_status.ami", contact_id=waiting,
                                    answered_id=answered)
    await replay(gw, ami, [(ami_fixture("live_reconnect.ami"), False)])
    (answer,) = await events_of(gw, "answered")
    assert answer.contact_id == answered
    assert answer.detail == {"via": "Status", "exact": False}
    (abandon,) = await events_of(gw, "abandoned")
    assert (abandon.contact_id, abandon.met) == (waiting, False)
    assert abandon.at == 1_796_092_941_829_052  # QueueCallerAbandon's Timestamp
    assert abandon.detail["queue"] == "hotline-en"
    (callback,) = await callbacks_of(gw)
    assert callback.thread == waiting
    await eventually(lambda: not tracker.calls)  # both ended: nothing left open
    contacts = await gw.read_contacts()
    assert len(contacts) == 3  # the two calls and one callback: no contact for a member leg


async def test_dialled_callback_answered_and_not_answered(start_gateway: Any) -> None:
    """Two ``Originate`` actions as the gateway sends them, answered by the real Asterisk:
    ``Local/1@answer`` picked up (``OriginateResponse`` Success, Reason 4; the called-back
    citizen then joins the ``callbacks`` queue), ``Local/1@noanswer`` rang out after the 5 s
    timeout (Failure, Reason 3)."""
    ami = FakeAmi([])
    ami.originate_answers = live_originates("live_originate.ami")
    gw = await voice_with_ami(start_gateway, ami, dial={"channel": "Local/1@answer",
                                                        "context": "callbacks"})
    contact_id = await intake(gw, "1795594483.1", "", "12345")
    first = await reply(gw, contact_id, "回访")
    delivered = await outcome(gw, first, "delivered")
    assert delivered.detail["uniqueid"] == "1796093041.0"
    assert delivered.detail["reason"] == "answered"
    await outcome(gw, first, "responded")
    second = await reply(gw, contact_id, "再次回访")
    failed = await outcome(gw, second, "failed")
    assert "no answer" in str(failed.detail)
    # the citizen called back, waiting in [callbacks]' queue, is not a new call
    assert [c.external_id for c in await gw.read_contacts()] == ["1795594483.1"]


async def test_calls_that_never_reached_fastagi_and_an_end_seen_only_in_queue_log(
    start_gateway: Any, tmp_path: Path
) -> None:
    """``live_agi_failed.ami``: what AMI showed of three calls made while no gateway served
    FastAGI (both killed; the dialplan's fail path queued them): one to ``hotline`` whose end
    the capture missed, one abandoned after 5 s, one answered. Each gets a contact from AMI
    stamped with ``GATEWAY_ARRIVED``; the first one's end comes from ``queue_log`` (the same
    live run's lines) at the next reconnect, and nothing is made twice."""
    log = tmp_path / "queue_log"
    log.write_text(HISTORY)
    ami = FakeAmi([], live_channels=[])
    gw = await voice_with_ami(start_gateway, ami, FixedClock(1_796_092_537 * S),
                              queue_log=str(log), **ROUTING)
    adapter = gw.adapters["asterisk"]
    await eventually(lambda: adapter._log_read, 30)  # type: ignore[attr-defined]
    await replay(gw, ami, [(ami_fixture("live_agi_failed.ami"), False)])
    await events_of(gw, "answered", timeout=30)
    contacts = await gw.read_contacts()
    calls = {c.external_id: c for c in contacts if not c.meta.get("callback")}
    assert sorted(calls) == ["1796092499.37", "1796092501.39", "1796092535.41"]
    for c in calls.values():
        assert c.meta["reached_agi"] is False and c.meta["source"] == "ami"
    assert calls["1796092535.41"].received_at == 1_796_092_535_441_962  # GATEWAY_ARRIVED
    (answer,) = await events_of(gw, "answered")
    assert (answer.contact_id, answer.at) == (calls["1796092535.41"].id, 1_796_092_535_444_898)
    assert (answer.elapsed_ms, answer.met) == (2, True)

    with log.open("a") as f:  # what Asterisk logged meanwhile
        f.write(DOWN)
    await replay(gw, ami, [])  # a reconnect: the waiting call is gone from the channel list
    abandoned = await events_of(gw, "abandoned", 2, timeout=30)
    assert [(e.contact_id, e.at) for e in abandoned] == [
        (calls["1796092501.39"].id, 1_796_092_506_924_483),  # the caller's side hung up
        (calls["1796092499.37"].id, 1_796_092_529 * S),  # queue_log's ABANDON
    ]
    assert abandoned[1].detail["via"] == "queue_log"
    assert of_type(await gw.read_events(), "closed") == []
    callbacks = await callbacks_of(gw, 2)
    assert len(callbacks) == 2
    assert len(of_type(await gw.read_events(), "answered")) == 1


async def test_mset_sets_every_value_as_set_variable_does_on_a_live_asterisk() -> None:
    """``tools/agi_mset_check.py`` against Asterisk 22.10.1 (fixtures/README.md): each value
    set with ``SET VARIABLE`` and, all in one, with the gateway's ``EXEC MSet``, then read back
    with ``GET VARIABLE``. Replayed: our server sends byte for byte the commands Asterisk took
    (so the MSet argument is the one verified live, commas, quotes, backslashes, brackets,
    blanks, tab, empty and non-ASCII values included), and every value read back equals the
    value set, both ways."""
    problems: list[list[str]] = []

    async def handler(session: AgiSession) -> None:
        problems.append(await check(session.channel))

    server = FastAgiServer({"mset-check": handler}, "127.0.0.1", 0, SYSTEM_CLOCK)
    await server.start()
    try:
        transcript = live_transcript("live_mset.transcript")
        sent = await replay_asterisk(server.port, transcript)
    finally:
        await server.stop()
    expected = [line for side, line in transcript if side == "G"]
    assert sent == expected
    assert sum(line.startswith(b'EXEC "MSet"') for line in sent) == 1
    assert problems == [[]]
    readback = [line for side, line in transcript if side == "A" and b"result=1 (" in line]
    assert len(readback) == 2 * len(VALUES)
