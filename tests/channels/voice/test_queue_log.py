"""Calls that began and ended while no gateway instance followed AMI: recovered from Asterisk's
``queue_log`` (lines written by a real Asterisk 22.10.1, see fixtures/README.md), once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.channels.voice.queuelog import parse
from gateway.contact.clock import MICROS_PER_SECOND, FixedClock
from gateway.records import Contact, Event
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.voice.fakes import FIXTURES, FakeAmi, agi_fixture, fake_call
from tests.channels.voice.test_ami import of_type, voice_with_ami

S = MICROS_PER_SECOND
HISTORY = (FIXTURES / "queue_log" / "history.queue_log").read_text()
DOWN = (FIXTURES / "queue_log" / "gateway_down.queue_log").read_text()
AFTER = FixedClock(1_796_092_560 * S)  # the gateway comes back after those calls
ROUTING = {"languages": {"12345": "zh", "12346": "en"},
           "queues": {"12345": "hotline-live", "en": "hotline-en"}}


def test_real_lines_give_each_call_its_outcome() -> None:
    calls = parse(DOWN.splitlines())
    assert list(calls) == ["1796092499.37", "1796092501.39", "1796092535.41"]
    waited, gave_up, answered = calls.values()
    assert (waited.outcome, waited.at, waited.entered_at) == (
        "abandoned", 1_796_092_529 * S, 1_796_092_499 * S)
    assert waited.detail == {"reason": "abandon", "queue": "hotline", "position": 1,
                             "original_position": 1, "hold_s": 30, "via": "queue_log"}
    assert waited.caller == "13800138000"
    assert (gave_up.outcome, gave_up.queue, gave_up.detail["hold_s"]) == (
        "abandoned", "hotline-en", 5)
    assert (answered.outcome, answered.at) == ("answered", 1_796_092_535 * S)
    assert answered.detail == {"via": "queue_log", "exact": False, "queue": "hotline-live",
                               "member": "Live Seat", "hold_s": 0, "ring_s": 0}
    # the history's QUEUESTART lines (callid NONE) and a torn last line are no calls
    assert "NONE" not in parse(HISTORY.splitlines())
    assert parse(["1796092499|1796092499.37|hotl"]) == {}
    # a call that entered before the lines read: its wait says when
    (late,) = parse(["1796092529|1796092499.37|hotline|NONE|EXITWITHTIMEOUT|1|1|30"]).values()
    assert (late.outcome, late.entered_at, late.detail["reason"]) == (
        "closed", 1_796_092_499 * S, "queue timeout")


async def follow_then_stop(start_gateway: Any, ami: FakeAmi, log: Path) -> None:
    """An instance followed AMI (and so set the fleet's queue_log mark), then stopped."""
    gw = await come_back(start_gateway, ami, log)
    await gw.stop()


async def come_back(start_gateway: Any, ami: FakeAmi, log: Path) -> Gateway:
    """An instance of the fleet follows this Asterisk (its AMI, its queue_log)."""
    gw = await voice_with_ami(start_gateway, ami, AFTER, queue_log=str(log), **ROUTING)
    adapter = gw.adapters["asterisk"]
    await eventually(lambda: adapter._log_read, 30)  # type: ignore[attr-defined]
    return gw  # type: ignore[no-any-return]


async def test_calls_while_no_instance_followed_ami_are_recovered_once(
    start_gateway: Any, tmp_path: Path
) -> None:
    """Defect: calls that started and ended while no instance followed AMI were lost."""
    log, ami = tmp_path / "queue_log", FakeAmi([], live_channels=[])
    log.write_text(HISTORY)
    await follow_then_stop(start_gateway, ami, log)
    with log.open("a") as f:  # Asterisk goes on while no gateway follows it
        f.write(DOWN)
    gw = await come_back(start_gateway, ami, log)
    contacts: list[Contact] = await gw.read_contacts()
    calls = [c for c in contacts if not c.meta.get("callback")]
    # only the calls after the mark: the history before the first start is not reported
    assert [c.external_id for c in calls] == ["1796092499.37", "1796092501.39", "1796092535.41"]
    for c in calls:
        assert c.meta["source"] == "queue_log" and c.meta["recovered"] is True
        assert c.sender.address == "+8613800138000"
    waited, gave_up, answered = calls
    assert waited.received_at == 1_796_092_499 * S  # ENTERQUEUE, whole seconds
    assert (waited.recipient, waited.language) == ("", None)  # the default queue: no number
    assert (gave_up.recipient, gave_up.language) == ("12346", "en")  # its queue's one number
    assert (answered.recipient, answered.language) == ("12345", "zh")
    events: list[Event] = await gw.read_events()
    abandoned = of_type(events, "abandoned")
    assert [(e.contact_id, e.at, e.met) for e in abandoned] == [
        (waited.id, 1_796_092_529 * S, False), (gave_up.id, 1_796_092_506 * S, False)]
    (ok,) = of_type(events, "answered")
    assert (ok.contact_id, ok.elapsed_ms, ok.met) == (answered.id, 0, True)
    assert of_type(events, "breached") == []
    callbacks = [c for c in contacts if c.meta.get("callback")]
    assert sorted(c.thread or "" for c in callbacks) == sorted([waited.id, gave_up.id])
    await gw.stop()

    # a restart (the mark has not moved: it lags the file) reads the same lines again
    again = await come_back(start_gateway, ami, log)
    assert len(await again.read_contacts()) == len(contacts)
    # (the surge evaluation runs on its own clock and may flag the caller's three contacts
    # before or after either read: not what the queue_log recovery adds)
    assert ([e for e in await again.read_events() if e.type != "surge"]
            == [e for e in events if e.type != "surge"])


async def test_a_call_recorded_meanwhile_keeps_its_contact_and_its_outcome(
    start_gateway: Any, tmp_path: Path
) -> None:
    """FastAGI made the contact while AMI was not followed: the log's outcome goes to that
    contact. A call with an outcome written (by another follower) gets no second one."""
    log, ami = tmp_path / "queue_log", FakeAmi([], live_channels=[])
    log.write_text(HISTORY)
    await follow_then_stop(start_gateway, ami, log)
    intake = await start_gateway(adapters={"asterisk": {  # a gateway without AMI
        "type": "asterisk", "agi_listen": "127.0.0.1:0", **ROUTING}}, clock=AFTER)
    port = intake.adapters["asterisk"].port
    ids = {}
    for uid in ("1796092499.37", "1796092535.41"):
        header = agi_fixture("sip_call.agi").replace(b"1795594483.1", uid.encode())
        ids[uid] = (await fake_call(port, header)).variables["GATEWAY_CONTACT_ID"]
    # another follower closed the second call (it ended while that follower's link was down)
    await intake.queue.stamp(ids["1796092535.41"], "closed", 1_796_092_540 * S, "asterisk",
                             {"reason": "ended while AMI was down", "answered": False})
    with log.open("a") as f:
        f.write(DOWN)
    gw = await come_back(start_gateway, ami, log)

    async def outcomes() -> list[Event] | None:
        found = [e for e in await gw.read_events()
                 if e.type in ("abandoned", "answered", "closed")]
        return found if len(found) >= 3 else None

    found = await eventually(outcomes)
    assert [(e.contact_id, e.type) for e in found if e.contact_id in ids.values()] == [
        (ids["1796092535.41"], "closed"), (ids["1796092499.37"], "abandoned")]
    contacts = await gw.read_contacts()
    made = [c.external_id for c in contacts if not c.meta.get("callback")]
    assert sorted(made) == ["1796092499.37", "1796092501.39", "1796092535.41"]
