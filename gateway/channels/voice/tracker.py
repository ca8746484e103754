"""Call state from AMI events: one ``answered`` or ``abandoned`` outcome per call, exactly once.

A call is known by its caller channel's ``Uniqueid`` (the ``agi_uniqueid`` the intake saw), from
the intake itself (``register``) or from AMI's ``VarSet`` of ``GATEWAY_CONTACT_ID`` (so a restarted
gateway, or another instance, still follows it). Evidence, with Asterisk's own microsecond
``Timestamp``:

- answered: ``AgentConnect`` for the caller, or a ``BridgeEnter`` that puts the caller in a bridge
  with another channel (dialplans that ``Dial`` instead of ``Queue``);
- gone: ``QueueCallerAbandon``, or ``Hangup`` of the caller channel (or of the call's root
  channel, ``Uniqueid == Linkedid``).

``answered`` is stamped at the first evidence. A call that is gone without an answer is declared
``abandoned`` once ``settle`` seconds passed with no late answer evidence, and becomes a callback
contact. Duplicates and replays change nothing; a call never seen to end is closed (``closed``,
reason ``timeout``) after ``call_timeout``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.adapters import ContactLookup, EventSink, IntakeUnavailable, Receipt, Submitter
from gateway.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.records import EventType, Inbound, Sender

log = logging.getLogger(__name__)

Frame = Mapping[str, str]

CALLBACK_SUFFIX = ":callback"
_MAX_CALLBACK_ATTEMPTS = 20
_FINISHED_RETENTION_US = 15 * 60 * MICROS_PER_SECOND
"""How long a finished call's id is remembered, so that replayed events change nothing."""
_IDLE_BRIDGE_US = 60 * MICROS_PER_SECOND


def event_time(frame: Frame) -> Micros | None:
    """The event's ``Timestamp: <sec>.<usec>`` (``timestampevents=yes``) in microseconds."""
    raw = frame.get("Timestamp", "")
    sec, _, frac = raw.strip().partition(".")
    if not sec.isdigit() or (frac and not frac.isdigit()):
        return None
    micros = int((frac + "000000")[:6]) if frac else 0
    return int(sec) * MICROS_PER_SECOND + micros


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@dataclass(slots=True)
class Call:
    """What is known about one call."""

    uniqueid: str
    contact_id: str
    seen_us: Micros
    linkedid: str | None = None
    sender: Sender | None = None
    recipient: str = ""
    language: str | None = None
    queue: str | None = None
    answered_at: Micros | None = None
    gone_at: Micros | None = None
    gone_seen_us: Micros | None = None
    gone_reason: str = ""
    abandon: dict[str, Any] = field(default_factory=dict)
    caller_number: str = ""
    outcome: str | None = None
    missing_us: Micros | None = None
    """When the channel list after a reconnect did not have this call."""


@dataclass(slots=True)
class _PendingWrite:
    """An outcome to stamp: answered, abandoned or closed."""

    contact_id: str
    type: EventType
    at: Micros
    detail: dict[str, Any]
    attempts: int = 0
    next_us: Micros = 0
    first_us: Micros = 0


@dataclass(slots=True)
class _PendingCallback:
    inbound: Inbound
    attempts: int = 0
    next_us: Micros = 0


