"""Call state from AMI events: one ``answered``, ``abandoned`` or ``closed`` outcome per call.

A call is known by its caller channel's ``Uniqueid`` (the ``agi_uniqueid`` the intake saw), from
the intake itself (``register``), from AMI's ``VarSet`` of ``GATEWAY_CONTACT_ID`` or
``GATEWAY_ARRIVED`` (the dialplan's own arrival stamp), from ``QueueCallerJoin``, or from the
``Status`` list asked for after every (re)connect. The state of every open call lives in Redis
(the adapter's shared state, hash ``calls``): the tracker runs once per Asterisk under a lease,
and whichever instance holds it next (or this one after a restart) carries on from there.

Evidence, with Asterisk's own microsecond ``Timestamp``:

- answered: ``AgentConnect`` for the caller, or a ``BridgeEnter`` that puts the caller in a bridge
  with another channel (dialplans that ``Dial`` instead of ``Queue``); after a reconnect, a
  caller found in a bridge by ``Status`` (stamped then, ``detail.exact = false``);
- gone: ``QueueCallerAbandon``, or ``Hangup`` of the caller channel (or of the call's root
  channel, ``Uniqueid == Linkedid``).

The first decisive evidence decides: ``answered`` is stamped at once; a call gone without an
answer is stamped ``abandoned`` at once (which settles its answer deadline, so no ``warning``
or ``breached`` follows a caller who has hung up) and becomes a callback contact. AMI delivers
one call's events in order, so an answer cannot follow its own hangup.

A call that reached the queue (or hung up) without a contact, because the FastAGI step never
reached a gateway, gets one made from AMI (``meta.reached_agi = false``, ``received_at`` from
``GATEWAY_ARRIVED`` or the event's Timestamp). A call cut by an Asterisk restart, or gone while
no instance watched AMI, is ``closed`` (``met: false``) and, unless answered, called back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

import orjson

from gateway.adapters import ContactLookup, EventSink, IntakeUnavailable, Receipt, Submitter
from gateway.channels.voice.queuelog import LoggedCall
from gateway.contact.clock import MICROS_PER_SECOND, Clock, Micros
from gateway.records import Inbound, Sender
from gateway.server.supervise import Backoff

log = logging.getLogger(__name__)

Frame = Mapping[str, str]

CALLBACK_SUFFIX = ":callback"
_MAX_CALLBACK_ATTEMPTS = 20
_FINISHED_RETENTION_US = 15 * 60 * MICROS_PER_SECOND
"""How long a finished call's id is remembered, so that replayed events change nothing."""
_IDLE_BRIDGE_US = 60 * MICROS_PER_SECOND
_UNKNOWN = frozenset({"", "unknown", "<unknown>", "anonymous", "restricted", "private"})

FLUSH_EVERY_S = 0.1
"""Open calls' state is written to Redis at most this long after a change (and at every
sweep, reconnect and stop)."""
FLUSH_CHUNK = 200
"""Calls' records written (or dropped) in one script call at most."""
RETRY_MAX_S = 5.0
"""Longest wait between two tries of an outcome or a callback (a spooled contact is usually
in Redis seconds after Redis is back)."""
ARRIVED_VARIABLE = "GATEWAY_ARRIVED"
CONTACT_VARIABLE = "GATEWAY_CONTACT_ID"


def event_time(frame: Frame) -> Micros | None:
    """The event's ``Timestamp: <sec>.<usec>`` (``timestampevents=yes``) in microseconds."""
    return parse_epoch(frame.get("Timestamp", ""))


