"""The edge clock: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, tzinfo
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Micros = int
"""Microseconds since 1970-01-01T00:00:00Z."""

MICROS_PER_SECOND = 1_000_000


class Clock(Protocol):
    """Source of the current time; injected so tests can pin it."""

    def now_us(self) -> Micros: ...


class SystemClock:
    """Wall clock."""

    def now_us(self) -> Micros:
        return time.time_ns() // 1000


class FixedClock:
    """A clock that only moves when told to (tests)."""

    def __init__(self, start_us: Micros = 1_795_594_483_000_000) -> None:
        self.value_us = start_us

    def now_us(self) -> Micros:
        return self.value_us

    def advance(self, seconds: float) -> None:
        self.value_us += int(seconds * MICROS_PER_SECOND)


SYSTEM_CLOCK = SystemClock()

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_prefixes: dict[int, str] = {}
"""RFC 3339 prefix (up to the seconds' dot) by epoch second. A contact formats its edge stamp,
its enqueue stamp and its deadline (seconds to days apart) in turn: a one-entry cache missed
on nearly every call, this one (cleared past 256 seconds) hits."""
_seconds: dict[str, int] = {}
"""The other way round, for ``parse_time`` of our own form."""


def format_time(us: Micros) -> str:
    """Format as RFC 3339 UTC with microseconds: ``2026-11-25T08:00:00.123456Z``."""
    seconds, micros = divmod(us, MICROS_PER_SECOND)
    prefix = _prefixes.get(seconds)
    if prefix is None:
        if len(_prefixes) >= 256:
            _prefixes.clear()
        t = time.gmtime(seconds)
        prefix = _prefixes[seconds] = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        )
    return f"{prefix}{micros:06d}Z"


def parse_time(text: str) -> Micros:
    """Parse an RFC 3339 timestamp (any offset) into microseconds UTC."""
    if (
        len(text) == 27
        and text[26] == "Z"
        and text[19] == "."
        and text[16] == ":"  # without it "…T00:00.00.000000Z" took its head as HH:MM.ff
        and text[13] == ":"
        and text[10] == "T"
        and text.isascii()
        and text[20:26].isdigit()
    ):
        # the form format_time writes (every stamp the gateway reads back): seconds cached
        head = text[:19]
        seconds = _seconds.get(head)
        if seconds is None:
            if len(_seconds) >= 256:
                _seconds.clear()
            seconds = _seconds[head] = _parse_time(head + "Z") // MICROS_PER_SECOND
        return seconds * MICROS_PER_SECOND + int(text[20:26])
    return _parse_time(text)


def _parse_time(text: str) -> Micros:
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,9})?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def parse_rfc3339(text: str) -> Micros:
    """Parse exactly an RFC 3339 date-time (what the API documents); raise ValueError for the
    other ISO 8601 forms ``parse_time`` is lenient about (a date alone, no offset...)."""
    if not _RFC3339.fullmatch(text):
        raise ValueError("not an RFC 3339 date-time")
    fraction = re.search(r"\.([0-9]+)", text)
    if fraction and len(fraction.group(1)) > 6:  # fromisoformat takes at most microseconds
        text = text.replace(fraction.group(0), fraction.group(0)[:7], 1)
    return parse_time(text)


def from_datetime(dt: datetime) -> Micros:
    """Convert an aware (or naive UTC) datetime to microseconds."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds


def check_timezone(name: str) -> tzinfo:
    """The zone named, or ValueError (config validation)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
