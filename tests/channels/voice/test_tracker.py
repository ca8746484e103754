"""Call tracker: stale calls, settle window, root-channel hangups, exactly-once outcomes."""

from __future__ import annotations

from typing import Any

from gateway.cases.watcher import DeadlineWatcher
from gateway.channels.voice.tracker import CallTracker, event_time
from gateway.contact.clock import FixedClock
from gateway.records import Event
from gateway.server.config import WatcherSection
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.voice.fakes import agi_fixture, fake_call

T0 = 1_795_594_483_000_000
UID = "1795594483.1"


async def voice(start_gateway: Any, clock: FixedClock, **config: Any) -> Gateway:
    table = {"type": "asterisk", "agi_listen": "127.0.0.1:0", "call_timeout": "1h",
             "linkedid_lookup": True, **config}
    return followed_by_hand(await start_gateway(adapters={"asterisk": table}, clock=clock))


def followed_by_hand(gw: Gateway) -> Gateway:
    """These tests drive the tracker by hand (AMI frames, sweeps): it is handed the FastAGI
    calls as an AMI follower's is (with no ``[ami]`` it is not: nothing would end them)."""
    adapter: Any = gw.adapters["asterisk"]
    adapter.intake.tracker = adapter.tracker
    return gw


def tracker_of(gw: Gateway) -> CallTracker:
    return gw.adapters["asterisk"].tracker  # type: ignore[attr-defined,no-any-return]


async def take_call(gw: Gateway) -> str:
    call = await fake_call(gw.adapters["asterisk"].port, agi_fixture("sip_call.agi"))  # type: ignore[attr-defined]
    return call.variables["GATEWAY_CONTACT_ID"]


def frame(event: str, at_s: float, uniqueid: str = UID, **fields: str) -> dict[str, str]:
    return {
        "Event": event,
        "Privilege": "call,all",
        "Timestamp": f"{T0 / 1e6 + at_s:.6f}",
        "Uniqueid": uniqueid,
        "Linkedid": fields.pop("Linkedid", UID),
        **fields,
    }


def kinds(events: list[Event]) -> list[str]:
    """The outcome events the tracker writes (the core adds enqueued, warning, breached)."""
    return [e.type for e in events if e.type in ("answered", "abandoned", "closed")]


def test_event_time() -> None:
    assert event_time({"Timestamp": "1795594483.000120"}) == T0 + 120
    assert event_time({"Timestamp": "1795594483.5"}) == T0 + 500_000
    assert event_time({"Timestamp": "1795594483"}) == T0
    assert event_time({"Timestamp": "soon"}) is None
    assert event_time({}) is None


async def test_a_call_never_seen_to_end_is_closed_after_the_timeout(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock)
    contact_id = await take_call(gw)
    tracker = tracker_of(gw)
    await tracker.sweep()
    assert UID in tracker.calls
    clock.advance(3601)
    await tracker.sweep()
    await tracker.sweep()
    assert tracker.calls == {}
    events = await gw.read_events()
    assert kinds(events) == ["closed"]
    closed = next(e for e in events if e.type == "closed")
    assert closed.contact_id == contact_id
    assert closed.detail == {"reason": "timeout", "answered": False}
    # a late hangup for the closed call changes nothing
    await tracker.handle(frame("Hangup", 4000))
    await tracker.sweep()
    assert kinds(await gw.read_events()) == ["closed"]


async def test_an_answered_call_with_no_hangup_is_forgotten_silently(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock)
    await take_call(gw)
    tracker = tracker_of(gw)
    await tracker.handle(frame("AgentConnect", 5.0, Queue="hotline", HoldTime="5"))
    clock.advance(3601)
    await tracker.sweep()
    assert tracker.calls == {}
    assert kinds(await gw.read_events()) == ["answered"]


