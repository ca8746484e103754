"""GSM 03.38 default alphabet and its extension table, one septet per octet (unpacked).

SMPP carries GSM-7 text unpacked: each septet in an octet of its own (``data_coding`` 0 on most
SMSCs). An escape (0x1B) followed by a septet of the extension table is one character; an escape
before anything else reads as the character of the basic table (3GPP TS 23.038 6.2.1.1).
"""

from __future__ import annotations

from typing import Final

BASIC: Final = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
EXTENSION: Final = {
    0x0A: "\f", 0x14: "^", 0x28: "{", 0x29: "}", 0x2F: "\\",
    0x3C: "[", 0x3D: "~", 0x3E: "]", 0x40: "|", 0x65: "€",
}
ESC: Final = 0x1B

_ENCODE: Final = {c: bytes([i]) for i, c in enumerate(BASIC) if i != ESC}
_ENCODE.update({c: bytes([ESC, i]) for i, c in EXTENSION.items()})

assert len(BASIC) == 128


def decode(data: bytes) -> str:
    """Unpacked septets to text; the high bit of each octet is ignored."""
    out: list[str] = []
    escaped = False
    for octet in data:
        septet = octet & 0x7F
        if escaped:
            escaped = False
            out.append(EXTENSION.get(septet, BASIC[septet] if septet != ESC else " "))
        elif septet == ESC:
            escaped = True
        else:
            out.append(BASIC[septet])
    return "".join(out)


def encode(text: str) -> bytes:
    """Text to unpacked septets; raises ValueError for a character outside the alphabet."""
    try:
        return b"".join(_ENCODE[c] for c in text)
    except KeyError as exc:
        raise ValueError(f"not in the GSM 7-bit alphabet: {exc.args[0]!r}") from None
