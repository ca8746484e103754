"""What every channel shares: the one submit path of the HTTP adapters.

A webhook adapter answers its peer only once the contact is durable, and in its own protocol
when it is not. ``submit`` is that path for all of them: it returns the receipt, or raises
``Refused`` with what to answer, which the adapter renders in its protocol's format
(``refused.answer(render)``):

- Redis and the local spool both away (``IntakeUnavailable``): 503 + ``Retry-After``,
  nothing was stored, the peer sends again;
- a sender or the adapter over its rate (``RateLimited``): 429 + ``Retry-After``;
- a contact Intake cannot encode (``InvalidContact``): 400, sending it again cannot help.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable

from aiohttp import web

from gateway.adapters import (
    AdapterContext,
    IntakeUnavailable,
    InvalidContact,
    Overloaded,
    RateLimited,
    Receipt,
)
from gateway.records import Inbound
from gateway.server.logs import mask

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5
"""What a 503 asks the peer to wait when Intake is unavailable."""

Render = Callable[[int, str], web.Response]
"""Makes a protocol's error answer from a status and a reason."""


class Refused(Exception):
    """The contact was not taken: answer ``status`` with ``reason`` (and ``headers``)."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers or {}

    def answer(self, render: Render | None = None) -> web.Response:
        """The answer in the protocol's format (``render``; default plain text)."""
        response = (render or plain)(self.status, self.reason)
        response.headers.update(self.headers)
        return response


class Unavailable(Refused):
    """Nothing was stored (Redis and the spool away, or the adapter not ready): 503."""


def plain(status: int, reason: str) -> web.Response:
    """A plain-text answer (most SMS and chat webhooks)."""
    return web.Response(status=status, text=reason)


def unavailable() -> Unavailable:
    """Nothing was stored (or the adapter is not ready): the peer must send again."""
    return Unavailable(503, "retry later", {"Retry-After": str(RETRY_AFTER_S)})


def retry_later(render: Render | None = None) -> web.Response:
    """Answer 503 + ``Retry-After``: nothing was stored, the peer must send again."""
    return unavailable().answer(render)


async def cancel_all(tasks: set[asyncio.Task[None]]) -> None:
    """Cancel an adapter's background tasks (sends, answers) and wait for each to end."""
    running = list(tasks)
    tasks.clear()
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class SentParts:
    """How many parts of a reply went out before a send failed part-way, so that its retry
    resumes after them (a provider that takes a long reply in several requests); at most
    ``limit`` replies are remembered, the oldest forgotten first."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._sent: dict[str, int] = {}

    def resume(self, key: str) -> int:
        """The parts of reply ``key`` already sent (0: start from the first)."""
        return self._sent.pop(key, 0)

    def keep(self, key: str, sent: int, total: int) -> None:
        """After a send of reply ``key``: ``sent`` of its ``total`` parts are out."""
        if 0 < sent < total:
            self._sent[key] = sent
            while len(self._sent) > self.limit:
                self._sent.pop(next(iter(self._sent)))


async def submit(ctx: AdapterContext, inbound: Inbound) -> Receipt:
    """Hand ``inbound`` to Intake; return once it is durable, else raise ``Refused``."""
    try:
        return await ctx.intake.submit(inbound)
    except Overloaded:  # counted and logged in summary (gateway/server/admission.py)
        raise unavailable() from None
    except IntakeUnavailable:
        log.warning(
            "%s: contact from %s refused: intake unavailable",
            ctx.name, mask(inbound.sender.address),
        )
        raise unavailable() from None
    except RateLimited as exc:
        log.info("%s: contact from %s refused: over the rate", ctx.name,
                 mask(inbound.sender.address))
        retry = str(max(1, math.ceil(exc.retry_after_s)))
        raise Refused(429, "too many contacts, slow down", {"Retry-After": retry}) from None
    except InvalidContact as exc:
        log.info("%s: contact refused: %s", ctx.name, exc)
        raise Refused(400, f"contact refused: {exc}") from None
