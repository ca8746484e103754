"""The ``intake`` AGI script: one voice contact per call, then channel variables for the queue.

Channel variables set on every call (the dialplan reads them after ``AGI()``):

- ``GATEWAY_STATUS``: ``OK`` (durable in Redis, or a re-run of the same call), ``SPOOLED`` (durable
  in the local spool, replayed later) or ``FAILED`` (no contact: queue the call anyway).
- ``GATEWAY_CONTACT_ID``: the contact's id (empty on FAILED).
- ``GATEWAY_ANSWER_BY``: the answer deadline, epoch seconds (empty on FAILED).
- ``GATEWAY_QUEUE``: the queue for the dialled number, else for the language, else the default.
- ``GATEWAY_PRIORITY``: ``repeat_priority`` for a repeat caller, else ``0`` (for ``QUEUE_PRIO``).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from gateway.adapters import IntakeUnavailable, Overloaded, RateLimited, Receipt, Submitter
from gateway.channels.voice.agi import AgiChannel, AgiError
from gateway.channels.voice.numbers import PrefixTemplates
from gateway.contact.clock import MICROS_PER_SECOND, Micros, format_time
from gateway.contact.phone import mask_phone, to_e164
from gateway.records import Inbound, Sender, clean_text

if TYPE_CHECKING:
    from gateway.channels.voice.adapter import AsteriskConfig
    from gateway.channels.voice.server import AgiSession
    from gateway.channels.voice.tracker import CallTracker

log = logging.getLogger(__name__)

_UNKNOWN = frozenset({"", "unknown", "<unknown>", "anonymous", "restricted", "private"})

class RoutingConfig(Protocol):
    """The config keys the intake needs (``AsteriskConfig`` has them)."""

    @property
    def region(self) -> str: ...
    @property
    def languages(self) -> Mapping[str, str]: ...
    @property
    def queues(self) -> Mapping[str, str]: ...
    @property
    def default_queue(self) -> str: ...
    @property
    def repeat_priority(self) -> int: ...
    @property
    def pbx_stamp_max_lead(self) -> float: ...


PBX_SKEW_US = 2 * MICROS_PER_SECOND
"""A PBX stamp up to this much later than the gateway's is clock skew, not an error."""


def arrival(
    pbx_raw: str | None, edge: Micros, max_lead_s: float
) -> tuple[Micros, Micros | None, bool]:
    """``(received_at, origin_at, trusted)`` from the dialplan's arrival stamp and our own.

    The deadline runs from the earlier of the two, so a call that waited on a slow or stopped
    gateway is measured from when the citizen called; a stamp far from ours (a PBX clock off
    by minutes, a stale variable) is shown in ``origin_at`` but not trusted.
    """
    from gateway.channels.voice.tracker import parse_epoch

    pbx = parse_epoch(pbx_raw) if pbx_raw else None
    if pbx is None:
        return edge, None, False
    if edge - int(float(max_lead_s) * MICROS_PER_SECOND) <= pbx <= edge + PBX_SKEW_US:
        return min(pbx, edge), pbx, True
    return edge, pbx, False


def known(value: str | None) -> str | None:
    """Return ``value`` stripped, or None for Asterisk's ``unknown`` and empty values."""
    if value is None:
        return None
    text = clean_text(value).strip()
    return None if text.lower() in _UNKNOWN else text


def dialled_number(env: Mapping[str, str]) -> str:
    """The number the caller dialled: ``agi_dnid``, else ``agi_extension``."""
    return known(env.get("agi_dnid")) or known(env.get("agi_extension")) or ""


def build_inbound(
    env: Mapping[str, str],
    *,
    adapter: str,
    received_at: Micros,
    config: RoutingConfig,
    args: list[str] | None = None,
    query: Mapping[str, str] | None = None,
    linkedid: str | None = None,
    origin_at: Micros | None = None,
    edge_at: Micros | None = None,
) -> Inbound:
    """Build the voice contact from an AGI header block (pure; never raises on odd values).

    The sender is the caller id as E.164 (with ``config.region``), its name the caller
    name; ``unknown`` or empty means none, and an unknown caller gets the address ``""``.
    ``external_id`` is ``agi_uniqueid`` (Asterisk re-running the dialplan gives the same id,
    and Intake answers the first contact). Raise ``ValueError`` only when ``agi_uniqueid`` is
    missing: a call without its id cannot be followed or deduplicated.
    """
    uniqueid = known(env.get("agi_uniqueid"))
    if not uniqueid:
        raise ValueError("agi_uniqueid is missing")
    raw_number = known(env.get("agi_callerid"))
    address = caller_address(raw_number, config.region) if raw_number else ""
    name = known(env.get("agi_calleridname"))
    if name is not None and raw_number is not None and name == raw_number:
        name = None  # Asterisk repeats the number when there is no name
    recipient = dialled_number(env)
    language = config.languages.get(recipient)
    meta: dict[str, Any] = {
        "channel": env.get("agi_channel", ""),
        "context": env.get("agi_context", ""),
        "extension": env.get("agi_extension", ""),
        "priority": env.get("agi_priority", ""),
        "type": env.get("agi_type", ""),
        "language": env.get("agi_language", ""),
        "uniqueid": uniqueid,
    }
    if linkedid:
        meta["linkedid"] = linkedid
    if edge_at is not None:
        meta["edge_received_at"] = format_time(edge_at)
    rdnis = known(env.get("agi_rdnis"))
    if rdnis:
        meta["rdnis"] = rdnis
    if env.get("agi_accountcode"):
        meta["accountcode"] = env["agi_accountcode"]
    if args:
        meta["args"] = list(args)
    if query:
        meta["query"] = dict(query)
    return Inbound(
        channel="voice",
        adapter=adapter,
        external_id=uniqueid,
        sender=Sender(address=address, name=name),
        recipient=recipient,
        received_at=received_at,
        origin_at=origin_at,
        language=language,
        meta=meta,
    )