async def test_hangup_settles_the_deadline_at_once(start_gateway: Any) -> None:
    """Defect: a caller who hung up got ``warning``/``breached`` during the settle window.
    The hangup is the outcome: ``abandoned`` is stamped at once, so the watcher's deadline is
    cleared before it falls due."""
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock, settle="2s", callbacks=False)
    contact_id = await take_call(gw)
    tracker = tracker_of(gw)
    await tracker.handle(frame("QueueCallerJoin", 0.1, Queue="hotline", Position="1"))
    await tracker.handle(frame("Hangup", 11.9, Cause="16"))
    events = await gw.read_events()
    assert kinds(events) == ["abandoned"]
    abandoned = next(e for e in events if e.type == "abandoned")
    assert abandoned.contact_id == contact_id
    assert abandoned.at == T0 + 11_900_000
    assert abandoned.met is False
    assert abandoned.detail == {"reason": "hangup", "queue": "hotline"}
    clock.advance(20)  # past the warning (12 s) and the deadline (15 s)
    await DeadlineWatcher(gw.queue, clock, gw.metrics, WatcherSection()).tick()
    assert [e.type for e in await gw.read_events() if e.type in ("warning", "breached")] == []
    assert len(await gw.read_contacts()) == 1  # callbacks turned off


async def test_root_channel_hangup_ends_the_linked_call(start_gateway: Any) -> None:
    """The intake ran on a Local channel half; the caller's own channel is the call's root."""
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock, settle="0s", callbacks=False)
    await take_call(gw)  # registered with linkedid 1795594483.0 (from GET VARIABLE)
    tracker = tracker_of(gw)
    await tracker.handle(frame("Hangup", 3.0, uniqueid="1795594483.0", Linkedid="1795594483.0"))
    assert kinds(await gw.read_events()) == ["abandoned"]


async def test_bridge_with_another_channel_is_an_answer(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock, settle="0s")
    await take_call(gw)
    tracker = tracker_of(gw)
    await tracker.handle(frame("BridgeEnter", 4.0, BridgeUniqueid="b1", BridgeNumChannels="1"))
    assert kinds(await gw.read_events()) == []
    await tracker.handle(
        frame("BridgeEnter", 4.5, uniqueid="1795594483.20", BridgeUniqueid="b1",
              BridgeNumChannels="2")
    )
    await tracker.handle(frame("Hangup", 60.0))
    await tracker.handle(frame("Hangup", 60.0))
    events = await gw.read_events()
    assert kinds(events) == ["answered"]
    answered = next(e for e in events if e.type == "answered")
    assert answered.at == T0 + 4_500_000
    assert answered.detail["via"] == "BridgeEnter"


async def test_unknown_calls_and_odd_frames_are_ignored(start_gateway: Any) -> None:
    clock = FixedClock(T0)
    gw = await voice(start_gateway, clock, settle="0s")
    tracker = tracker_of(gw)
    for f in (
        {},
        {"Event": "Hangup"},
        frame("AgentConnect", 1.0, uniqueid="nope"),
        frame("VarSet", 1.0, Variable="GATEWAY_CONTACT_ID", Value=""),
        frame("BridgeEnter", 1.0),
        {"Event": "QueueCallerAbandon", "Uniqueid": "x", "Timestamp": "garbage"},
    ):
        await tracker.handle(f)
    await tracker.sweep()
    assert kinds(await gw.read_events()) == []
    assert tracker.calls == {}


async def test_answer_of_a_spooled_call_is_written_once_redis_is_back(
    start_gateway: Any, own_redis: Any
) -> None:

    clock = FixedClock(T0)
    gw = await start_gateway(
        adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0", "settle": "0s"}},
        url=own_redis.url,
        redis={"write_timeout": "300ms"},
        clock=clock,
    )
    followed_by_hand(gw)
    own_redis.stop_sync()
    call = await fake_call(gw.adapters["asterisk"].port, agi_fixture("sip_call.agi"))  # type: ignore[attr-defined]
    assert call.variables["GATEWAY_STATUS"] == "SPOOLED"
    contact_id = call.variables["GATEWAY_CONTACT_ID"]
    tracker = tracker_of(gw)
    await tracker.handle(frame("AgentConnect", 8.2, Queue="hotline", HoldTime="8"))
    await tracker.handle(frame("Hangup", 60.0))
    own_redis.start_sync()
    await eventually(lambda: gw.spool.depth == 0 and gw.intake.redis_up)
    async def swept() -> bool:
        clock.advance(60)
        await tracker.sweep()
        return kinds(await gw.read_events()) == ["answered"]

    await eventually(swept)
    events = await gw.read_events()
    assert kinds(events) == ["answered"]
    answered = next(e for e in events if e.type == "answered")
    assert answered.contact_id == contact_id
    assert answered.at == T0 + 8_200_000
    assert answered.met is True
    await tracker.sweep()
    assert kinds(await gw.read_events()) == ["answered"]


