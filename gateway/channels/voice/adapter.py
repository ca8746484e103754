"""The ``asterisk`` channel type: FastAGI intake, AMI answer timing, missed-call callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import phonenumbers

from gateway.adapters import AdapterContext, ChannelType, SendError, SendReceipt
from gateway.channels.voice.ami import AmiClient, AmiError, Frame
from gateway.channels.voice.intake import IntakeScript, queue_numbers
from gateway.channels.voice.queuelog import QueueLog, parse
from gateway.channels.voice.server import FastAgiServer
from gateway.channels.voice.tracker import CallTracker, event_time
from gateway.queueing.coordination import Fence, SharedState
from gateway.records import Contact, Event, Reply
from gateway.server.admission import busy, refuse
from gateway.server.config import AdapterSettings, ConfigError, Duration, HostPort, Secret

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AmiConfig:
    """Where the manager interface is (``manager.conf``) and how to keep the link up."""

    username: str
    secret: Secret
    host: str = "127.0.0.1"
    port: int = 5038
    reconnect_min: Duration = Duration(0.5)
    reconnect_max: Duration = Duration(30)
    ping_interval: Duration = Duration(20)
    """Send ``Ping`` this often; a link with no answer within the interval is reconnected."""


@dataclass(frozen=True, slots=True)
class DialConfig:
    """Dialled callbacks (回访): a reply on a voice contact asks the gateway to call back."""

    channel: str = "PJSIP/{number}@trunk"
    """The Originate ``Channel``; ``{number}`` is the citizen's number as ``number_format``."""
    number_format: Literal["national", "e164", "digits"] = "national"
    """``13800138000`` (national), ``+8613800138000`` (e164) or ``8613800138000`` (digits)."""
    context: str = "callbacks"
    """Where the answered call goes (a ``Queue()`` to the seats in the sample dialplan)."""
    exten: str = "s"
    priority: int = 1
    caller_id: str = ""
    """The number the citizen sees (the hotline's), ``"12345 <12345>"``."""
    ring_timeout: Duration = Duration(30)
    per_number: int = 3
    """At most this many dialled callbacks to one number within ``per_number_window``."""
    per_number_window: Duration = Duration(3600)
    per_minute: int = 30
    """At most this many dialled callbacks per minute over the whole fleet."""