class CallTracker:
    """Follows calls through AMI events and writes their outcome events."""

    def __init__(
        self,
        *,
        adapter: str,
        events: EventSink,
        intake: Submitter,
        contacts: ContactLookup,
        clock: Clock,
        call_timeout: float = 4 * 3600,
        settle: float = 1.0,
        callbacks: bool = True,
        default_region: str = "CN",
    ) -> None:
        self.adapter = adapter
        self.events = events
        self.intake = intake
        self.contacts = contacts
        self.clock = clock
        self.call_timeout_us = int(call_timeout * MICROS_PER_SECOND)
        self.settle_us = int(settle * MICROS_PER_SECOND)
        self.callbacks = callbacks
        self.default_region = default_region
        self.calls: dict[str, Call] = {}
        self._by_linkedid: dict[str, set[str]] = {}
        self._bridges: dict[str, tuple[set[str], Micros]] = {}
        self._finished: dict[str, Micros] = {}
        self._pending: list[_PendingCallback] = []
        self._writes: list[_PendingWrite] = []
        self._snapshot_from: Micros = 0

    # ------------------------------------------------------------ feeding

    def register(self, inbound: Inbound, receipt: Receipt) -> None:
        """Follow a call the intake has just made a contact of."""
        uniqueid = inbound.external_id
        if uniqueid in self._finished:
            return
        call = self._ensure(uniqueid, receipt.contact_id)
        call.sender = inbound.sender
        call.recipient = inbound.recipient
        call.language = inbound.language
        linkedid = inbound.meta.get("linkedid")
        if isinstance(linkedid, str) and linkedid:
            self._link(call, linkedid)

    def finished(self, uniqueid: str) -> bool:
        """True when the call's outcome is written (its id is kept a while for replays)."""
        return uniqueid in self._finished

    async def handle(self, frame: Frame) -> None:
        """Apply one AMI event."""
        name = frame.get("Event")
        if name is None:
            return
        uniqueid = frame.get("Uniqueid", "")
        if name == "VarSet":
            if frame.get("Variable") == "GATEWAY_CONTACT_ID" and frame.get("Value"):
                if uniqueid and uniqueid not in self._finished:
                    call = self._ensure(uniqueid, frame["Value"])
                    self._learn(call, frame)
            return
        if name in ("BridgeEnter", "BridgeLeave"):
            await self._bridge(name, frame)
            return
        if name == "FullyBooted":
            await self._booted(frame)
            return
        found = self.calls.get(uniqueid)
        if name == "Hangup":
            now = self.clock.now_us()
            ended = [found] if found is not None else []
            linkedid = frame.get("Linkedid", "")
            if linkedid and linkedid == uniqueid:  # the call's root channel: all of it ends
                ended += [
                    self.calls[u] for u in self._by_linkedid.get(linkedid, ()) if u in self.calls
                ]
            for call in ended:
                self._learn(call, frame)
                self._gone(call, frame, "hangup", now)
                if self.settle_us <= 0:
                    await self._settle(call, now)
            return
        if found is None:
            return
        call = found
        self._learn(call, frame)
        if name == "QueueCallerJoin":
            call.queue = frame.get("Queue") or call.queue
        elif name == "AgentConnect":
            call.queue = frame.get("Queue") or call.queue
            detail = {
                "via": "AgentConnect",
                "queue": call.queue,
                "member": frame.get("MemberName", ""),
                "hold_s": _int(frame.get("HoldTime")),
                "ring_s": _int(frame.get("RingTime")),
            }
            await self._answer(call, frame, detail)
        elif name == "QueueCallerAbandon":
            call.queue = frame.get("Queue") or call.queue
            call.abandon = {
                "queue": call.queue,
                "position": _int(frame.get("Position")),
                "original_position": _int(frame.get("OriginalPosition")),
                "hold_s": _int(frame.get("HoldTime")),
            }
            now = self.clock.now_us()
            self._gone(call, frame, "abandon", now)
            if self.settle_us <= 0:
                await self._settle(call, now)

    async def _booted(self, frame: Frame) -> None:
        """Asterisk's uptime at login: calls older than this Asterisk process ended with it."""
        uptime = _int(frame.get("Uptime"))
        if uptime is None:
            return
        now = self.clock.now_us()
        boot = now - uptime * MICROS_PER_SECOND
        for call in list(self.calls.values()):
            if call.seen_us < boot - 2 * MICROS_PER_SECOND:
                if call.outcome is None:
                    await self._close(call, now, "asterisk restarted")
                else:
                    self._forget(call, now)

    async def on_reconnect(self) -> None:
        """AMI is (back) up; the channel list that follows is compared with calls older than now."""
        self._snapshot_from = self.clock.now_us()
        if self.calls:
            log.info("AMI connected with %d calls open", len(self.calls))

    async def reconcile(self, live: set[str]) -> None:
        """Close calls whose channel is gone although no hangup was seen (AMI was down)."""
        now = self.clock.now_us()
        for call in list(self.calls.values()):
            if call.seen_us >= self._snapshot_from or call.uniqueid in live:
                continue
            if call.gone_seen_us is None and call.missing_us is None:
                call.missing_us = now  # closed by the sweep unless its hangup comes in late
        if self.settle_us <= 0:
            await self.sweep()

    # ------------------------------------------------------------ time

    async def sweep(self) -> None:
        """Finish gone calls after ``settle``, close stale ones, retry pending callbacks."""
        now = self.clock.now_us()
        for call in list(self.calls.values()):
            if call.gone_seen_us is not None:
                await self._settle(call, now)
            elif call.missing_us is not None and now - call.missing_us >= self.settle_us:
                await self._close_stale(call, now, "ended while AMI was down")
            elif now - call.seen_us >= self.call_timeout_us:
                await self._close_stale(call, now)
        for uniqueid, at in list(self._finished.items()):
            if now - at >= _FINISHED_RETENTION_US:
                del self._finished[uniqueid]
        for bridge, (members, touched) in list(self._bridges.items()):
            if now - touched >= _IDLE_BRIDGE_US and not any(m in self.calls for m in members):
                del self._bridges[bridge]
        if self._writes:
            await self._retry_writes(now)
        if self._pending:
            await self._retry_callbacks(now)

    async def _settle(self, call: Call, now: Micros) -> None:
        """Finish a call that is gone: abandoned once ``settle`` passed without an answer."""
        if call.outcome is not None:
            self._forget(call, now)
        elif call.gone_seen_us is not None and now - call.gone_seen_us >= self.settle_us:
            await self._abandon(call)

    async def drain(self) -> None:
        """Try pending outcome writes and callbacks once more (shutdown)."""
        if self._writes:
            await self._retry_writes(None)
        if self._pending:
            await self._retry_callbacks(None)

    async def _write(self, item: _PendingWrite) -> bool:
        """Stamp one outcome; keep it for a retry when Redis is down or the contact is not
        there yet (a spooled contact reaches Redis when the spool is replayed).

        Stamping (not a plain emit) records each outcome once per contact even when several
        gateway instances follow the same call, and settles the answer deadline.
        """
        try:
            done = await self.events.stamp(
                item.contact_id, item.type, item.at, self.adapter, item.detail
            )
            if done is not None or await self.contacts.get(item.contact_id) is not None:
                return True  # written now, or stamped before (a replayed event)
        except Exception as exc:
            log.warning("outcome of contact %s not written yet: %s", item.contact_id,
                        type(exc).__name__)
        now = self.clock.now_us()
        item.attempts += 1
        if item.attempts == 1:
            item.first_us = now
            self._writes.append(item)
        backoff_s = min(30.0, 0.25 * 2 ** min(item.attempts, 8))
        item.next_us = now + int(backoff_s * MICROS_PER_SECOND)
        return False

    async def _retry_writes(self, now: Micros | None) -> None:
        """Retry kept outcomes with backoff, for as long as a call may last."""
        for item in list(self._writes):
            if now is not None and item.next_us > now:
                continue
            if await self._write(item):
                self._writes.remove(item)
            elif self.clock.now_us() - item.first_us > self.call_timeout_us:
                log.error("outcome of contact %s dropped after %d attempts",
                          item.contact_id, item.attempts)
                self._writes.remove(item)

    # ------------------------------------------------------------ internals

    def _ensure(self, uniqueid: str, contact_id: str) -> Call:
        call = self.calls.get(uniqueid)
        if call is None:
            call = Call(uniqueid=uniqueid, contact_id=contact_id, seen_us=self.clock.now_us())
            self.calls[uniqueid] = call
        return call

    def _link(self, call: Call, linkedid: str) -> None:
        if call.linkedid == linkedid:
            return
        call.linkedid = linkedid
        self._by_linkedid.setdefault(linkedid, set()).add(call.uniqueid)

    def _learn(self, call: Call, frame: Frame) -> None:
        linkedid = frame.get("Linkedid")
        if linkedid and call.linkedid is None:
            self._link(call, linkedid)
        number = frame.get("CallerIDNum", "")
        if number and not call.caller_number and number.lower() not in ("<unknown>", "unknown"):
            call.caller_number = number

    def _gone(self, call: Call, frame: Frame, reason: str, now: Micros) -> None:
        at = event_time(frame) or now
        if call.gone_at is None or at < call.gone_at:
            call.gone_at = at
            call.gone_reason = reason if not call.gone_reason else call.gone_reason
        if reason == "abandon":
            call.gone_reason = "abandon"
        if call.gone_seen_us is None:
            call.gone_seen_us = now

    async def _bridge(self, name: str, frame: Frame) -> None:
        bridge = frame.get("BridgeUniqueid", "")
        uniqueid = frame.get("Uniqueid", "")
        if not bridge or not uniqueid:
            return
        members = self._bridges.get(bridge, (set(), 0))[0]
        if name == "BridgeLeave":
            members.discard(uniqueid)
            if members:
                self._bridges[bridge] = (members, self.clock.now_us())
            else:
                self._bridges.pop(bridge, None)
            return
        members.add(uniqueid)
        self._bridges[bridge] = (members, self.clock.now_us())
        if len(members) < 2:
            return
        for member in members:
            call = self.calls.get(member)
            if call is not None and call.outcome is None:
                await self._answer(call, frame, {"via": "BridgeEnter", "queue": call.queue})

    async def _answer(self, call: Call, frame: Frame, detail: dict[str, Any]) -> None:
        if call.outcome is not None:
            return
        at = event_time(frame) or self.clock.now_us()
        if call.gone_at is not None and at > call.gone_at + self.settle_us:
            return  # evidence from after the caller left: not an answer of this call
        call.outcome = "answered"
        call.answered_at = at
        clean = {k: v for k, v in detail.items() if v is not None and v != ""}
        await self._write(_PendingWrite(call.contact_id, "answered", at, clean))

    async def _abandon(self, call: Call) -> None:
        if call.outcome is not None:
            return
        call.outcome = "abandoned"
        at = call.gone_at or self.clock.now_us()
        if call.sender is None:  # learned from AMI only: the contact has the caller
            contact = await self._lookup(call.contact_id)
            if contact is not None:
                call.sender = contact.sender
                call.recipient = call.recipient or contact.recipient
                call.language = call.language or contact.language
                call.recipient = call.recipient or contact.recipient
                call.language = call.language or contact.language
        detail: dict[str, Any] = {"reason": call.gone_reason or "hangup"}
        detail.update({k: v for k, v in call.abandon.items() if v is not None})
        if call.queue and "queue" not in detail:
            detail["queue"] = call.queue
        await self._write(_PendingWrite(call.contact_id, "abandoned", at, detail))
        self._forget(call, self.clock.now_us())
        if self.callbacks:
            await self._callback(call, at, detail)

    async def _close_stale(self, call: Call, now: Micros, reason: str = "timeout") -> None:
        if call.outcome is None:
            await self._close(call, now, reason)
        else:
            self._forget(call, now)

    async def _close(self, call: Call, now: Micros, reason: str) -> None:
        """End a call whose outcome cannot be known (no hangup seen)."""
        if call.outcome is None:
            call.outcome = "closed"
            detail = {"reason": reason, "answered": False}
            await self._write(_PendingWrite(call.contact_id, "closed", now, detail))
        self._forget(call, now)

    def _forget(self, call: Call, now: Micros) -> None:
        self.calls.pop(call.uniqueid, None)
        self._finished[call.uniqueid] = now
        if call.linkedid:
            peers = self._by_linkedid.get(call.linkedid)
            if peers is not None:
                peers.discard(call.uniqueid)
                if not peers:
                    del self._by_linkedid[call.linkedid]

    async def _lookup(self, contact_id: str) -> Any:
        try:
            return await self.contacts.get(contact_id)
        except Exception:
            log.exception("contact lookup failed")
            return None

    async def _callback(self, call: Call, at: Micros, detail: dict[str, Any]) -> None:
        sender = call.sender
        if (sender is None or not sender.address) and call.caller_number:
            from gateway.channels.voice.intake import caller_address

            address = caller_address(call.caller_number, self.default_region)
            if address:
                sender = Sender(address=address, name=sender.name if sender else None)
        if sender is None or not sender.address:
            log.info("abandoned call %s has no caller number: no callback", call.uniqueid)
            return
        inbound = Inbound(
            channel="voice",
            adapter=self.adapter,
            external_id=call.uniqueid + CALLBACK_SUFFIX,
            sender=sender,
            recipient=call.recipient,
            received_at=at,
            language=call.language,
            thread=call.contact_id,
            meta={
                "callback": True,
                "original_contact_id": call.contact_id,
                "uniqueid": call.uniqueid,
                **{k: v for k, v in detail.items() if k in ("reason", "queue", "hold_s")},
            },
        )
        self._pending.append(_PendingCallback(inbound))
        await self._retry_callbacks(self.clock.now_us())

    async def _retry_callbacks(self, now: Micros | None) -> None:
        keep: list[_PendingCallback] = []
        for item in self._pending:
            if now is not None and item.next_us > now:
                keep.append(item)
                continue
            try:
                await self.intake.submit(item.inbound)
            except IntakeUnavailable:
                item.attempts += 1
                if item.attempts < _MAX_CALLBACK_ATTEMPTS:
                    backoff = min(60, 2**item.attempts) * MICROS_PER_SECOND
                    item.next_us = (now or self.clock.now_us()) + backoff
                    keep.append(item)
                else:
                    log.error("callback for %s dropped after %d attempts",
                              item.inbound.external_id, item.attempts)
            except Exception:
                log.exception("callback for %s failed", item.inbound.external_id)
        self._pending = keep
