"""The Redis key layout: every key shares one hash tag, ``{prefix}``, so one slot holds them all."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Names of the gateway's keys under one prefix (default ``gateway``)."""

    prefix: str = "gateway"

    @property
    def tag(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def contacts(self) -> str:
        return f"{self.tag}:contacts"

    @property
    def events(self) -> str:
        return f"{self.tag}:events"

    @property
    def replies(self) -> str:
        return f"{self.tag}:replies"

    @property
    def deadlines(self) -> str:
        """Sorted set: contact id scored by its deadline (microseconds)."""
        return f"{self.tag}:deadlines"

    @property
    def warnings(self) -> str:
        """Sorted set: contact id scored by when its warning is due (microseconds)."""
        return f"{self.tag}:warnings"

    def contact(self, contact_id: str) -> str:
        """Hash: the contact's JSON, stream entry id, edge stamp, deadline and stamps."""
        return f"{self.tag}:contact:{contact_id}"

    def dedupe(self, adapter: str, external_id: str) -> str:
        """String: the first contact id seen for (adapter, external_id)."""
        return f"{self.tag}:dedupe:{adapter}:{_short(external_id)}"

    def sender(self, address: str) -> str:
        """Sorted set: a sender's recent contacts scored by arrival (repeat counting)."""
        return f"{self.tag}:sender:{_short(address)}"

    def lease(self, name: str) -> str:
        """String: ``<holder>/<fence>`` of the instance holding lease ``name`` (with a TTL)."""
        return f"{self.tag}:lease:{_short(name)}"

    def lease_fence(self, name: str) -> str:
        """Counter: the last fencing token handed out for lease ``name``."""
        return f"{self.tag}:lease:{_short(name)}:fence"

    def state(self, scope: str, key: str) -> str:
        """Shared state with expiry (``SharedState``) of one scope, usually an adapter."""
        return f"{self.tag}:state:{_short(scope)}:{_short(key)}"


def _short(value: str) -> str:
    """Keep keys bounded: long or binary-ish identifiers are hashed."""
    if len(value) <= 128 and value.isprintable():
        return value
    return "sha1:" + hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()  # noqa: S324