@dataclass(frozen=True, slots=True)
class AsteriskConfig:
    """``[adapters.<name>]`` with ``type = "asterisk"``."""

    agi_listen: HostPort = HostPort("127.0.0.1", 4573)
    agi_allow: tuple[str, ...] = ()
    """Addresses or networks (``"10.1.2.3"``, ``"10.1.0.0/16"``) allowed to connect to FastAGI,
    which has no authentication of its own; empty: any peer that reaches the listener."""
    ami: AmiConfig | None = None
    region: str = "CN"
    """Region for caller ids without a country code (``to_e164``)."""
    languages: dict[str, str] = field(default_factory=dict)
    """Dialled number -> BCP 47 language of the seat group (``"12345" = "zh"``)."""
    queues: dict[str, str] = field(default_factory=dict)
    """Dialled number or language -> Asterisk queue name; the number wins."""
    default_queue: str = "hotline"
    repeat_priority: int = 5
    """``GATEWAY_PRIORITY`` for a caller with earlier contacts in the repeat window (else 0)."""
    set_with: Literal["set_variable", "mset"] = "mset"
    """How the five variables are set: one ``EXEC MSet`` (one round trip; falls back to
    ``SET VARIABLE`` when it is refused or a value holds ``$``), or five ``SET VARIABLE`` (one
    round trip each). MSet was checked against a live Asterisk 22.10.1 to set every value
    exactly as ``SET VARIABLE`` does (docs/channels/voice.md)."""
    linkedid_lookup: bool = False
    """Ask Asterisk for ``CHANNEL(linkedid)`` (one more round trip) unless the AGI URL passes
    ``?linkedid=${CHANNEL(linkedid)}``; AMI events carry it anyway."""
    intake_timeout: Duration = Duration(3)
    """The longest the caller waits on Intake before the script gives up (``FAILED``)."""
    session_timeout: Duration = Duration(10)
    """Bound on one FastAGI session, headers included."""
    call_timeout: Duration = Duration(4 * 3600)
    """A call with no hangup seen on AMI is closed after this long."""
    settle: Duration = Duration(1)
    """After a reconnect, a call missing from the channel list is closed this much later
    (unless its hangup comes in meanwhile)."""
    callbacks: bool = True
    """Turn each abandoned call into a callback contact (national guidance since 2025)."""
    ami_contacts: bool = True
    """Make a contact from AMI for a call that reached a queue, or hung up, without one
    (the FastAGI step never reached a gateway); ``meta.reached_agi = false``."""
    pbx_stamp_max_lead: Duration = Duration(120)
    """Trust the dialplan's arrival stamp (``arrived=`` in the AGI URL) when it is at most this
    much earlier than the gateway's own stamp (and at most 2 s later)."""
    agi_read_timeout: Duration = Duration(3)
    """A FastAGI peer that sends nothing for this long is cut off (the header block, a reply)."""
    dial: DialConfig | None = None
    """Dialled callbacks through AMI ``Originate`` (needs ``ami`` and ``write = originate``)."""
    queue_log: str = ""
    """Asterisk's ``queue_log`` file, when the gateway can read it (same host, or a shared
    mount): after each AMI (re)connect, the calls it shows ending while no instance followed
    AMI get their contact and outcome. Empty: not read."""
    max_loop_lag: Duration = Duration(0.5)
    """Readiness (``/readyz``) fails while the event loop runs this late: FastAGI answers
    would be late, so a load balancer or ``hagi://`` should pick another gateway."""