_NOT_DIGIT = re.compile(r"\D")


@functools.lru_cache(maxsize=4096)  # callers call again
def caller_address(raw: str, region: str) -> str:
    """E.164 when the caller id is a number; its digits otherwise (short codes); else ``""``.

    A new caller's number is derived from an earlier one of the same length and decisive
    leading digits when the region allows (``numbers.PrefixTemplates``: about 1 us against
    the ~20 us of a phonenumbers parse)."""
    return _TEMPLATES(raw, region)


def _caller_address(raw: str, region: str) -> str:
    number = to_e164(raw, region) or ""
    digits = _NOT_DIGIT.sub("", number)
    if not digits:
        return ""
    return f"+{digits}" if number.startswith("+") else digits


_TEMPLATES = PrefixTemplates(_caller_address)


def pick_queue(recipient: str, language: str | None, config: RoutingConfig) -> str:
    """The queue by dialled number, else by language, else the default."""
    if recipient in config.queues:
        return config.queues[recipient]
    if language and language in config.queues:
        return config.queues[language]
    return config.default_queue


def fallback_globals(config: RoutingConfig) -> dict[str, str]:
    """The dialplan's ``[globals]`` for the fail path: ``FALLBACK_QUEUE`` and a
    ``QUEUE_<number>`` for each dialled number whose queue is not the default, so that a call
    the gateway never answered still reaches the queue it would have chosen."""
    numbers = {n for n in (*config.languages, *config.queues) if n.isdigit()}
    found = {"FALLBACK_QUEUE": config.default_queue}
    for number in sorted(numbers):
        queue = pick_queue(number, config.languages.get(number), config)
        if queue != config.default_queue:
            found[f"QUEUE_{number}"] = queue
    return found


def queue_numbers(config: RoutingConfig) -> dict[str, str]:
    """Queue -> the dialled number routed to it, for the queues exactly one configured number
    reaches (``queue_log`` names the queue, not the number dialled)."""
    numbers = sorted({n for n in (*config.languages, *config.queues) if n.isdigit()})
    found: dict[str, list[str]] = {}
    for number in numbers:
        found.setdefault(pick_queue(number, config.languages.get(number), config), []).append(
            number)
    return {queue: only[0] for queue, only in found.items() if len(only) == 1}


