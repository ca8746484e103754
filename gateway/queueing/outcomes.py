"""The dashboard's outcome step of one event: what ``aggregate.lua`` does to its contact's counters
(docs/wallboard.md), built from the contact's facts wherever they are at hand.

A contact moves to a better-ranked outcome, once:

    open (0) < closed (1) < abandoned, short (2) < breached (3) < within, late (4)

The writers of outcome events take the step themselves, in the same atomic call that appends
the event (``stamp.lua`` for a stamped event, ``claim.lua`` for the watcher's breach), and mark
the event ``counted``: they have read the contact's facts already; ``emit.lua`` (a close
through the API, any other outcome event appended as it is) does the same, its caller reading
the facts first. The dashboard's reader (``gateway/cases/dashboard/aggregates.py``) takes the
step for an event without the mark (an older writer's), after reading the facts. A step taken
twice changes nothing (the contact hash remembers the outcome), so either may come first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gateway.adapters import load_media
from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.queueing.keys import AGG_BUCKET_TTL_S, Keys

MINUTE_S = 60
HOUR_S = 3600
SETTLING = {"answer": "answered", "response": "responded"}
FACTS = ("received_us", "due_us", "kind", "channel")
"""The contact hash's fields a step is built from (``step_of``), in the order every reader of
them asks for them (``HMGET``)."""
MOVES = frozenset({"answered", "responded", "abandoned", "breached", "closed"})
"""The event types after ``enqueued`` that may move a contact's outcome (``step_of``)."""
RANKS = {"open": 0, "closed": 1, "abandoned": 2, "short": 2, "breached": 3, "within": 4, "late": 4}


def time_bin(ms: int) -> int:
    """The bin (its upper edge in seconds) of a settling time: to the second below 5 min, to
    10 s below 1 h, to the minute beyond."""
    s = ms / 1000
    if s <= 300:
        return math.ceil(s)
    if s <= 3600:
        return math.ceil(s / 10) * 10
    return math.ceil(s / 60) * 60


@dataclass(frozen=True, slots=True)
class Step:
    """One event's effect, ready for the script."""

    keys: list[str]
    args: list[Any]


def step_of(
    keys: Keys,
    short_abandon_ms: int,
    contact_id: str,
    type_: str,
    at: Micros,
    met: bool | None,
    elapsed_ms: int | None,
    *,
    received: Micros,
    due: Micros,
    kind: str,
    channel: str,
) -> Step | None:
    """The step of event ``type_`` at ``at`` (its ``met`` and ``elapsed_ms`` as the event says,
    None when it says nothing) of a contact received at ``received``, due at ``due``, of deadline
    ``kind`` on ``channel``; None when the event moves nothing."""
    label = load_media().label_of(channel, kind)
    elapsed = max(0, (at - received) // 1000)
    outcome = None
    bin_ = ""
    if type_ == "enqueued":
        outcome = "open"
    elif type_ == SETTLING.get(kind):
        outcome = "within" if (met if met is not None else at <= due) else "late"
        if elapsed_ms is not None:
            elapsed = int(elapsed_ms)
        bin_ = str(time_bin(elapsed))
    elif type_ == "breached":
        outcome = "breached"
    elif type_ == "abandoned" and kind == "answer":
        short = short_abandon_ms > 0 and elapsed < short_abandon_ms
        outcome = "short" if short else "abandoned"
    elif type_ == "closed" and at <= due:
        outcome = "closed"
    is_call = kind == "answer"  # a call: an answer deadline (the voice medium's)
    ends_wait = is_call and type_ in ("answered", "abandoned", "closed")
    if outcome is None and not ends_wait:
        return None
    outcome = outcome or "open"
    received_s = received // MICROS_PER_SECOND
    return Step(
        keys=[
            keys.contact(contact_id),
            keys.agg_bucket("m", received_s - received_s % MINUTE_S),
            keys.agg_bucket("h", received_s - received_s % HOUR_S),
            keys.agg_open(label),
            keys.agg_waiting,
            keys.agg_breaches,
        ],
        args=[
            contact_id,
            label,
            outcome,
            RANKS[outcome],
            due,
            AGG_BUCKET_TTL_S,
            bin_,
            elapsed,
            at,
            received,
            "1" if is_call else "0",
            "1" if ends_wait else "0",
            "1" if type_ == "enqueued" else "0",
        ],
    )
