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


@given(
    prefix=st.text(alphabet="abcxyz-:{}", min_size=1, max_size=12),
    adapter=st.text(max_size=20),
    external_id=st.text(max_size=40),
    address=st.text(max_size=40),
)
def test_a_contacts_own_key_names_are_the_keys_layouts(
    prefix: str, adapter: str, external_id: str, address: str
) -> None:
    """``RedisQueue._encode`` builds the dedupe, sender, contact and sender-first names from
    heads made once: the same names as ``Keys`` (whatever the prefix, adapter, id, address)."""
    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.store import Prepared, RedisQueue
    from gateway.records import Deadline, Inbound, Sender

    keys = Keys(prefix)
    queue = RedisQueue(None, keys, SYSTEM_CLOCK, source="t", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=60, maxlen=10)
    queue.pseudonyms.use(b"k" * 64)
    now = SYSTEM_CLOCK.now_us()
    inbound = Inbound(channel="sms", adapter=adapter, external_id=external_id,
                      sender=Sender(address), recipient="", received_at=now)
    p = Prepared("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", inbound,
                 Deadline("response", now + 1, "sms_response"), now)
    try:
        names = queue._encode(p, now, "2026-12-01T00:00:00.000000Z")[0]
    except UnicodeEncodeError:  # a lone surrogate in the adapter: that contact alone fails
        return
    of = queue.pseudonyms.of
    sender = of(address)
    assert names[0] == keys.dedupe(adapter, of(external_id or p.id)).encode()
    assert names[1] == keys.sender(sender).encode()
    assert names[2] == keys.contact(p.id)
    assert names[6] == keys.sender_first(sender).encode()


def test_the_dedupe_keys_adapter_part_comes_from_keys() -> None:
    """The whole dedupe key name is ``Keys``' (``dedupe_of(adapter)`` + the id's pseudonym):
    ``_encode`` no longer writes the ``<adapter>:`` part itself, so a layout that ``Keys``
    gives is the one written."""
    from dataclasses import dataclass

    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.queueing.store import Prepared, RedisQueue
    from gateway.records import Deadline, Inbound, Sender

    @dataclass(frozen=True, slots=True)
    class Elsewhere(Keys):
        def dedupe_of(self, adapter: str) -> str:
            return f"{self.tag}:once:{adapter}/"

    keys = Elsewhere("t")
    queue = RedisQueue(None, keys, SYSTEM_CLOCK, source="t", dedupe_window_s=60,
                       repeat_window_s=60, retention_s=60, maxlen=10)
    queue.pseudonyms.use(b"k" * 64)
    now = SYSTEM_CLOCK.now_us()
    for adapter in ("kannel", "wx", "kannel"):
        inbound = Inbound(channel="sms", adapter=adapter, external_id="m-1",
                          sender=Sender("+8613800138000"), recipient="", received_at=now)
        p = Prepared("0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", inbound,
                     Deadline("response", now + 1, "sms_response"), now)
        names = queue._encode(p, now, "2026-12-01T00:00:00.000000Z")[0]
        pseudonym = queue.pseudonyms.of("m-1")
        assert names[0] == f"{{t}}:once:{adapter}/{pseudonym}".encode()
        assert names[0] == keys.dedupe(adapter, pseudonym).encode()
