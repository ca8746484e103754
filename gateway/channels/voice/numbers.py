r"""Caller numbers as E.164 without a phonenumbers parse per new caller.

``phonenumbers.parse`` and ``is_valid_number`` cost about 20 us a number, more than any other
step of a FastAGI call (most callers are new to the gateway's cache). For a caller id of ASCII
digits in a region whose metadata allows it, the answer depends only on the number's length
and its first few digits, and the digits after those come out unchanged at its end: so the
answer for one number of a (length, leading digits) class gives every other's by swapping the
tail (``PrefixTemplates``).

Why that holds (``region_rule``): for an all-digit number phonenumbers decides everything by
regular expressions over the digits (the region's national number patterns, its national
prefix for parsing, matched at the start) and by lengths, and strips at most a prefix (the
national prefix or a carrier code) before it formats ``+<country code><national number>``. A
pattern's answer depends on a digit only where the pattern has something other than ``\d``
there; ``_walk`` goes through each pattern's parse tree for the furthest such position, and
gives up (no rule: phonenumbers for every number) when such a token may follow an unbounded
repeat or the pattern uses anything it does not know. The decisive digits of a number are
those of the national prefix's pattern and, after the prefix that matched (stripped or not),
those of the national number patterns. Left to phonenumbers itself: numbers that start with
the region's international prefix or its country code (the country is then read from the
number), regions that share a country code (NANPA: several regions' metadata decide) or have
a national prefix transform rule (digits rearranged). A test holds the templates to
phonenumbers' own answers over random numbers of many regions.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

try:  # CPython's own parse trees of regular expressions (private: 3.11 moved them here)
    from re import _constants as sre_c  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # another Python: no rule, phonenumbers for every number
    sre_c = sre_parse = None

import phonenumbers
from phonenumbers import phonenumberutil as pu

_DESCS = (
    "general_desc", "fixed_line", "mobile", "toll_free", "premium_rate", "shared_cost", "voip",
    "personal_number", "pager", "uan", "voicemail", "no_international_dialling",
)
_DIGIT_CODES = frozenset(range(ord("0"), ord("9") + 1))
_UNBOUNDED = sre_c.MAXREPEAT if sre_c is not None else 0


class _Unprovable(Exception):
    pass


def _free(token: tuple[Any, Any]) -> bool:
    """True when the one-character token accepts every ASCII digit."""
    op, av = token
    if op is sre_c.ANY:
        return True
    if op is not sre_c.IN:
        return False
    accepted: set[int] = set()
    for kind, value in av:
        if kind is sre_c.NEGATE:
            return False
        if kind is sre_c.CATEGORY:
            if value is sre_c.CATEGORY_DIGIT:
                return True
        elif kind is sre_c.LITERAL:
            accepted.add(value)
        elif kind is sre_c.RANGE:
            accepted.update(range(value[0], value[1] + 1))
    return _DIGIT_CODES <= accepted


def _walk(items: Any, at: int) -> tuple[int, int]:
    """``(depth, end)`` of a sequence starting at offset ``at`` (its furthest): the furthest
    end of a token that is not ``\\d``, and the furthest end of the sequence."""
    depth = 0
    for op, av in items:
        if op in (sre_c.LITERAL, sre_c.NOT_LITERAL, sre_c.IN, sre_c.ANY):
            at += 1
            if not _free((op, av)):
                depth = max(depth, at)
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT, sre_c.POSSESSIVE_REPEAT):
            _, high, sub = av
            inner_depth, width = _walk(sub, 0)
            if inner_depth:
                if high is _UNBOUNDED:
                    raise _Unprovable("a digit that matters after an unbounded repeat")
                depth = max(depth, at + (high - 1) * width + inner_depth)
            if high is _UNBOUNDED:
                at = _UNBOUNDED_AT if width else at
            else:
                at += high * width
        elif op is sre_c.SUBPATTERN:
            inner_depth, at = _walk(av[-1], at)
            depth = max(depth, inner_depth)
        elif op is sre_c.BRANCH:
            ends = []
            for alternative in av[1]:
                inner_depth, end = _walk(alternative, at)
                depth = max(depth, inner_depth)
                ends.append(end)
            at = max(ends)
        elif op in (sre_c.ASSERT, sre_c.ASSERT_NOT):
            inner_depth, _ = _walk(av[1], at)
            depth = max(depth, inner_depth)
        elif op is sre_c.AT:
            pass
        else:
            raise _Unprovable(f"regular expression token {op}")
        if depth >= _UNBOUNDED_AT:
            raise _Unprovable("a digit that matters after an unbounded repeat")
    return depth, at


_UNBOUNDED_AT = 1 << 20
"""An offset standing for "anywhere after an unbounded repeat"."""


def _pattern_depth(pattern: str) -> tuple[int, int]:
    return _walk(sre_parse.parse(pattern), 0)


@dataclass(frozen=True, slots=True)
class RegionRule:
    """What decides an all-digit number's E.164 form in one region (``region_rule``)."""

    excluded: Callable[[str], bool]
    """Numbers left to phonenumbers: they start with the international prefix or the country
    code (the country is then read from the number)."""
    prefix: Callable[[str], re.Match[str] | None] | None
    """The national prefix for parsing, matched at the start (None: the region has none)."""
    prefix_depth: int
    """Digits that decide whether and how that prefix matches."""
    depth: int
    """Digits of the national number that decide its validity and type."""

    def decisive(self, number: str) -> int:
        """How many leading digits of ``number`` decide its answer: those that decide the
        prefix, and the national number's decisive digits after the longest prefix that can
        be stripped from it."""
        found = self.prefix(number) if self.prefix is not None else None
        return max(self.prefix_depth, (found.end() if found else 0) + self.depth)