class AsteriskAdapter:
    """FastAGI listener plus, when configured, the AMI follower."""

    channel = "voice"

    def __init__(self, ctx: AdapterContext, config: AsteriskConfig) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.config = config
        self.lease = (
            f"asterisk:{config.ami.host}:{config.ami.port}" if config.ami is not None else ""
        )
        """One AMI follower per Asterisk in the whole fleet: the lease is named by the PBX."""
        self.store = SharedCallStore(
            ctx.state, f"calls:{config.ami.host}:{config.ami.port}" if config.ami else "calls",
            ttl_s=float(config.call_timeout) + 3600,
        )
        self.tracker = CallTracker(
            adapter=ctx.name,
            events=ctx.events,
            intake=ctx.intake,
            contacts=ctx.contacts,
            clock=ctx.clock,
            call_timeout=float(config.call_timeout),
            settle=float(config.settle),
            callbacks=config.callbacks,
            default_region=config.region,
            store=self.store if config.ami is not None else None,
            ami_contacts=config.ami_contacts,
            languages=config.languages,
            own_contexts=frozenset({config.dial.context}) if config.dial else frozenset(),
            queue_numbers=queue_numbers(config),
        )
        self.queue_log: QueueLog | None = None
        if config.queue_log and config.ami is not None:
            self.queue_log = QueueLog(
                config.queue_log, ctx.state,
                f"queue_log:{config.ami.host}:{config.ami.port}",
                lag=2 * float(config.ami.ping_interval) + 5,
            )
        self._log_read = False
        """The queue_log was read since this AMI connection came up: the mark may move on."""
        self.intake = IntakeScript(
            ctx.name,
            ctx.intake,
            config,
            # Only an AMI follower ends the calls it is given (Hangup events, its sweep):
            # without [ami] each call would stay in the tracker's memory for good.
            tracker=self.tracker if config.ami is not None else None,
            ask_linkedid=config.linkedid_lookup,
            mset=config.set_with == "mset",
        )
        self.server = FastAgiServer(
            {"intake": self.intake},
            config.agi_listen.host,
            config.agi_listen.port,
            ctx.clock,
            session_timeout=float(config.session_timeout),
            read_timeout=float(config.agi_read_timeout),
            allow=config.agi_allow,
            metrics=ctx.metrics,
            max_connections=ctx.settings.limits.max_connections,
            step_timeout=float(config.intake_timeout),
            busy=lambda: busy(ctx.intake),
            refused=lambda: refuse(ctx.intake),
        )
        self.ami: AmiClient | None = None
        if config.ami is not None:
            a = config.ami
            self.ami = AmiClient(
                a.host,
                a.port,
                a.username,
                a.secret,
                on_event=self.tracker.handle,
                on_connect=self._connected,
                on_channels=self._channels,
                reconnect_min=float(a.reconnect_min),
                reconnect_max=float(a.reconnect_max),
                ping_interval=float(a.ping_interval),
                metrics=ctx.metrics,
            )
        self.loop_lag_s = 0.0
        """The event loop's lateness at the last probe (seconds)."""

    @property
    def port(self) -> int:
        """The bound FastAGI port."""
        return self.server.port

    @property
    def _loops(self) -> tuple[str, str]:
        return f"{self.name}-ami", f"{self.name}-loop-lag"

    async def start(self) -> None:
        await self.server.start()
        ami_loop, lag_loop = self._loops
        if self.ami is not None:
            self.ctx.supervisor.spawn(ami_loop, self._follow_under_lease, required=False)
        self.ctx.supervisor.spawn(lag_loop, self._watch_loop_lag, required=True)

    async def stop(self) -> None:
        await self.server.stop()
        for loop in self._loops:
            await self.ctx.supervisor.stop(loop)

    async def _follow_under_lease(self) -> None:
        await self.ctx.leases.exclusive(self.lease, self._follow)

    async def _follow(self, fence: Fence) -> None:
        """Follow AMI while this instance holds the PBX's lease; the calls are in Redis."""
        assert self.ami is not None
        self.store.fence = fence
        if self.queue_log is not None:
            self.queue_log.fence = fence
        try:
            await self.tracker.resume()
            await self.ami.start()
            await self._sweep()
        finally:
            await self.ami.stop()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.tracker.drain()
            self.tracker.suspend()
            self.store.fence = None

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """A reply on a voice contact is a dialled callback: call the citizen through AMI
        ``Originate`` and return once they answered (the router then stamps ``responded``);
        raise ``SendError`` when they did not (the router writes ``failed``)."""
        dial = self.config.dial
        if self.ami is None or dial is None:
            raise SendError("a call takes no written reply; configure dial to call back",
                            retryable=False)
        number = dial_number(contact.sender.address, dial.number_format)
        if not number:
            raise SendError("the caller's number is unknown: no callback", retryable=False)
        window = float(dial.per_number_window)
        if not await self.ctx.state.admit("dial", dial.per_minute, 60.0):
            raise SendError("dial rate reached", retryable=True,
                            retry_after_s=60.0 / max(1, dial.per_minute))
        per_number = f"dial:{await self.ctx.state.private(number)}"  # no number in key names
        if not await self.ctx.state.admit(per_number, dial.per_number, window):
            raise SendError(f"at most {dial.per_number} callbacks to one number per "
                            f"{window:g} s", retryable=False)
        fields = {
            "Channel": dial.channel.replace("{number}", number),
            "Context": dial.context,
            "Exten": dial.exten,
            "Priority": str(dial.priority),
            "Timeout": str(int(float(dial.ring_timeout) * 1000)),
            "Variable": f"GATEWAY_CALLBACK_OF={contact.id},GATEWAY_REPLY_ID={reply.id}",
        }
        if dial.caller_id:
            fields["CallerID"] = dial.caller_id
        try:
            frame = await self.ami.originate(fields, float(dial.ring_timeout) + 15)
        except (OSError, TimeoutError, AmiError) as exc:
            raise SendError(f"AMI: {exc or type(exc).__name__}", retryable=True) from exc
        reason = frame.get("Reason", "")
        detail = {"reply_id": reply.id, "uniqueid": frame.get("Uniqueid", ""),
                  "reason": ORIGINATE_REASONS.get(reason, reason)}
        if frame.get("Response") != "Success":
            raise SendError(f"callback not answered: {detail['reason']}", retryable=False)
        at = event_time(frame) or self.ctx.clock.now_us()
        await self.ctx.events.emit(Event(contact.id, "delivered", at, self.name, detail=detail))
        return SendReceipt(external_id=detail["uniqueid"] or None, detail=detail)

    async def _connected(self) -> None:
        self._log_read = False
        await self.tracker.on_reconnect()

    async def _channels(self, live: dict[str, Frame]) -> None:
        """The channel list after a (re)connect, with the calls queue_log saw meanwhile."""
        lines: list[str] = []
        read = False
        if self.queue_log is not None:
            try:
                lines = await self.queue_log.read()
                read = True
            except Exception:
                log.exception("queue_log not read; tried again at the next reconnect")
        await self.tracker.reconcile(live, parse(lines).values())
        self._log_read = read

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, float(self.config.settle) / 2 or 1.0))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.tracker.sweep()
                if (self.queue_log is not None and self._log_read and self.ami is not None
                        and self.ami.connected.is_set()):
                    await self.queue_log.advance()
            except Exception:
                log.exception("call tracker sweep failed")

    async def _watch_loop_lag(self) -> None:
        """Measure how late the event loop wakes up; degrade readiness while it is too late."""
        loop = asyncio.get_running_loop()
        interval = 0.1
        limit = float(self.config.max_loop_lag)
        name = self._loops[1]
        while True:
            started = loop.time()
            await asyncio.sleep(interval)
            self.loop_lag_s = max(0.0, loop.time() - started - interval)
            if self.loop_lag_s > limit:
                self.ctx.supervisor.degrade(
                    name, f"event loop {self.loop_lag_s * 1000:.0f} ms late (max {limit:g} s)"
                )
            else:
                self.ctx.supervisor.degrade(name, None)


