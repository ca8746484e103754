"""SLA policy: the deadline of each contact, from its edge stamp and its medium's deadline rules
(the media declare their defaults, GB/T 33358-2016 for the built-in five; ``[sla]`` overrides)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.contact.media import Media
from gateway.records import Deadline, Inbound

if TYPE_CHECKING:  # the [sla] section is read, never built here
    from gateway.server.config import SlaSection


class SlaPolicy:
    """Maps a contact to its deadline: the rule its medium picks, the seconds from ``[sla]``."""

    def __init__(self, section: SlaSection, media: Media) -> None:
        self.section = section
        self.media = media

    def deadline(self, inbound: Inbound) -> Deadline:
        """Return the deadline for ``inbound``: its medium's rule (an answer for calls, a
        response otherwise; a missed call to return gets ``voice_callback``)."""
        rule = self.media.by_name[inbound.channel].rule(inbound)
        seconds = self.media.seconds(rule.policy, self.section.deadlines)
        return Deadline(
            kind=rule.kind,
            due_at=inbound.received_at + int(seconds * MICROS_PER_SECOND),
            policy=rule.policy,
        )

    def warning_at(self, inbound: Inbound, deadline: Deadline) -> Micros:
        """Return when the ``warning`` event is due (a fraction of the way to the deadline)."""
        span = deadline.due_at - inbound.received_at
        return inbound.received_at + int(span * self.section.warning_fraction)
