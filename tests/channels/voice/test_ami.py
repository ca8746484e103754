"""AMI: recorded transcripts replayed over TCP by a fake manager into a running gateway."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from gateway.channels.voice.ami import AmiClient, AmiError, FrameReader, format_action
from gateway.contact.clock import FixedClock
from gateway.records import Contact, Event
from gateway.server.config import Secret
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.voice.fakes import FakeAmi, agi_fixture, ami_fixture, fake_call

T0 = 1_795_594_483_000_000
SECRET = "s3cret"




async def voice_with_ami(
    start_gateway: Any, ami: FakeAmi, clock: FixedClock | None = None, **config: Any
) -> Gateway:
    if not ami.port:
        await ami.start()
    table = {
        "type": "asterisk",
        "agi_listen": "127.0.0.1:0",
        "settle": "0s",
        "linkedid_lookup": True,
        "ami": {
            "host": "127.0.0.1",
            "port": ami.port,
            "username": "gateway",
            "secret": SECRET,
            "reconnect_min": "20ms",
            "reconnect_max": "100ms",
        },
        **config,
    }
    gw = await start_gateway(adapters={"asterisk": table}, clock=clock or FixedClock(T0))
    await eventually(lambda: gw.adapters["asterisk"].tracker.active)  # type: ignore[attr-defined]
    return gw  # type: ignore[no-any-return]


async def intake_call(gw: Gateway, fixture: str = "sip_call.agi") -> str:
    port = gw.adapters["asterisk"].port  # type: ignore[attr-defined]
    call = await fake_call(port, agi_fixture(fixture))
    return call.variables["GATEWAY_CONTACT_ID"]


def of_type(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.type == kind]


async def events_of(gw: Gateway, kind: str, n: int = 1, timeout: float = 10.0) -> list[Event]:
    async def probe() -> list[Event] | None:
        found = of_type(await gw.read_events(), kind)
        return found if len(found) >= n else None

    return await eventually(probe, timeout)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ frame reader


def test_frames_split_anywhere_decode_the_same() -> None:
    wire = b"Asterisk Call Manager/11.0.0\r\n" + ami_fixture("answered.ami", contact_id="c1")
    whole = FrameReader().feed(wire)
    for size in (1, 2, 3, 5, 7, 64, 1000):
        reader = FrameReader()
        frames = []
        for i in range(0, len(wire), size):
            frames.extend(reader.feed(wire[i : i + size]))
        assert frames == whole
    assert whole[0] == {"Greeting": "Asterisk Call Manager/11.0.0"}
    first = whole[1]
    assert first["Event"] == "Newchannel"
    assert first["CallerIDName"] == "张三"
    assert first["Timestamp"] == "1795594483.000120"
    assert first["AccountCode"] == ""


def test_repeated_keys_are_kept_and_values_keep_colons() -> None:
    reader = FrameReader(greeting=False)
    frames = reader.feed(
        b"Response: Success\r\nMessage: Command output follows\r\nOutput: a: b\r\n"
        b"Output: line 2\r\n\r\n"
    )
    assert frames == [
        {"Response": "Success", "Message": "Command output follows", "Output": "a: b\nline 2"}
    ]


def test_a_peer_that_is_not_asterisk_or_floods_is_refused() -> None:
    with pytest.raises(AmiError):
        FrameReader().feed(b"SSH-2.0-OpenSSH_9.6\r\n")
    reader = FrameReader(greeting=False, max_frame=1000)
    with pytest.raises(AmiError):
        for _ in range(100):
            reader.feed(b"Key: " + b"x" * 50 + b"\r\n")


def test_actions_cannot_smuggle_lines() -> None:
    assert format_action({"Action": "Login", "Username": "a\r\nAction: Logoff"}) == (
        b"Action: Login\r\nUsername: aAction: Logoff\r\n\r\n"
    )


# ------------------------------------------------------------------ transcripts


async def test_answered_call_is_stamped_once_with_asterisk_time(start_gateway: Any) -> None:
    ami = FakeAmi([])
    gw = await voice_with_ami(start_gateway, ami)
    contact_id = await intake_call(gw)
    ami.sessions.append((ami_fixture("answered.ami", contact_id=contact_id), False))
    await gw.adapters["asterisk"].ami.stop()  # type: ignore[attr-defined]
    await gw.adapters["asterisk"].ami.start()  # type: ignore[attr-defined]
    answered = await events_of(gw, "answered")
    await eventually(lambda: not gw.adapters["asterisk"].tracker.calls)  # type: ignore[attr-defined]
    events = await gw.read_events()
    assert len(of_type(events, "answered")) == 1
    assert of_type(events, "abandoned") == []
    (event,) = answered
    assert event.contact_id == contact_id
    assert event.at == T0 + 8_204_311
    assert event.elapsed_ms == 8204
    assert event.met is True
    assert event.detail["queue"] == "hotline"
    assert event.detail["via"] == "AgentConnect"
    assert [c.external_id for c in await gw.read_contacts()] == ["1795594483.1"]


async def start_after_intake(
    start_gateway: Any, transcript: str, *, clock: FixedClock | None = None, **config: Any
) -> tuple[Gateway, FakeAmi, str]:
    """Take the call through FastAGI first, then let the manager replay ``transcript``."""
    ami = FakeAmi([])
    gw = await voice_with_ami(start_gateway, ami, clock, **config)
    contact_id = await intake_call(gw)
    ami.sessions.append((ami_fixture(transcript, contact_id=contact_id), False))
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    await asyncio.wait_for(ami.done.wait(), 10)
    return gw, ami, contact_id


async def test_late_answer_is_not_met(start_gateway: Any) -> None:
    gw, _, contact_id = await start_after_intake(start_gateway, "answered_late.ami")
    (event,) = await events_of(gw, "answered")
    assert event.contact_id == contact_id
    assert event.met is False
    assert event.elapsed_ms == 21_500


async def test_abandoned_call_becomes_a_callback_contact(start_gateway: Any) -> None:
    gw, _, contact_id = await start_after_intake(start_gateway, "abandoned.ami")
    (event,) = await events_of(gw, "abandoned")
    assert event.contact_id == contact_id
    assert event.at == T0 + 25_731_002
    assert event.elapsed_ms == 25_731
    assert event.detail["reason"] == "abandon"
    assert event.detail["queue"] == "hotline"
    assert event.detail["hold_s"] == 25

    async def two_contacts() -> list[Contact] | None:
        found = await gw.read_contacts()
        return found if len(found) == 2 else None

    original, callback = await eventually(two_contacts)
    assert callback.channel == "voice"
    assert callback.meta["callback"] is True
    assert callback.thread == original.id == contact_id
    assert callback.external_id == "1795594483.1:callback"
    assert callback.sender.address == original.sender.address == "+8613800138000"
    assert callback.recipient == "12345"
    assert callback.deadline.kind == "response"
    assert callback.deadline.policy == "voice_callback"
    assert callback.received_at == T0 + 25_731_002
    assert callback.deadline.due_at == callback.received_at + 1800 * 1_000_000
    assert of_type(await gw.read_events(), "answered") == []


async def test_duplicated_events_count_the_call_once(start_gateway: Any) -> None:
    gw, _, contact_id = await start_after_intake(start_gateway, "duplicated.ami")
    await events_of(gw, "answered")
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    await eventually(lambda: not tracker.calls)
    events = await gw.read_events()
    assert [e.contact_id for e in of_type(events, "answered")] == [contact_id]
    assert of_type(events, "abandoned") == []
    assert len(await gw.read_contacts()) == 1  # no callback for an answered call


async def test_hangup_decides_at_once_and_later_answer_evidence_changes_nothing(
    start_gateway: Any,
) -> None:
    """AMI sends one call's events in order: the caller's Hangup is the outcome. Answer events
    that arrive after it (a hand-made transcript, with earlier Timestamps) write nothing."""
    clock = FixedClock(T0)
    gw, _, contact_id = await start_after_intake(
        start_gateway, "out_of_order.ami", clock=clock, settle="2s"
    )
    (event,) = await events_of(gw, "abandoned")
    assert event.contact_id == contact_id
    assert event.met is False
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    await eventually(lambda: not tracker.calls)
    events = await gw.read_events()
    assert of_type(events, "answered") == []
    assert len(of_type(events, "abandoned")) == 1


async def test_disconnect_mid_call_reconnects_and_follows_the_call(start_gateway: Any) -> None:
    ami = FakeAmi([])
    gw = await voice_with_ami(start_gateway, ami)
    contact_id = await intake_call(gw)
    ami.sessions.extend([
        (ami_fixture("disconnect_part1.ami", contact_id=contact_id), True),
        (ami_fixture("disconnect_part2.ami", contact_id=contact_id), False),
    ])
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    (event,) = await events_of(gw, "answered")
    assert event.contact_id == contact_id
    assert ami.accepted >= 2
    assert client.logins >= 2


async def test_call_known_only_from_ami_varset(start_gateway: Any) -> None:
    """A gateway that did not take the call itself (restart, another instance) still follows it."""
    ami = FakeAmi([])
    first = await voice_with_ami(start_gateway, ami)
    contact_id = await intake_call(first)
    other = FakeAmi([(ami_fixture("abandoned.ami", contact_id=contact_id), False)])
    # a second gateway on the same Redis prefix, with its own manager link
    second = await voice_with_ami(start_gateway, other)
    (event,) = await events_of(second, "abandoned")
    assert event.contact_id == contact_id
    assert event.elapsed_ms == 25_731  # received_at looked up from the contact

    async def callback() -> list[Contact] | None:
        found = [c for c in await second.read_contacts() if c.meta.get("callback")]
        return found or None

    (cb,) = await eventually(callback)
    assert cb.sender.address == "+8613800138000"
    assert cb.thread == contact_id
    assert cb.recipient == "12345"


async def test_failed_login_retries_without_leaking_the_secret(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ami = FakeAmi([], secret="another")
    gw = await voice_with_ami(start_gateway, ami)
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await eventually(lambda: client.login_failures >= 2)
    assert ami.refused >= 2 and ami.accepted == 0
    assert ami.logins[0]["Secret"] == SECRET
    assert ami.logins[0]["Events"] == "system,call,agent,dialplan"
    assert SECRET not in caplog.text
    # calls still get their contact while the manager link is down
    contact_id = await intake_call(gw)
    assert contact_id
    assert not client.connected.is_set()


async def test_calls_older_than_a_restarted_asterisk_are_closed(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    ami = FakeAmi([])
    gw = await voice_with_ami(start_gateway, ami, clock)
    contact_id = await intake_call(gw)
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    assert "1795594483.1" in tracker.calls
    clock.advance(200)  # Asterisk restarts; its FullyBooted at the next login says Uptime: 100
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    (closed,) = await events_of(gw, "closed")
    assert closed.contact_id == contact_id
    assert closed.detail == {"reason": "asterisk restarted", "answered": False}
    await eventually(lambda: tracker.calls == {})  # forgotten once the stamp is written


@pytest.mark.parametrize("alive", [False, True], ids=["call ended in the gap", "call alive"])
async def test_channel_list_after_reconnect_closes_calls_that_ended_in_the_gap(
    start_gateway: Any, alive: bool
) -> None:
    clock = FixedClock(T0)
    ami = FakeAmi([], live_channels=["1795594483.1"] if alive else ["1795594483.77"])
    gw = await voice_with_ami(start_gateway, ami, clock)
    contact_id = await intake_call(gw)
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    clock.advance(30)  # the link was down for a while
    await client.stop()
    lists = client.channel_lists
    await client.start()
    await eventually(lambda: client.channel_lists > lists)
    if alive:
        await tracker.sweep()
        assert "1795594483.1" in tracker.calls
        assert of_type(await gw.read_events(), "closed") == []
    else:
        (closed,) = await events_of(gw, "closed")
        assert closed.contact_id == contact_id
        assert closed.detail == {"reason": "ended while AMI was down", "answered": False}
        assert closed.met is False
        # the call waiting in the queue that no intake saw is followed, with a contact from AMI
        assert set(tracker.calls) == {"1795594483.77"}
        made = [c for c in await gw.read_contacts() if c.external_id == "1795594483.77"]
        assert len(made) == 1 and made[0].meta["reached_agi"] is False


async def test_refused_channel_list_closes_nothing(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    ami = FakeAmi([])  # a manager user without write = reporting
    gw = await voice_with_ami(start_gateway, ami, clock)
    await intake_call(gw)
    clock.advance(30)
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    lists = client.channel_lists
    await client.start()
    await eventually(lambda: client.channel_lists > lists)
    assert [a["Action"] for a in ami.actions].count("Status") >= 2
    tracker = gw.adapters["asterisk"].tracker  # type: ignore[attr-defined]
    await tracker.sweep()
    assert "1795594483.1" in tracker.calls


async def test_two_instances_following_one_call_record_one_outcome(start_gateway: Any) -> None:
    first_ami = FakeAmi([])
    first = await voice_with_ami(start_gateway, first_ami)
    contact_id = await intake_call(first)
    transcript = ami_fixture("abandoned.ami", contact_id=contact_id)
    first_ami.sessions.append((transcript, False))
    client = first.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await client.stop()
    await client.start()
    second = await voice_with_ami(start_gateway, FakeAmi([(transcript, False)]))
    trackers = [gw.adapters["asterisk"].tracker for gw in (first, second)]  # type: ignore[attr-defined]
    await eventually(lambda: all(t.finished("1795594483.1") for t in trackers))
    await eventually(lambda: all(not t.pending() for t in trackers))
    events = await first.read_events()
    assert [e.contact_id for e in of_type(events, "abandoned")] == [contact_id]
    callbacks = [c for c in await first.read_contacts() if c.meta.get("callback")]
    assert len(callbacks) == 1


async def test_a_silent_manager_is_pinged_then_reconnected(start_gateway: Any) -> None:
    ami = FakeAmi([], answer_ping=False)
    await ami.start()
    table = {
        "type": "asterisk",
        "agi_listen": "127.0.0.1:0",
        "ami": {"host": "127.0.0.1", "port": ami.port, "username": "gateway", "secret": SECRET,
                "reconnect_min": "20ms", "reconnect_max": "100ms", "ping_interval": "100ms"},
    }
    gw = await start_gateway(adapters={"asterisk": table}, clock=FixedClock(T0))
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await eventually(lambda: client.logins >= 2)
    assert [a["Action"] for a in ami.actions].count("Ping") >= 1


async def test_a_manager_that_answers_its_pings_keeps_the_link(start_gateway: Any) -> None:
    """The link's silence is watched by one timer (no timeout a read): a Pong read resets it,
    so a quiet manager that answers is pinged again and again on one login."""
    ami = FakeAmi([])
    await ami.start()
    table = {
        "type": "asterisk",
        "agi_listen": "127.0.0.1:0",
        "ami": {"host": "127.0.0.1", "port": ami.port, "username": "gateway", "secret": SECRET,
                "reconnect_min": "20ms", "reconnect_max": "100ms", "ping_interval": "250ms"},
    }
    # 250 ms, not less: a Pong read in the same turn of the loop as the silence timer's due
    # time (the test process off the CPU for a whole interval) is taken for silence
    gw = await start_gateway(adapters={"asterisk": table}, clock=FixedClock(T0))
    client = gw.adapters["asterisk"].ami  # type: ignore[attr-defined]
    await eventually(lambda: [a["Action"] for a in ami.actions].count("Ping") >= 4)
    assert client.logins == 1


async def test_a_stop_that_meets_a_completing_read_ends_the_session() -> None:
    """The manager link is stopped just as a read from the manager completes (the moment
    Python 3.11's ``asyncio.wait_for`` lost the cancellation: the session went on, and the
    adapter's stop waited on it for ever)."""
    ami = FakeAmi([])
    await ami.start()
    events: list[dict[str, str]] = []

    async def on_event(frame: Any) -> None:
        events.append(frame)

    client = AmiClient("127.0.0.1", ami.port, "gateway", Secret(SECRET), on_event=on_event,
                       reconnect_min=0.02, reconnect_max=0.1, ping_interval=0.1)
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    stops = 0

    def stop_as_it_completes(done: asyncio.Future[Any]) -> None:
        nonlocal stops
        if not stops and not done.cancelled() and client._task is not None:
            stops += 1
            client._task.cancel()

    def watch_reads(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop, **kw)
        if getattr(coro, "__qualname__", "") == "StreamReader.read":  # a read in a task of its own
            task.add_done_callback(stop_as_it_completes)
        return task

    loop.set_task_factory(watch_reads)
    try:
        await client.start()
        await eventually(lambda: client.logins >= 1)
        if not stops:  # reads run in the session's own task: stop it as it reads
            assert client._task is not None
            client._task.cancel()
        task = client._task
        assert task is not None
        done, _ = await asyncio.wait({task}, timeout=10)
        assert done == {task} and task.cancelled()
    finally:
        loop.set_task_factory(factory)
        await asyncio.wait_for(client.stop(), 10)
        await ami.stop()