ORIGINATE_REASONS = {
    "0": "failed", "1": "hung up", "3": "no answer", "4": "answered", "5": "busy",
    "8": "congestion",
}
"""``OriginateResponse`` ``Reason`` codes (``AST_CONTROL_*`` in include/asterisk/frame.h)."""


def dial_number(address: str, number_format: str) -> str:
    """The citizen's E.164 address as the trunk wants it; ``""`` when there is none."""
    if not address:
        return ""
    if number_format == "e164":
        return address
    digits = address.lstrip("+")
    if number_format == "digits" or not address.startswith("+"):
        return digits
    try:
        parsed = phonenumbers.parse(address)
    except phonenumbers.NumberParseException:
        return digits
    return str(phonenumbers.national_significant_number(parsed))


class SharedCallStore:
    """Open calls in the adapter's shared state: one hash, a field per call, fenced writes."""

    def __init__(self, state: SharedState, key: str, *, ttl_s: float) -> None:
        self.state = state
        self.key = key
        self.ttl_s = ttl_s
        self.fence: Fence | None = None

    async def save_many(self, records: Mapping[str, bytes]) -> None:
        await self.state.hash_set(self.key, records, self.ttl_s, fence=self.fence)

    async def drop_many(self, uniqueids: Collection[str]) -> None:
        await self.state.hash_remove(self.key, *uniqueids, fence=self.fence)

    async def load(self) -> dict[str, bytes]:
        return await self.state.hash_all(self.key)


def _check(config: AsteriskConfig, key: str, settings: AdapterSettings) -> None:
    for i, net in enumerate(config.agi_allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            where = f"{key}.agi_allow[{i}]"
            raise ConfigError([(where, f"not an address or network: {net!r}")]) from None


CHANNEL: ChannelType[AsteriskConfig] = ChannelType(
    name="asterisk",
    channel="voice",
    config=AsteriskConfig,
    factory=AsteriskAdapter,
    example={"agi_listen": "127.0.0.1:0"},
    check=_check,
)
