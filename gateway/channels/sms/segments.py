"""SMS encodings and segments: GSM 03.38 7-bit (160/153 septets) or UCS-2 (70/67 units).

A text that uses only the GSM 7-bit default alphabet and its extension table is sent as
GSM-7; extension characters (``^{}\\[~]|€`` and form feed) take two septets (escape + char).
Anything else needs UCS-2, where a character outside the BMP takes two UTF-16 code units.
A concatenated message spends 6 octets of every part on the UDH, hence 153 and 67.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Encoding = Literal["gsm7", "ucs2"]

GSM7_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
GSM7_EXTENSION: Final = frozenset("\f^{}\\[~]|€")

SINGLE_GSM7: Final = 160
PART_GSM7: Final = 153
SINGLE_UCS2: Final = 70
PART_UCS2: Final = 67

# Look-alikes that phones and word processors produce, mapped to GSM-7 (optional, see `substitute`).
_SUBSTITUTIONS: Final = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
        "\u00a0": " ",
        "\t": " ",
        "\u2022": "-",
    }
)


@dataclass(frozen=True, slots=True)
class Segments:
    """How a text goes on the air: its encoding and the text of each part."""

    encoding: Encoding
    parts: tuple[str, ...]
    units: int
    """Septets (GSM-7) or UTF-16 code units (UCS-2) of the whole text."""

    @property
    def count(self) -> int:
        return len(self.parts)


def is_gsm7(text: str) -> bool:
    """Return True when every character is in the GSM 7-bit alphabet or its extension."""
    return all(c in GSM7_BASIC or c in GSM7_EXTENSION for c in text)


def substitute(text: str) -> str:
    """Replace typographic look-alikes (curly quotes, dashes, ellipsis) by GSM-7 characters."""
    return text.translate(_SUBSTITUTIONS)


def encoding_for(text: str) -> Encoding:
    """Return the encoding a text needs: ``gsm7`` when possible, else ``ucs2``."""
    return "gsm7" if is_gsm7(text) else "ucs2"


def _cost(char: str, encoding: Encoding) -> int:
    if encoding == "gsm7":
        return 2 if char in GSM7_EXTENSION else 1
    return 2 if ord(char) > 0xFFFF else 1


def units(text: str, encoding: Encoding | None = None) -> int:
    """Return the septets (GSM-7) or UTF-16 code units (UCS-2) that ``text`` takes."""
    enc = encoding or encoding_for(text)
    return sum(_cost(c, enc) for c in text)


def split(text: str, encoding: Encoding | None = None) -> Segments:
    """Split ``text`` into the parts a handset reassembles; an escape pair or a surrogate
    pair is never cut in two. An empty text is one empty part."""
    enc = encoding or encoding_for(text)
    if enc == "gsm7" and not is_gsm7(text):
        raise ValueError("text is not representable in GSM-7")
    total = units(text, enc)
    single, per_part = (SINGLE_GSM7, PART_GSM7) if enc == "gsm7" else (SINGLE_UCS2, PART_UCS2)
    if total <= single:
        return Segments(enc, (text,), total)
    parts: list[str] = []
    current: list[str] = []
    used = 0
    for char in text:
        cost = _cost(char, enc)
        if used + cost > per_part:
            parts.append("".join(current))
            current, used = [], 0
        current.append(char)
        used += cost
    if current:
        parts.append("".join(current))
    return Segments(enc, tuple(parts), total)
