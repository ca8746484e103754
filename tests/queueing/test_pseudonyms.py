"""Pseudonyms: HMAC-SHA256 from precomputed key states, the same values as ``hmac.new``."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.queueing.keys import Keys
from gateway.queueing.store import Pseudonyms


@given(key=st.binary(min_size=1, max_size=200), address=st.text(max_size=80))
@example(key=b"k" * 64, address="+8613800138000")  # the fleet's key is 64 hex characters
@example(key=b"k" * 65, address="a")  # longer than the block: hashed first
def test_pseudonyms_are_hmac_sha256_of_the_address(key: bytes, address: str) -> None:
    pseudonyms = Pseudonyms(None, Keys("t"))
    pseudonyms.use(key)
    data = address.encode("utf-8", "surrogatepass")
    expected = "p" + hmac.new(key, data, hashlib.sha256).hexdigest()[:32] if address else ""
    assert pseudonyms.of(address) == expected
