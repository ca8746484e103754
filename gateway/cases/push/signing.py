"""Webhook signatures: HMAC-SHA256 over ``<timestamp>.<body>`` with the subscriber's secret.

Headers on every POST:
  ``X-Gateway-Timestamp: 1795594483``            (Unix seconds when this attempt was signed)
  ``X-Gateway-Signature: sha256=<hex digest>``   (HMAC-SHA256(secret, b"1795594483." + body))
A receiver recomputes the digest over the raw body, compares in constant time, and refuses
timestamps too far from its clock (default 5 minutes), which stops replays of old requests.
"""

from __future__ import annotations

import hashlib
import hmac

TIMESTAMP_HEADER = "X-Gateway-Timestamp"
SIGNATURE_HEADER = "X-Gateway-Signature"
DELIVERY_HEADER = "X-Gateway-Delivery"
KIND_HEADER = "X-Gateway-Kind"
ATTEMPT_HEADER = "X-Gateway-Attempt"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the ``X-Gateway-Signature`` value for ``body`` signed at ``timestamp``."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    now_s: int,
    tolerance_s: int = 300,
) -> bool:
    """True when ``signature`` is ours for ``body`` at ``timestamp``, and the time is fresh."""
    if not timestamp.isdigit() or abs(now_s - int(timestamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), signature)