def parse_epoch(raw: str) -> Micros | None:
    """``<sec>[.<fraction>]`` (``${EPOCH}``, ``${STRFTIME(,,%s.%6q)}``) in microseconds."""
    sec, _, frac = raw.strip().partition(".")
    if not sec.isdigit() or len(sec) > 12 or (frac and not frac.isdigit()):
        return None
    micros = int((frac + "000000")[:6]) if frac else 0
    return int(sec) * MICROS_PER_SECOND + micros


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def channel_variables(frame: Frame) -> dict[str, str]:
    """The ``Variable: NAME=value`` lines of a ``Status`` entry (joined by ``\\n``).

    Asterisk 22 writes an unset variable as ``NAME=(null)`` (a NULL through ``%s``, seen
    live): that is no value.
    """
    found: dict[str, str] = {}
    for line in frame.get("Variable", "").split("\n"):
        name, sep, value = line.partition("=")
        if sep and value != "(null)":
            found[name.strip()] = value
    return found


@dataclass(slots=True)
class Call:
    """What is known about one call (kept in Redis as JSON while the call is open)."""

    uniqueid: str
    contact_id: str
    """Empty until a contact is known (a call seen on AMI before, or without, its intake)."""
    seen_us: Micros
    linkedid: str | None = None
    sender_address: str | None = None
    sender_name: str | None = None
    recipient: str = ""
    language: str | None = None
    queue: str | None = None
    arrived_us: Micros | None = None
    """The PBX's own arrival stamp (``GATEWAY_ARRIVED``), or the first event's Timestamp."""
    answered_at: Micros | None = None
    gone_at: Micros | None = None
    gone_reason: str = ""
    abandon: dict[str, Any] = field(default_factory=dict)
    caller_number: str = ""
    caller_name: str = ""
    outcome: str | None = None
    outcome_at: Micros | None = None
    outcome_detail: dict[str, Any] = field(default_factory=dict)
    written: bool = False
    """The outcome is stamped (or was found stamped by another instance)."""
    needs_contact: bool = False
    """The call reached the queue, or ended, without a contact: make one from AMI."""
    callback_due: bool = False
    missing_us: Micros | None = None
    """When the channel list after a reconnect did not have this call."""
    source: str = "ami"
    """Where a contact made by the tracker comes from: ``ami`` or ``queue_log``."""
    attempts: int = 0
    """Failed tries to stamp the outcome or make the callback (Redis down, or the contact
    still in a spool): kept in the call's record, so a restart or the next lease holder goes on
    with them."""
    retry_us: Micros = 0
    """Not before this moment (backoff)."""

    def to_json(self) -> bytes:
        """The record as JSON: orjson writes the dataclass itself, the same bytes as
        ``orjson.dumps(asdict(self))`` (fields in order, the dicts as they are) in a
        fifteenth of the time (about 2 against 30 us: ``asdict`` deep-copies every field),
        paid at each flush of a changed call."""
        return orjson.dumps(self)

    @classmethod
    def from_json(cls, raw: bytes) -> Call | None:
        try:
            data = orjson.loads(raw)
            names = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in names})
        except (orjson.JSONDecodeError, TypeError, ValueError):
            return None