def test_a_call_record_is_the_json_older_instances_write_and_read() -> None:
    """A call's record (the fleet's shared state) is written by orjson from the dataclass
    itself: the same bytes as the ``asdict`` form older instances write, every field included,
    so either reads the other's records during a rolling upgrade."""
    from dataclasses import asdict

    import orjson

    from gateway.channels.voice.tracker import Call

    call = Call(
        uniqueid="1733000000.55", contact_id="0193a1b2c3", seen_us=1_733_000_000_000_000,
        linkedid="1733000000.54", sender_address="+8613800138000", sender_name="陈",
        recipient="12345", language="zh", queue="hotline", arrived_us=1_733_000_000_000_001,
        abandon={"position": 1, "wait": 3}, outcome="answered",
        outcome_detail={"exact": True, "agent": "Agent One"}, attempts=2,
    )
    record = call.to_json()
    assert record == orjson.dumps(asdict(call))
    assert Call.from_json(record) == call
    assert Call.from_json(orjson.dumps(asdict(Call("u", "", 0)))) == Call("u", "", 0)


async def test_a_flush_of_many_changed_calls_reaches_the_successor(start_gateway: Any) -> None:
    """The flush writes the changed calls' records a few hundred at a time (one script call
    each, ``SharedState.hash_set``), not one round trip a call: 450 open calls (three chunks)
    all reach a successor that resumes from Redis, with their queue."""
    from gateway.channels.voice.adapter import SharedCallStore
    from gateway.channels.voice.tracker import FLUSH_CHUNK

    gw = await start_gateway()
    store = SharedCallStore(gw.state_for("asterisk"), "calls:flush", ttl_s=3600)

    def tracker() -> CallTracker:
        return CallTracker(adapter="asterisk", events=gw.intake, intake=gw.intake,
                           contacts=gw.queue, clock=gw.clock, store=store, callbacks=False)

    first = tracker()
    await first.resume()
    calls = 2 * FLUSH_CHUNK + 50
    for n in range(calls):
        base = {"Uniqueid": f"1733.{n}", "Linkedid": f"1733.{n}", "Exten": "12345",
                "CallerIDNum": "13800138000", "Timestamp": "1733000000.000000"}
        await first.handle({"Event": "VarSet", "Variable": "GATEWAY_CONTACT_ID",
                            "Value": f"c{n}", **base})
        await first.handle({"Event": "QueueCallerJoin", "Queue": "hotline", "Position": "1",
                            **base})
    await first.flush()
    successor = tracker()
    await successor.resume()
    assert len(successor.calls) == calls
    assert {c.queue for c in successor.calls.values()} == {"hotline"}
    assert successor.calls["1733.7"].contact_id == "c7"


async def test_a_call_changed_while_its_record_is_written_goes_with_the_next_flush(
    start_gateway: Any,
) -> None:
    """A call that changes while the flush writes its chunk (another task: a FastAGI session
    registering it, an AMI event) is written by the next flush: the chunk was cleared from the
    changed calls after its write, change included, so a successor resuming from Redis had
    the call as it was before that change until its next one (fails before: no queue)."""
    from gateway.channels.voice.adapter import SharedCallStore

    gw = await start_gateway()
    base = {"Uniqueid": "1733.1", "Linkedid": "1733.1", "Exten": "12345",
            "CallerIDNum": "13800138000", "Timestamp": "1733000000.000000"}
    joined = False

    class Interleaved(SharedCallStore):
        async def save_many(self, records: Any) -> None:
            nonlocal joined
            if not joined:  # the change comes while this write is under way
                joined = True
                await first._handle({"Event": "QueueCallerJoin", "Queue": "hotline",
                                     "Position": "1", **base})
            await super().save_many(records)

    store = Interleaved(gw.state_for("asterisk"), "calls:interleaved", ttl_s=3600)

    def tracker() -> CallTracker:
        return CallTracker(adapter="asterisk", events=gw.intake, intake=gw.intake,
                           contacts=gw.queue, clock=gw.clock, store=store, callbacks=False)

    first = tracker()
    await first.resume()
    await first._handle({"Event": "VarSet", "Variable": "GATEWAY_CONTACT_ID", "Value": "c1",
                         **base})
    await first.flush()  # writes the call as it was before it joined the queue
    assert joined
    await first.flush()
    successor = tracker()
    await successor.resume()
    assert successor.calls["1733.1"].queue == "hotline"
