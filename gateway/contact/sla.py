"""SLA policy: the deadline of each contact, from its edge stamp and channel (GB/T 33358-2016)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.records import Deadline, Inbound

if TYPE_CHECKING:  # the [sla] section is read, never built here
    from gateway.server.config import SlaSection


def policy_name(channel: str, kind: str) -> str:
    """The ``[sla]`` rule a deadline came from, by its channel and kind (``voice_answer``...)."""
    return "voice_callback" if (channel, kind) == ("voice", "response") else f"{channel}_{kind}"


class SlaPolicy:
    """Maps a contact to its deadline; the rules come from the ``[sla]`` section."""

    def __init__(self, section: SlaSection) -> None:
        self.section = section
        self._rules: dict[str, tuple[str, str, float]] = {
            "voice": ("answer", "voice_answer", section.voice_answer),
            "sms": ("response", "sms_response", section.sms_response),
            "chat": ("response", "chat_response", section.chat_response),
            "web": ("response", "web_response", section.web_response),
            "email": ("response", "email_response", section.email_response),
        }

    def deadline(self, inbound: Inbound) -> Deadline:
        """Return the deadline for ``inbound``: an answer for calls, a response otherwise.

        A voice contact with ``meta["callback"]`` (a missed call to return) gets the
        ``voice_callback`` response deadline instead.
        """
        seconds: float
        if inbound.channel == "voice" and inbound.meta.get("callback"):
            kind, policy, seconds = "response", "voice_callback", self.section.voice_callback
        else:
            kind, policy, seconds = self._rules[inbound.channel]
        return Deadline(
            kind=kind,  # type: ignore[arg-type]
            due_at=inbound.received_at + int(seconds * MICROS_PER_SECOND),
            policy=policy,
        )

    def warning_at(self, inbound: Inbound, deadline: Deadline) -> Micros:
        """Return when the ``warning`` event is due (a fraction of the way to the deadline)."""
        span = deadline.due_at - inbound.received_at
        return inbound.received_at + int(span * self.section.warning_fraction)