def channel_variables(
    receipt: Receipt | None,
    *,
    recipient: str,
    language: str | None,
    config: RoutingConfig,
) -> list[tuple[str, str]]:
    """The five ``GATEWAY_*`` variables for a receipt (None: Intake failed)."""
    queue = pick_queue(recipient, language, config)
    if receipt is None:
        return [
            ("GATEWAY_CONTACT_ID", ""),
            ("GATEWAY_ANSWER_BY", ""),
            ("GATEWAY_QUEUE", queue),
            ("GATEWAY_PRIORITY", "0"),
            ("GATEWAY_STATUS", "FAILED"),
        ]
    status = "SPOOLED" if receipt.status == "spooled" else "OK"
    priority = config.repeat_priority if receipt.repeat.count > 0 else 0
    return [
        ("GATEWAY_CONTACT_ID", receipt.contact_id),
        ("GATEWAY_ANSWER_BY", str(receipt.deadline.due_at // MICROS_PER_SECOND)),
        ("GATEWAY_QUEUE", queue),
        ("GATEWAY_PRIORITY", str(priority)),
        ("GATEWAY_STATUS", status),
    ]


@dataclass(slots=True)
class IntakeScript:
    """The FastAGI handler for script ``intake``."""

    adapter: str
    intake: Submitter
    config: AsteriskConfig
    tracker: CallTracker | None = None
    ask_linkedid: bool = False
    mset: bool = False

    async def __call__(self, session: AgiSession) -> None:
        env = session.env
        recipient = dialled_number(env)
        language = self.config.languages.get(recipient)
        receipt: Receipt | None = None
        inbound: Inbound | None = None
        try:
            async with session.within(float(self.config.intake_timeout)):
                linkedid = session.query.get("linkedid") or None
                if linkedid is None and self.ask_linkedid:
                    linkedid = await _linkedid(session)
                pbx_raw = session.query.get("arrived")
                received_at, origin_at, trusted = arrival(
                    pbx_raw, session.received_at, float(self.config.pbx_stamp_max_lead)
                )
                if origin_at is not None and not trusted:
                    log.warning("arrival stamp %.1fs from ours: deadline from our stamp "
                                "(check the PBX clock)",
                                (origin_at - session.received_at) / MICROS_PER_SECOND)
                inbound = build_inbound(
                    env,
                    adapter=self.adapter,
                    received_at=received_at,
                    config=self.config,
                    args=session.args,
                    query=session.query,
                    linkedid=linkedid,
                    origin_at=origin_at,
                    edge_at=session.received_at if pbx_raw else None,
                )
                receipt = await self.intake.submit(inbound)
        except Overloaded:  # counted and logged in summary (gateway/server/admission.py)
            pass
        except IntakeUnavailable:
            log.warning("intake unavailable: call queued without a contact")
        except RateLimited:
            log.warning("caller over the rate limit: call queued without a contact")
        except ValueError as exc:
            log.warning("unusable AGI header (%s): call queued without a contact", exc)
        except TimeoutError:
            log.warning("intake took longer than %ss: call queued without a contact",
                        self.config.intake_timeout)
        except Exception:
            log.exception("voice intake failed: call queued without a contact")
        if receipt is not None and inbound is not None:
            if log.isEnabledFor(logging.DEBUG):  # the masking costs even when not logged
                log.debug(
                    "call %s from %s: contact %s (%s)",
                    inbound.external_id,
                    mask_phone(inbound.sender.address) if inbound.sender.address else "unknown",
                    receipt.contact_id,
                    receipt.status,
                )
            if self.tracker is not None:
                await self.tracker.register(inbound, receipt)
        variables = channel_variables(
            receipt, recipient=recipient, language=language, config=self.config
        )
        await set_variables(session.channel, variables, mset=self.mset)


_MSET_ESCAPE = {ord(c): "\\" + c for c in '\\",()[]'}


def mset_argument(variables: list[tuple[str, str]]) -> str | None:
    """The argument of one ``EXEC MSet`` that sets exactly these values; None when MSet cannot.

    MSet (``pbx_builtin_setvar_multiple``) splits its argument on commas with
    ``__ast_app_separate_args``, which drops double quotes, makes a backslash's next character
    literal and does not split inside ``()`` or ``[]``; each pair is then split at its first
    ``=`` and the value taken as it is. So a backslash before each ``\\ " , ( ) [ ]`` gives
    back every value, empty and non-ASCII ones included (verified on Asterisk 22.10.1:
    docs/channels/voice.md). A value with ``$`` is left to ``SET VARIABLE``: with the channel
    variable ``AGIEXECFULL`` set, ``EXEC`` would expand it. At most 98 pairs: MSet takes 99,
    and the 99th unparsed.
    """
    if len(variables) > 98 or any("$" in value for _, value in variables):
        return None
    return ",".join(f"{name}={value.translate(_MSET_ESCAPE)}" for name, value in variables)


async def set_variables(
    channel: AgiChannel, variables: list[tuple[str, str]], *, mset: bool = False
) -> None:
    """Set the variables: ``SET VARIABLE`` each, or all in one ``EXEC MSet`` when asked.

    Asterisk answers ``200 result=0`` when MSet ran; anything else (an unknown application
    gives ``result=-2``), or values too long for one command line, falls back to
    ``SET VARIABLE``.
    """
    argument = mset_argument(variables) if mset else None
    if argument is not None:
        try:
            reply = await channel.command("EXEC", "MSet", argument)
        except ValueError:  # over the 8192 bytes of a command line: nothing was sent
            reply = None
        if reply is not None and reply.ok and reply.result == "0":
            return
    await channel.commands([("SET VARIABLE", (name, value)) for name, value in variables])


async def _linkedid(session: AgiSession) -> str | None:
    """Ask for ``CHANNEL(linkedid)`` (not in the AGI headers); None when unavailable.

    A caller who hangs up now (``AGIEXITONHANGUP`` closes the socket) still made a call: the
    contact is submitted all the same.
    """
    try:
        reply = await session.channel.command("GET VARIABLE", "CHANNEL(linkedid)")
    except (AgiError, ConnectionError):
        return None
    if reply.ok and reply.result == "1" and reply.data:
        return reply.data
    return None
