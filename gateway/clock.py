"""The edge clock: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol

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


_second_cache: tuple[int, str] = (-1, "")


def format_time(us: Micros) -> str:
    """Format as RFC 3339 UTC with microseconds: ``2026-11-25T08:00:00.123456Z``."""
    global _second_cache
    seconds, micros = divmod(us, MICROS_PER_SECOND)
    cached_second, prefix = _second_cache
    if seconds != cached_second:
        t = time.gmtime(seconds)
        prefix = (
            f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}T"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}."
        )
        _second_cache = (seconds, prefix)
    return f"{prefix}{micros:06d}Z"


def parse_time(text: str) -> Micros:
    """Parse an RFC 3339 timestamp (any offset) into microseconds UTC."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds


def from_datetime(dt: datetime) -> Micros:
    """Convert an aware (or naive UTC) datetime to microseconds."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * MICROS_PER_SECOND + delta.microseconds