class CallStore(Protocol):
    """Where open calls are kept for the next lease holder (the adapter's shared state)."""

    async def save_many(self, records: Mapping[str, bytes]) -> None:
        """Keep each call's record (by uniqueid), in one step."""

    async def drop_many(self, uniqueids: Collection[str]) -> None:
        """Forget these calls, in one step."""

    async def load(self) -> dict[str, bytes]: ...


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
        settle: float = 0.0,
        callbacks: bool = True,
        default_region: str = "CN",
        store: CallStore | None = None,
        ami_contacts: bool = True,
        languages: Mapping[str, str] | None = None,
        own_contexts: frozenset[str] = frozenset(),
        queue_numbers: Mapping[str, str] | None = None,
    ) -> None:
        self.adapter = adapter
        self.events = events
        self.intake = intake
        self.contacts = contacts
        self.clock = clock
        self.call_timeout_us = int(call_timeout * MICROS_PER_SECOND)
        self.settle_us = int(settle * MICROS_PER_SECOND)
        """Grace after a reconnect's channel list before a missing call is closed."""
        self.callbacks = callbacks
        self.default_region = default_region
        self.store = store
        self.ami_contacts = ami_contacts
        self.languages = dict(languages or {})
        self.own_contexts = own_contexts
        self.queue_numbers = dict(queue_numbers or {})
        """Queue -> the one dialled number routed to it (a queue_log line has no number)."""
        """Dialplan contexts of the gateway's own calls (dialled callbacks): a caller there
        is a citizen called back, never a new call to make a contact of."""
        self.active = store is None
        """True while this instance follows AMI (holds the lease); state is then in memory."""
        self.calls: dict[str, Call] = {}
        self._by_linkedid: dict[str, set[str]] = {}
        self._bridges: dict[str, tuple[set[str], Micros]] = {}
        self._finished: dict[str, Micros] = {}
        self._dirty: set[str] = set()
        self._dropped: set[str] = set()
        self._snapshot_from: Micros = 0
        self._flushed = 0.0
        self.ami_contacts_made = 0

    # ------------------------------------------------------------ lease

    async def resume(self) -> None:
        """This instance follows AMI from now on: load the open calls from Redis."""
        self.calls.clear()
        self._by_linkedid.clear()
        self._bridges.clear()
        self._dirty.clear()
        self._dropped.clear()
        if self.store is not None:
            for uniqueid, raw in (await self.store.load()).items():
                call = Call.from_json(raw)
                if call is None or call.uniqueid != uniqueid:
                    continue
                call.retry_us = 0  # a new holder tries what is pending at once
                self.calls[uniqueid] = call
                if call.linkedid:
                    self._by_linkedid.setdefault(call.linkedid, set()).add(uniqueid)
            if self.calls:
                log.info("call tracker resumed with %d open calls", len(self.calls))
        self.active = True

    def suspend(self) -> None:
        """Another instance follows AMI now (the lease is lost): forget the memory copy."""
        if self.store is None:
            return
        self.active = False
        self.calls.clear()
        self._by_linkedid.clear()
        self._bridges.clear()
        self._dirty.clear()
        self._dropped.clear()

    async def flush(self) -> None:
        """Write changed calls to Redis (kept for the next try when Redis is away)."""
        self._flushed = time.monotonic()
        if self.store is None or not self.active:
            self._dirty.clear()
            self._dropped.clear()
            return
        try:
            # a few hundred calls in one script call each: a round trip (and, with
            # appendfsync always, an fsync) per call held the AMI events behind the flush
            # for as many round trips at a busy line's rates
            # a chunk is taken out of its set before its write, and put back if the write
            # fails: a call changed (or dropped) by another task while the write is under way
            # is marked again and goes with the next flush (taken out after the write, its
            # change was cleared with the chunk and waited for the call's next change)
            dropped = list(self._dropped)
            for start in range(0, len(dropped), FLUSH_CHUNK):
                chunk = dropped[start : start + FLUSH_CHUNK]
                self._dropped.difference_update(chunk)
                try:
                    await self.store.drop_many(chunk)
                except BaseException:
                    self._dropped.update(u for u in chunk if u not in self.calls)
                    raise
            dirty = list(self._dirty)
            for start in range(0, len(dirty), FLUSH_CHUNK):
                chunk = dirty[start : start + FLUSH_CHUNK]
                records = {
                    uniqueid: call.to_json()
                    for uniqueid in chunk
                    if (call := self.calls.get(uniqueid)) is not None
                }
                self._dirty.difference_update(chunk)
                if records:
                    try:
                        await self.store.save_many(records)
                    except BaseException:
                        self._dirty.update(u for u in records if u in self.calls)
                        raise
        except Exception as exc:
            log.warning("call state not saved yet: %s", type(exc).__name__)

    # ------------------------------------------------------------ feeding

    async def register(self, inbound: Inbound, receipt: Receipt) -> None:
        """Follow a call the intake has just made a contact of."""
        uniqueid = inbound.external_id
        if uniqueid in self._finished or not self.active:
            return  # the lease holder learns it from the VarSet
        call = self._ensure(uniqueid, receipt.contact_id, None)
        call.contact_id = call.contact_id or receipt.contact_id
        call.needs_contact = False
        call.sender_address = inbound.sender.address
        call.sender_name = inbound.sender.name
        call.recipient = inbound.recipient
        call.language = inbound.language
        call.arrived_us = call.arrived_us or inbound.received_at
        linkedid = inbound.meta.get("linkedid")
        if isinstance(linkedid, str) and linkedid:
            self._link(call, linkedid)
        self._dirty.add(uniqueid)

    def finished(self, uniqueid: str) -> bool:
        """True when the call's outcome is written (its id is kept a while for replays)."""
        return uniqueid in self._finished

    async def handle(self, frame: Frame) -> None:
        """Apply one AMI event; changed calls reach Redis at most ``FLUSH_EVERY_S`` later
        (outcomes are stamped at once, whatever the state write)."""
        try:
            await self._handle(frame)
        finally:
            if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
                await self.flush()

    async def _handle(self, frame: Frame) -> None:
        name = frame.get("Event")
        if name is None:
            return
        uniqueid = frame.get("Uniqueid", "")
        if name == "VarSet":
            await self._varset(uniqueid, frame)
            return
        if name in ("BridgeEnter", "BridgeLeave"):
            await self._bridge(name, frame)
            return
        if name == "FullyBooted":
            await self._booted(frame)
            return
        found = self.calls.get(uniqueid)
        if name == "Hangup":
            ended = [found] if found is not None else []
            linkedid = frame.get("Linkedid", "")
            if linkedid and linkedid == uniqueid:  # the call's root channel: all of it ends
                ended += [
                    self.calls[u]
                    for u in self._by_linkedid.get(linkedid, ())
                    if u in self.calls and u != uniqueid
                ]
            for call in ended:
                self._learn(call, frame)
                await self._gone(call, frame, "hangup")
            return
        if name == "QueueCallerJoin" and found is None and self.ami_contacts and uniqueid:
            if uniqueid in self._finished or frame.get("Context", "") in self.own_contexts:
                return
            found = self._ensure(uniqueid, "", event_time(frame))
        if found is None:
            return
        call = found
        self._learn(call, frame)
        self._dirty.add(call.uniqueid)
        if name == "QueueCallerJoin":
            call.queue = frame.get("Queue") or call.queue
            if not call.contact_id and self.ami_contacts:
                call.needs_contact = True
                await self._make_contact(call)
        elif name == "AgentConnect":
            call.queue = frame.get("Queue") or call.queue
            detail = {
                "via": "AgentConnect",
                "queue": call.queue,
                "member": frame.get("MemberName", ""),
                "hold_s": _int(frame.get("HoldTime")),
                "ring_s": _int(frame.get("RingTime")),
            }
            await self._answer(call, event_time(frame), detail)
        elif name == "QueueCallerAbandon":
            call.queue = frame.get("Queue") or call.queue
            call.abandon = {
                "queue": call.queue,
                "position": _int(frame.get("Position")),
                "original_position": _int(frame.get("OriginalPosition")),
                "hold_s": _int(frame.get("HoldTime")),
            }
            await self._gone(call, frame, "abandon")

    async def _varset(self, uniqueid: str, frame: Frame) -> None:
        variable, value = frame.get("Variable"), frame.get("Value", "")
        if not uniqueid or uniqueid in self._finished or not value:
            return
        if variable == CONTACT_VARIABLE:
            call = self._ensure(uniqueid, value, None)
            if not call.contact_id:
                call.contact_id = value
                call.needs_contact = False
                await self._settle_written(call)
            self._learn(call, frame)
            self._dirty.add(uniqueid)
        elif variable == ARRIVED_VARIABLE:
            arrived = parse_epoch(value) or event_time(frame)
            call = self._ensure(uniqueid, "", arrived)
            if arrived is not None and call.arrived_us is None:
                call.arrived_us = arrived
            self._learn(call, frame)
            self._dirty.add(uniqueid)

    async def _booted(self, frame: Frame) -> None:
        """Asterisk's uptime at login: calls older than this Asterisk process ended with it."""
        uptime = _int(frame.get("Uptime"))
        if uptime is None:
            return
        now = self.clock.now_us()
        boot = now - uptime * MICROS_PER_SECOND
        for call in list(self.calls.values()):
            if call.seen_us < boot - 2 * MICROS_PER_SECOND:
                await self._close(call, max(boot, call.arrived_us or 0), "asterisk restarted")
        await self.flush()

    async def on_reconnect(self) -> None:
        """AMI is (back) up; the channel list that follows is compared with calls older than now."""
        self._snapshot_from = self.clock.now_us()
        if self.calls:
            log.info("AMI connected with %d calls open", len(self.calls))

    async def reconcile(
        self, live: Mapping[str, Frame] | set[str], logged: Iterable[LoggedCall] = ()
    ) -> None:
        """Rebuild from the channel list taken after a (re)connect (``Status`` entries).

        Calls found there that this tracker did not know are followed from now on (a contact is
        made for those in a queue without one); a caller found in a bridge was answered while
        nobody watched; calls not found there ended while nobody watched: their outcome comes
        from ``logged`` (the queue_log's calls, see ``recover``) when it has them, else they are
        closed ``settle`` later.
        """
        now = self.clock.now_us()
        entries: Mapping[str, Frame] = (
            live if isinstance(live, Mapping) else {u: {"Uniqueid": u} for u in live}
        )
        for uniqueid, entry in entries.items():
            if uniqueid in self._finished:
                continue
            variables = channel_variables(entry)
            contact_id = variables.get(CONTACT_VARIABLE, "")
            arrived = parse_epoch(variables.get(ARRIVED_VARIABLE, ""))
            call = self.calls.get(uniqueid)
            in_queue = (entry.get("Application", "") == "Queue"
                        and entry.get("Context", "") not in self.own_contexts)
            if call is None:
                if not contact_id and arrived is None and not (in_queue and self.ami_contacts):
                    continue  # not a hotline call (an agent's phone, a trunk leg)
                seconds = _int(entry.get("Seconds"))
                if arrived is None and seconds is not None:
                    arrived = now - seconds * MICROS_PER_SECOND
                call = self._ensure(uniqueid, contact_id, arrived)
                call.seen_us = min(call.seen_us, arrived or call.seen_us)
            if contact_id and not call.contact_id:
                call.contact_id = contact_id
            self._learn(call, entry)
            self._dirty.add(uniqueid)
            if entry.get("BridgeID"):
                await self._answer(call, now, {"via": "Status", "exact": False})
            elif not call.contact_id and self.ami_contacts and (in_queue or call.gone_at):
                call.needs_contact = True
                await self._make_contact(call)
        for call in list(self.calls.values()):
            if call.seen_us >= self._snapshot_from or call.uniqueid in entries:
                continue
            if call.gone_at is None and call.missing_us is None:
                call.missing_us = now  # closed by the sweep unless its hangup comes in late
        await self.recover(logged, entries)
        if self.settle_us <= 0:
            await self.sweep()
        await self.flush()

    async def recover(self, logged: Iterable[LoggedCall], live: Collection[str]) -> int:
        """Calls that ``queue_log`` saw end while no instance followed AMI (after
        ``reconcile``): each gets its contact (``meta.source = "queue_log"``, ``recovered``,
        ``received_at`` = the queue entry) unless it has one, and its outcome from the log
        unless one is written. Returns how many calls got an outcome here."""
        done = 0
        for found in logged:
            uniqueid = found.uniqueid
            if found.outcome is None or uniqueid in live or uniqueid in self._finished:
                continue  # still queued (AMI follows it), or followed to its end here
            call = self.calls.get(uniqueid)
            if call is not None and call.outcome is not None:
                continue
            if call is None:
                call = self._ensure(uniqueid, "", found.entered_at)
                call.source = "queue_log"
            call.queue = call.queue or found.queue
            call.caller_number = call.caller_number or found.caller
            call.recipient = call.recipient or self.queue_numbers.get(found.queue, "")
            if not call.contact_id and self.ami_contacts:
                call.needs_contact = True
                await self._make_contact(call, found.entered_at)
            if call.contact_id and await self._has_outcome(call.contact_id):
                self._forget(call, self.clock.now_us())  # another follower wrote it
                continue
            call.gone_at = call.gone_at or found.at
            call.gone_reason = call.gone_reason or str(found.detail.get("reason", ""))
            detail = {k: v for k, v in found.detail.items() if v is not None and v != ""}
            if found.outcome == "answered":
                await self._answer(call, found.at, detail)
            else:
                await self._decide(call, found.outcome, found.at, detail, callback=True)
            await self._finish(call, self.clock.now_us())
            done += 1
        if done:
            log.info("queue_log: %d calls that ended while AMI was not followed recovered", done)
        await self.flush()
        return done

    async def _has_outcome(self, contact_id: str) -> bool:
        try:
            events = await self.contacts.events(contact_id)
        except Exception as exc:
            log.warning("events of contact %s not read: %s", contact_id, type(exc).__name__)
            return False
        return any(e.type in ("answered", "abandoned", "closed") for e in events)

    # ------------------------------------------------------------ time

    async def sweep(self) -> None:
        """Close stale calls, retry contacts, outcomes and callbacks; forget finished calls."""
        now = self.clock.now_us()
        for call in list(self.calls.values()):
            if call.needs_contact and not call.contact_id:
                await self._make_contact(call)
            if call.outcome is not None:
                if call.retry_us <= now:  # a failed stamp or callback waits for its backoff
                    await self._finish(call, now)
            elif call.missing_us is not None and now - call.missing_us >= self.settle_us:
                await self._close(call, now, "ended while AMI was down")
            elif now - call.seen_us >= self.call_timeout_us:
                await self._close(call, now, "timeout")
        for uniqueid, at in list(self._finished.items()):
            if now - at >= _FINISHED_RETENTION_US:
                del self._finished[uniqueid]
        for bridge, (members, touched) in list(self._bridges.items()):
            if now - touched >= _IDLE_BRIDGE_US and not any(m in self.calls for m in members):
                del self._bridges[bridge]
        await self.flush()

    def pending(self) -> int:
        """Calls whose outcome or callback is decided but not yet written."""
        return sum(1 for c in self.calls.values()
                   if c.outcome is not None and (not c.written or c.callback_due))

    async def drain(self) -> None:
        """Try pending outcomes and callbacks once more (shutdown); what still fails stays in
        the calls' records in Redis for the next lease holder."""
        for call in list(self.calls.values()):
            if call.outcome is not None and call.contact_id:
                call.retry_us = 0
                await self._settle_written(call)
        await self.flush()

    async def _stamp(self, call: Call) -> bool:
        """Stamp the call's outcome; False when Redis is down or the contact is not there yet
        (a spooled contact reaches Redis when its spool is replayed).

        Stamping (not a plain emit) records each outcome once per contact even when several
        gateway instances follow the same call, and settles the answer deadline.
        """
        try:
            done = await self.events.stamp(
                call.contact_id, call.outcome,  # type: ignore[arg-type]
                call.outcome_at or self.clock.now_us(), self.adapter, dict(call.outcome_detail),
            )
            return done is not None or await self.contacts.get(call.contact_id) is not None
        except Exception as exc:
            log.warning("outcome of contact %s not written yet: %s", call.contact_id,
                        type(exc).__name__)
            return False

    def _later(self, call: Call) -> None:
        """Back off before the next try (kept in the call's record)."""
        call.attempts += 1
        backoff_s = Backoff(0.5, RETRY_MAX_S).nth(call.attempts)  # 0.5 s, 1 s, 2 s, ... 5 s
        call.retry_us = self.clock.now_us() + int(backoff_s * MICROS_PER_SECOND)
        self._dirty.add(call.uniqueid)

    # ------------------------------------------------------------ internals

    def _ensure(self, uniqueid: str, contact_id: str, arrived: Micros | None) -> Call:
        call = self.calls.get(uniqueid)
        if call is None:
            call = Call(uniqueid=uniqueid, contact_id=contact_id, seen_us=self.clock.now_us(),
                        arrived_us=arrived)
            self.calls[uniqueid] = call
            self._dropped.discard(uniqueid)
        self._dirty.add(uniqueid)
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
        if number and not call.caller_number and number.strip().lower() not in _UNKNOWN:
            call.caller_number = number
        name = frame.get("CallerIDName", "")
        if name and not call.caller_name and name.strip().lower() not in _UNKNOWN:
            call.caller_name = name
        exten = frame.get("Exten", "")
        if exten and not call.recipient and exten not in ("s", "h", "i", "t"):
            call.recipient = exten

    async def _gone(self, call: Call, frame: Frame, reason: str) -> None:
        at = event_time(frame) or self.clock.now_us()
        if call.gone_at is None or at < call.gone_at:
            call.gone_at = at
        call.gone_reason = "abandon" if reason == "abandon" else (call.gone_reason or reason)
        self._dirty.add(call.uniqueid)
        if call.outcome is not None:
            await self._finish(call, self.clock.now_us())
            return
        if not call.contact_id and self.ami_contacts:
            call.needs_contact = True  # the caller hung up before any intake: still a call
            await self._make_contact(call)
        detail: dict[str, Any] = {"reason": call.gone_reason}
        detail.update({k: v for k, v in call.abandon.items() if v is not None})
        if call.queue and "queue" not in detail:
            detail["queue"] = call.queue
        await self._decide(call, "abandoned", at, detail, callback=True)

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
                detail = {"via": "BridgeEnter", "queue": call.queue}
                await self._answer(call, event_time(frame), detail)

    async def _answer(self, call: Call, at: Micros | None, detail: dict[str, Any]) -> None:
        if call.outcome is not None:
            return
        when = at or self.clock.now_us()
        call.answered_at = when
        clean = {k: v for k, v in detail.items() if v is not None and v != ""}
        await self._decide(call, "answered", when, clean, callback=False)

    async def _decide(
        self, call: Call, outcome: str, at: Micros, detail: dict[str, Any], *, callback: bool
    ) -> None:
        """Fix the call's outcome; stamp it now when the contact is known, else once it is."""
        if call.outcome is not None:
            return
        call.outcome = outcome
        call.outcome_at = at
        call.outcome_detail = detail
        call.callback_due = callback and self.callbacks
        self._dirty.add(call.uniqueid)
        await self._settle_written(call)

    async def _settle_written(self, call: Call) -> None:
        """Stamp a decided outcome once the call has a contact, then make its callback; what
        fails is tried again by the sweep after a backoff, from the call's record."""
        if call.outcome is None or not call.contact_id:
            return
        if not call.written:
            if not await self._stamp(call):
                self._later(call)
                return
            call.written = True
            call.attempts = 0
            self._dirty.add(call.uniqueid)
        if call.callback_due:
            if not await self._callback(call, call.outcome_at or self.clock.now_us(),
                                        call.outcome_detail):
                if call.attempts + 1 >= _MAX_CALLBACK_ATTEMPTS:
                    log.error("callback for %s dropped after %d attempts", call.uniqueid,
                              call.attempts + 1)
                else:
                    self._later(call)
                    return
            call.callback_due = False
            call.attempts = 0
            self._dirty.add(call.uniqueid)

    async def _finish(self, call: Call, now: Micros) -> None:
        """Forget a call whose outcome is written and that is over (or answered)."""
        await self._settle_written(call)
        if call.written and call.callback_due and now - call.seen_us < self.call_timeout_us:
            return  # the callback is still to be made
        if call.written and (call.gone_at is not None or call.outcome != "answered"):
            self._forget(call, now)
        elif call.written and now - call.seen_us >= self.call_timeout_us:
            self._forget(call, now)  # answered, no hangup seen: nothing more to write
        elif not call.written and now - call.seen_us >= self.call_timeout_us:
            log.error("call %s dropped without a contact", call.uniqueid)
            self._forget(call, now)

    async def _close(self, call: Call, at: Micros, reason: str) -> None:
        """End a call whose end was not seen: ``closed`` (never ``met``), then a callback
        unless it was answered."""
        if call.outcome is None:
            if not call.contact_id and self.ami_contacts:
                call.needs_contact = True
                await self._make_contact(call, at)
            detail = {"reason": reason, "answered": False}
            await self._decide(call, "closed", at, detail, callback=True)
        call.gone_at = call.gone_at or at
        await self._finish(call, self.clock.now_us())

    def _forget(self, call: Call, now: Micros) -> None:
        self.calls.pop(call.uniqueid, None)
        self._finished[call.uniqueid] = now
        self._dirty.discard(call.uniqueid)
        self._dropped.add(call.uniqueid)
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

    def _sender(self, call: Call) -> Sender | None:
        from gateway.channels.voice.intake import caller_address

        if call.sender_address:
            return Sender(address=call.sender_address, name=call.sender_name)
        if call.caller_number:
            address = caller_address(call.caller_number, self.default_region)
            if address:
                return Sender(address=address, name=call.sender_name or call.caller_name or None)
        return None

    async def _make_contact(self, call: Call, at: Micros | None = None) -> None:
        """A call that never reached the FastAGI step: its contact, made from AMI."""
        if call.contact_id or not call.needs_contact:
            return
        sender = self._sender(call) or Sender(address="")
        received = call.arrived_us or at or call.gone_at or call.seen_us
        language = call.language or self.languages.get(call.recipient)
        meta: dict[str, Any] = {
            "uniqueid": call.uniqueid,
            "reached_agi": False,
            "source": call.source,
        }
        if call.source == "queue_log":
            meta["recovered"] = True  # the call began and ended while no gateway followed AMI
        if call.linkedid:
            meta["linkedid"] = call.linkedid
        if call.queue:
            meta["queue"] = call.queue
        inbound = Inbound(
            channel="voice",
            adapter=self.adapter,
            external_id=call.uniqueid,
            sender=sender,
            recipient=call.recipient,
            received_at=received,
            origin_at=call.arrived_us,
            language=language,
            meta=meta,
        )
        try:
            receipt = await self.intake.submit(inbound)
        except IntakeUnavailable:
            return  # the sweep tries again
        except Exception:
            log.exception("contact for call %s from AMI failed", call.uniqueid)
            return
        call.contact_id = receipt.contact_id
        call.needs_contact = False
        call.language = language
        self._dirty.add(call.uniqueid)
        if receipt.status != "duplicate":
            self.ami_contacts_made += 1
            log.info("call %s never reached the intake: contact %s made from %s",
                     call.uniqueid, receipt.contact_id, call.source)
        await self._settle_written(call)

    async def _callback(self, call: Call, at: Micros, detail: dict[str, Any]) -> bool:
        """Make the callback contact; False when it should be tried again later."""
        sender = self._sender(call)
        recipient, language = call.recipient, call.language
        if sender is None or not recipient:  # learned from AMI only: the contact has the caller
            contact = await self._lookup(call.contact_id)
            if contact is not None:
                sender = sender or (contact.sender if contact.sender.address else None)
                recipient = recipient or contact.recipient
                language = language or contact.language
        if sender is None or not sender.address:
            log.info("call %s ended unanswered with no caller number: no callback",
                     call.uniqueid)
            return True
        inbound = Inbound(
            channel="voice",
            adapter=self.adapter,
            external_id=call.uniqueid + CALLBACK_SUFFIX,
            sender=sender,
            recipient=recipient,
            received_at=at,
            language=language,
            thread=call.contact_id,
            meta={
                "callback": True,
                "original_contact_id": call.contact_id,
                "uniqueid": call.uniqueid,
                **{k: v for k, v in detail.items() if k in ("reason", "queue", "hold_s")},
            },
        )
        try:
            await self.intake.submit(inbound)
        except IntakeUnavailable:
            return False
        except Exception:
            log.exception("callback for %s failed", inbound.external_id)
        return True
