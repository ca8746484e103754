"""Admission control: a bound on the contacts one process holds in flight (``[limits]
in_flight``) and on how late its event loop runs (``[limits] loop_lag``), so that a gateway
offered more than it can take refuses the excess at once, in each protocol's retry-later way,
instead of taking everything ever later.

Without it an overloaded worker reads every request it is sent: each waits longer for the
event loop, the answers come seconds late (peers time out and send again, doubling the load),
and the memory held by the waiting requests grows with the overload. With it, a contact that
finds ``in_flight`` others still being made durable, or the event loop ``loop_lag`` late (the
process has more to do than its core can: CPU overload, which the count alone does not show,
since requests then wait before they reach Intake), is refused before any work is done on it
(``Overloaded``, an ``IntakeUnavailable``: HTTP 503 + ``Retry-After``, SMTP 451, AGI
``FAILED``), and the listeners ask ``busy`` first to refuse before parsing (``HttpGuard``: a
new request answered 503 before aiohttp reads it; FastAGI: the connection closed before its
header block is read, the dialplan's fail path queues the call; SMTP: ``RCPT`` answered 451
4.3.2, so the message is never sent). Refusals are counted (``refused``, the metric
``gateway_overload_refused_total``) and logged in summary, never per contact. What was
acknowledged stays acknowledged: nothing admitted is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from gateway.adapters import Overloaded, Receipt, Submitter
from gateway.records import Inbound
from gateway.server.metrics import Metrics

log = logging.getLogger(__name__)


PROBE_S = 0.05
"""How often the event loop's lateness is measured (a timer, no task)."""


class Admission:
    """A ``Submitter`` in front of Intake that counts the contacts in flight in this process
    and refuses new ones while ``limit`` are (0: no bound) or while the event loop runs
    ``max_lag_s`` late or more at two probes in a row (0: not measured; ``start`` begins the
    measuring)."""

    def __init__(
        self,
        intake: Submitter,
        limit: int,
        max_lag_s: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.intake = intake
        self._counter = metrics.overload_refused if metrics is not None else None
        if metrics is not None:
            metrics.in_flight.set_function(lambda: self.open)
            metrics.loop_lag.set_function(lambda: self.lag_s)
        self.limit = limit
        self.max_lag_s = max_lag_s
        self.lagging = False
        """The last probe of the event loop found it ``max_lag_s`` late or more."""
        self.lag_s = 0.0
        """The event loop's lateness at the last probe."""
        self._probe: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.open = 0
        """Contacts submitted and not yet answered (durable, spooled or refused)."""
        self.refused = 0
        """Contacts refused by this bound, at submit or at a listener (``refuse``)."""

    @property
    def busy(self) -> bool:
        """True while new contacts are refused: a listener refuses before parsing."""
        return self.lagging or 0 < self.limit <= self.open

    def start(self) -> None:
        """Measure the event loop's lateness every ``PROBE_S`` (with ``max_lag_s`` set)."""
        if self.max_lag_s > 0 and self._probe is None:
            loop = asyncio.get_running_loop()
            self._due = loop.time() + PROBE_S
            self._probe = loop.call_at(self._due, self._measure)

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self.lagging = False

    def _measure(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        late, self.lag_s = self.lag_s, now - self._due
        # late at two probes in a row: the loop has more work than its core can do; one late
        # probe alone is a stall that has ended (a collection, the machine busy elsewhere)
        lagging = self.lag_s >= self.max_lag_s and late >= self.max_lag_s
        if lagging and not self.lagging:
            log.warning("overloaded: event loop %.0f ms late, contacts refused until it "
                        "catches up (%d refused so far)", self.lag_s * 1000, self.refused)
        self.lagging = lagging
        self._due = now + PROBE_S
        self._probe = loop.call_at(self._due, self._measure)

    def refuse(self) -> None:
        """Count one contact a listener refused because the process is ``busy``."""
        self.refused += 1
        if self._counter is not None:
            self._counter.inc()
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning("overloaded: %d contacts in flight (limit %d), %d refused so far",
                        self.open, self.limit, self.refused)

    async def submit(
        self, inbound: Inbound, *, held: tuple[str, Mapping[str, bytes]] | None = None
    ) -> Receipt:
        if self.busy:
            self.refuse()
            raise Overloaded(f"overloaded: {self.open} contacts in flight")
        self.open += 1
        try:
            return await self.intake.submit(inbound, held=held)
        finally:
            self.open -= 1


def busy(intake: Submitter) -> bool:
    """True when ``intake`` is an ``Admission`` refusing new contacts (listeners ask this
    before parsing; any other ``Submitter`` never is)."""
    return isinstance(intake, Admission) and intake.busy


def refuse(intake: Submitter) -> None:
    """Count a contact refused by a listener because ``busy(intake)``."""
    if isinstance(intake, Admission):
        intake.refuse()
