"""Media: what a kind of contact (voice, sms, a medium an adapter package brings) declares to the
core, so nothing in the core lists the media.

A ``Medium`` names itself, gives its deadlines (each an ``[sla]`` key with its default, the row
it is counted in and that row's label in Chinese and English) and optionally its own words and
report section. The built-in five (voice, sms, email, chat, web) are declared in their channel
folders with the GB/T 33358-2016 defaults; a channel type of a new medium declares it as
``ChannelType.medium`` (docs/adapters.md, "Declaring a medium"). ``Media`` is the registry the
core reads, filled from the channel types (``gateway.adapters.load_media``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from gateway.records import Inbound

NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""A medium's name, a deadline's policy and a row: what the contact schema's ``channel`` takes."""


@dataclass(frozen=True, slots=True)
class DeadlineRule:
    """One deadline a contact of the medium can get."""

    policy: str
    """The ``[sla]`` key (``sms_response``) and ``Deadline.policy`` of the contacts it sets."""
    kind: Literal["answer", "response"]
    """``answer``: a person picks up (a call); ``response``: a first reply is sent."""
    seconds: float
    """The default, used unless ``[sla] <policy>`` overrides it."""
    row: str
    """The row of the report and the dashboard its contacts are counted in."""
    label: tuple[str, str]
    """The row's label: (Simplified Chinese, English)."""
    color: str = "#7f7f7f"
    """The row's colour in the charts."""


@dataclass(frozen=True, slots=True)
class Medium:
    """A kind of contact, declared by the package of its channel types."""

    name: str
    deadlines: tuple[DeadlineRule, ...]
    """The first is the medium's own (its row is the medium's name); others are for contacts
    ``choose`` picks (a missed call to return)."""
    choose: Callable[[Inbound], str] | None = None
    """The policy of the deadline an inbound contact gets; None: always the first."""
    messages: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """Words the medium's report section uses, ``key: (zh, en)``, in the one catalogue."""
    phone: bool = False
    """Its senders are telephone numbers (the intake API turns them into E.164)."""
    report: Any = None
    """Its own figures in ``gateway report`` and the dashboard: a
    ``gateway.cases.report.MediumReport`` (the voice connection rate), or None."""

    def __post_init__(self) -> None:
        if not NAME.match(self.name):
            raise ValueError(f"medium name {self.name!r}: lower case letters, digits, _")
        if not self.deadlines:
            raise ValueError(f"medium {self.name!r} declares no deadline")
        if self.deadlines[0].row != self.name:
            raise ValueError(f"medium {self.name!r}: its first deadline's row must be its name")
        for rule in self.deadlines:
            if not (NAME.match(rule.policy) and NAME.match(rule.row)):
                raise ValueError(f"medium {self.name!r}: bad policy or row in {rule!r}")

    def rule(self, inbound: Inbound) -> DeadlineRule:
        """The deadline rule ``inbound`` falls under."""
        if self.choose is None:
            return self.deadlines[0]
        policy = self.choose(inbound)
        for rule in self.deadlines:
            if rule.policy == policy:
                return rule
        raise ValueError(f"medium {self.name!r} chose an undeclared policy {policy!r}")


class Media:
    """The registered media, in declaration order (the built-in five first)."""

    def __init__(self, media: Iterable[Medium]) -> None:
        self.by_name: dict[str, Medium] = {}
        self.rules: dict[str, DeadlineRule] = {}
        """Every deadline rule by its policy."""
        self.rows: dict[str, DeadlineRule] = {}
        """The rule that names each row (a row's first rule)."""
        self.messages: dict[str, tuple[str, str]] = {}
        for medium in media:
            if medium.name in self.by_name:
                continue  # the first declaration wins, as with channel types
            self.by_name[medium.name] = medium
            for rule in medium.deadlines:
                if rule.policy in self.rules:
                    raise ValueError(f"deadline policy {rule.policy!r} declared twice")
                self.rules[rule.policy] = rule
                self.rows.setdefault(rule.row, rule)
                self.messages[f"channel.{rule.row}"] = rule.label
            self.messages.update(medium.messages)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.by_name

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self.by_name)

    def row_of(self, channel: str, policy: str) -> str:
        """The row a contact counts in: its deadline's row, else its channel."""
        rule = self.rules.get(policy)
        return rule.row if rule is not None else channel

    def label_of(self, channel: str, kind: str) -> str:
        """The row a contact counts in, by channel and deadline kind: the row of the medium's
        rule of that kind (a voice contact with a response deadline, a missed call to return,
        is a callback, ``voice_callback``, apart from the calls)."""
        return self.row_of(channel, self.policy(channel, kind))

    def policy(self, channel: str, kind: str) -> str:
        """The policy of a contact known only by channel and deadline kind (older records)."""
        medium = self.by_name.get(channel)
        for rule in medium.deadlines if medium is not None else ():
            if rule.kind == kind:
                return rule.policy
        return f"{channel}_{kind}"

    def order(self, row: str) -> tuple[int, str]:
        """Sort key of rows: declaration order, unknown rows last by name."""
        rows = list(self.rows)
        return (rows.index(row) if row in self.rows else len(rows), row)

    def color(self, row: str) -> str:
        rule = self.rows.get(row)
        return rule.color if rule is not None else "#7f7f7f"

    def seconds(self, policy: str, overrides: Mapping[str, float]) -> float:
        """A policy's deadline in seconds: the ``[sla]`` override, else the medium's default."""
        if policy in overrides:
            return float(overrides[policy])
        rule = self.rules.get(policy)
        return rule.seconds if rule is not None else 0.0

    def row_deadlines(self, overrides: Mapping[str, float]) -> dict[str, float]:
        """Each row's deadline in seconds (the rule that names the row)."""
        return {row: self.seconds(rule.policy, overrides) for row, rule in self.rows.items()}

    def answer_row(self) -> str | None:
        """The first row whose deadline is an answer (calls): the dashboard's waiting tiles."""
        return next((row for row, rule in self.rows.items() if rule.kind == "answer"), None)
