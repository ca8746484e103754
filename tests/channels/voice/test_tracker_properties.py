"""Property: whatever AMI sends, in any order and any number of times, each call ends with
exactly one outcome (answered, abandoned or closed), and none stays open."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.adapters import Receipt
from gateway.channels.voice.tracker import CallTracker
from gateway.contact.clock import FixedClock, Micros
from gateway.records import Contact, Deadline, Event, EventType, Inbound, Repeat, Sender

T0 = 1_795_594_483_000_000
CALLS = ["1795594483.1", "1795594483.2", "1795594483.3"]


class Recorder:
    """Stands in for Intake, the events stream and the contact lookup of one tracker run.

    Its ``stamp`` keeps no once-per-type guard of its own, so a second answer the tracker wrote
    would show up here.
    """

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.submitted: list[Inbound] = []

    async def emit(self, event: Event) -> None:
        self.events.append(event)

    async def stamp(
        self, contact_id: str, type: EventType, at: Micros, source: str,
        detail: dict[str, Any] | None = None,
    ) -> Event | None:
        event = Event(contact_id, type, at, source, detail=detail or {})
        self.events.append(event)
        return event

    async def submit(self, inbound: Inbound) -> Receipt:
        self.submitted.append(inbound)
        return Receipt("cb-" + inbound.external_id, "enqueued",
                       Deadline("response", inbound.received_at, "voice_callback"), Repeat(0, 0))

    async def get(self, contact_id: str) -> Contact | None:
        return None


def frame(kind: str, call: int, at: float) -> dict[str, str]:
    uid = CALLS[call]
    base = {"Timestamp": f"{T0 / 1e6 + at:.6f}", "Uniqueid": uid, "Linkedid": uid,
            "CallerIDNum": "13800138000"}
    if kind == "join":
        return {"Event": "QueueCallerJoin", "Queue": "hotline", **base}
    if kind == "connect":
        return {"Event": "AgentConnect", "Queue": "hotline", "HoldTime": "3", **base}
    if kind == "bridge":
        return {"Event": "BridgeEnter", "BridgeUniqueid": f"b{call}", **base}
    if kind == "agent-bridge":
        return {"Event": "BridgeEnter", "BridgeUniqueid": f"b{call}", **base,
                "Uniqueid": uid + "9"}
    if kind == "abandon":
        return {"Event": "QueueCallerAbandon", "Queue": "hotline", "HoldTime": "9", **base}
    if kind == "hangup":
        return {"Event": "Hangup", "Cause": "16", **base}
    if kind == "varset":
        return {"Event": "VarSet", "Variable": "GATEWAY_CONTACT_ID", "Value": f"c{call}", **base}
    return {"Event": "Newexten", **base}


steps = st.lists(
    st.tuples(
        st.sampled_from(
            ["join", "connect", "bridge", "agent-bridge", "abandon", "hangup", "varset", "other",
             "tick", "reboot", "reconnect"]
        ),
        st.integers(0, len(CALLS) - 1),
        st.floats(0, 100, allow_nan=False),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, registered=st.lists(st.booleans(), min_size=3, max_size=3),
       settle=st.sampled_from([0.0, 1.0]))
async def test_one_outcome_per_call_whatever_the_events(
    steps: list[tuple[str, int, float]], registered: list[bool], settle: float
) -> None:
    clock = FixedClock(T0)
    sink = Recorder()
    tracker = CallTracker(adapter="asterisk", events=sink, intake=sink, contacts=sink,
                          clock=clock, call_timeout=600, settle=settle)
    for i, known in enumerate(registered):
        if known:
            inbound = Inbound("voice", "asterisk", CALLS[i], Sender("+8613800138000"), "12345",
                              T0, meta={"linkedid": CALLS[i]})
            await tracker.register(inbound, Receipt(f"c{i}", "enqueued",
                                              Deadline("answer", T0 + 15_000_000, "voice_answer"),
                                              Repeat(0, 0)))
    for kind, call, at in steps:
        if kind == "tick":
            clock.advance(at)
            await tracker.sweep()
        elif kind == "reboot":
            await tracker.handle({"Event": "FullyBooted", "Uptime": str(int(at))})
        elif kind == "reconnect":  # the channel list after it keeps only some calls alive
            clock.advance(1)
            await tracker.on_reconnect()
            await tracker.reconcile({u for n, u in enumerate(CALLS) if (int(at) >> n) & 1})
        else:
            await tracker.handle(frame(kind, call, at))
    clock.advance(601)
    await tracker.sweep()
    await tracker.sweep()

    assert tracker.calls == {}
    outcomes: dict[str, list[str]] = {}
    for e in sink.events:
        outcomes.setdefault(e.contact_id, []).append(e.type)
    for contact_id, kinds in outcomes.items():
        assert len(kinds) == 1, (contact_id, kinds)
        assert kinds[0] in ("answered", "abandoned", "closed")
    for i, known in enumerate(registered):
        if known:
            assert len(outcomes.get(f"c{i}", [])) == 1  # never left open
    # every call that ended unanswered (abandoned, or closed unanswered) is called back once
    unanswered = {cid for cid, kinds in outcomes.items() if kinds != ["answered"]}
    callbacks = [ib for ib in sink.submitted if ib.meta.get("callback")]
    assert sorted(ib.thread or "" for ib in callbacks) == sorted(unanswered)
    # a call no intake saw got its contact from AMI, once
    made = [ib.external_id for ib in sink.submitted if not ib.meta.get("callback")]
    assert len(made) == len(set(made))
    assert all(f"c{CALLS.index(u)}" not in outcomes or not registered[CALLS.index(u)]
               for u in made)
