"""Phone numbers: E.164 normalization with a default region, and masking for logs."""

from __future__ import annotations

import re

import phonenumbers

_DIGITS = re.compile(r"[^\d+]")


def to_e164(raw: str, default_region: str = "CN") -> str | None:
    """Return ``raw`` as E.164 (``+8613800138000``), or None when it is not a phone number.

    Asterisk's ``unknown``, empty strings and anonymous ids give None. A number that does not
    parse but has digits is returned as its digits (short codes, internal extensions).
    """
    text = raw.strip()
    if not text or text.lower() in ("unknown", "anonymous", "restricted", "private", "<unknown>"):
        return None
    region = default_region.upper() or None
    try:
        number = phonenumbers.parse(text, region)
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    except phonenumbers.NumberParseException:
        pass
    digits = _DIGITS.sub("", text)
    return digits if any(c.isdigit() for c in digits) else None


def mask_phone(number: str) -> str:
    """Keep the country prefix and last four digits: ``+86*******8000``."""
    if len(number) <= 6:
        return "*" * len(number)
    head = 3 if number.startswith("+") else 0
    return number[:head] + "*" * (len(number) - head - 4) + number[-4:]