@lru_cache(maxsize=64)
def region_rule(region: str) -> RegionRule | None:
    """The region's rule, or None when its metadata does not allow one (then every number
    goes to phonenumbers)."""
    if sre_parse is None:
        return None
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region.upper())
    if metadata is None or metadata.country_code is None:
        return None
    if len(pu.COUNTRY_CODE_TO_REGION_CODE.get(metadata.country_code, ())) != 1:
        return None  # shared country code: other regions' metadata take part
    if metadata.national_prefix_transform_rule:
        return None  # the national number is rearranged
    try:
        prefix = None
        prefix_depth = 0
        if metadata.national_prefix_for_parsing:
            prefix_depth, end = _pattern_depth(metadata.national_prefix_for_parsing)
            if end >= _UNBOUNDED_AT:
                return None
            prefix = re.compile(metadata.national_prefix_for_parsing).match
        depth = 0
        for name in _DESCS:
            pattern = getattr(getattr(metadata, name, None), "national_number_pattern", None)
            if pattern:
                depth = max(depth, _pattern_depth(pattern)[0])
    except Exception:  # _Unprovable, re.error, or a parse tree of a shape not known here
        return None
    code = str(metadata.country_code)
    idd = re.compile(metadata.international_prefix).match if metadata.international_prefix else None

    def excluded(number: str) -> bool:
        return number.startswith(code) or (idd is not None and idd(number) is not None)

    return RegionRule(excluded, prefix, prefix_depth, depth)


class PrefixTemplates:
    """``convert(number, region)`` for all-digit numbers from one answer per (region, length,
    decisive leading digits): the rest of the number is its answer's tail."""

    def __init__(self, convert: Callable[[str, str], str], max_templates: int = 16384) -> None:
        self.convert = convert
        self.max_templates = max_templates
        self._heads: OrderedDict[tuple[str, int, str], str] = OrderedDict()
        """Oldest first: when full, the oldest goes (one at a time, not a clear that would
        hold the event loop for a whole table's worth of frees)."""

    def __call__(self, raw: str, region: str) -> str:
        rule = region_rule(region) if raw.isascii() and raw.isdigit() else None
        if rule is None or rule.excluded(raw):
            return self.convert(raw, region)
        depth = rule.decisive(raw)
        if len(raw) <= depth:
            return self.convert(raw, region)
        key = (region, len(raw), raw[:depth])
        head = self._heads.get(key)
        if head is not None:
            return head + raw[depth:]
        answer = self.convert(raw, region)
        tail = raw[depth:]
        if answer.endswith(tail):  # always, by the reasoning above; else no template
            if len(self._heads) >= self.max_templates:
                self._heads.popitem(last=False)
            self._heads[key] = answer[: len(answer) - len(tail)]
        return answer
