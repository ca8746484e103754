"""The Redis key layout: every key shares one hash tag, ``{prefix}``, so one slot holds them all."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

AGG_BUCKET_TTL_S = 2 * 86400 + 3600
"""How long a dashboard bucket (``Keys.agg_bucket``) is kept after its first contact."""


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

    def replies_to(self, adapter: str) -> str:
        """Stream: replies routed to one adapter, read by the instances that run it."""
        return f"{self.tag}:replies:{adapter}"

    @property
    def reply_adapters(self) -> str:
        """Set: adapters that replies have been routed to (their streams are trimmed, watched)."""
        return f"{self.tag}:reply-adapters"

    def reply_senders(self, adapter: str) -> str:
        """Sorted set: instances running the adapter, scored by when their heartbeat expires
        (milliseconds)."""
        return f"{self.tag}:reply-senders:{adapter}"

    @property
    def deadlines(self) -> str:
        """Sorted set: contact id scored by its deadline (microseconds)."""
        return f"{self.tag}:deadlines"

    @property
    def warnings(self) -> str:
        """Sorted set: contact id scored by when its warning is due (microseconds)."""
        return f"{self.tag}:warnings"

    # A contact's own keys are a head and its id or pseudonym: the heads are properties of
    # their own, so that a caller that names many (``RedisQueue._encode``, the aggregator)
    # makes them once and the layout stays here.

    @property
    def contact_head(self) -> str:
        return f"{self.tag}:contact:"

    @property
    def dedupe_head(self) -> str:
        return f"{self.tag}:dedupe:"

    @property
    def sender_head(self) -> str:
        return f"{self.tag}:sender:"

    @property
    def sender_first_head(self) -> str:
        return f"{self.tag}:first:"

    def contact(self, contact_id: str) -> str:
        """Hash: the contact's JSON, stream entry id, edge stamp, deadline and stamps."""
        return self.contact_head + contact_id

    def dedupe_of(self, adapter: str) -> str:
        """The head of one adapter's dedupe keys: ``dedupe(adapter, id)`` is it and the id
        (``RedisQueue._encode`` makes it once per adapter and adds a pseudonym)."""
        return f"{self.dedupe_head}{adapter}:"

    def dedupe(self, adapter: str, external_id: str) -> str:
        """String: the first contact id seen for (adapter, external_id)."""
        return self.dedupe_of(adapter) + _short(external_id)

    def rate(self, scope: str, name: str, window: int) -> str:
        """Counter: contacts of one sender (by pseudonym) or adapter in one fixed window (rate
        limits)."""
        return f"{self.tag}:rate:{scope}:{_short(name)}:{window}"

    def sender(self, pseudonym: str) -> str:
        """Sorted set: a sender's recent contacts scored by arrival (repeat counting). Keyed by
        the sender's pseudonym (``RedisQueue.pseudonym``), never the address itself."""
        return self.sender_head + _short(pseudonym)

    def sender_first(self, pseudonym: str) -> str:
        """String: the received_at (us) of a sender's contact that found no such key (its
        first in a repeat window), which is kept here instead of in the sender's sorted set;
        expires one window after the last contact that made or read it (every repeat moves its
        expiry with the set's: ``intake.lua``). Its name's last ``:`` part is the pseudonym:
        ``intake.lua`` takes it from there for a repeat's ``enqueued`` event (field
        ``sender``; ``RedisQueue._encode`` makes the name as ``sender_first_head`` and the
        pseudonym)."""
        return self.sender_first_head + _short(pseudonym)

    @property
    def pseudonym_key(self) -> str:
        """String: the fleet's key for pseudonyms of senders in key names (made once)."""
        return f"{self.tag}:pseudonym-key"

    @property
    def replicated(self) -> str:
        """Pub/sub channel (no key, nothing stored): published to before each ``WAIT`` of a
        write with ``redis.min_replicas``, so the ``WAIT`` covers every earlier write."""
        return f"{self.tag}:replicated"

    def lease(self, name: str) -> str:
        """String: ``<holder>/<fence>`` of the instance holding lease ``name`` (with a TTL)."""
        return f"{self.tag}:lease:{_short(name)}"

    def lease_fence(self, name: str) -> str:
        """Counter: the last fencing token handed out for lease ``name``."""
        return f"{self.tag}:lease:{_short(name)}:fence"

    def state(self, scope: str, key: str) -> str:
        """Shared state with expiry (``SharedState``) of one scope, usually an adapter."""
        return f"{self.tag}:state:{_short(scope)}:{_short(key)}"

    def held_files(self, store: str) -> str:
        """Hash: files of one attachment folder (``store``: the id kept in it,
        ``held.store_name``) held by sha256 until they are written to their own files
        (``gateway/queueing/held.py``)."""
        return f"{self.tag}:held:{_short(store)}"

    @property
    def agg_cursor(self) -> str:
        """String: ``<entry id> <entries-read>``, the last entry of ``{p}:events`` the dashboard's
        aggregator has done with (``advance.lua``; it expires a day after its last move)."""
        return f"{self.tag}:agg:cursor"

    def agg_bucket(self, unit: str, start_s: int) -> str:
        """Hash: service-level counters of the contacts received in one minute (``m``) or
        hour (``h``) starting at ``start_s`` (``gateway/cases/dashboard/aggregates.py``)."""
        return f"{self.tag}:agg:{unit}:{start_s}"

    def agg_open(self, label: str) -> str:
        """Sorted set: a channel's contacts neither settled nor breached, scored by deadline."""
        return f"{self.tag}:agg:open:{label}"

    @property
    def agg_waiting(self) -> str:
        """Sorted set: calls neither answered nor abandoned, scored by arrival (us)."""
        return f"{self.tag}:agg:waiting"

    @property
    def agg_breaches(self) -> str:
        """Sorted set: contacts that missed their deadline, scored by when (us)."""
        return f"{self.tag}:agg:breaches"

    @property
    def agg_repeats(self) -> str:
        """Sorted set: third and later contacts of one sender, scored by arrival (us)."""
        return f"{self.tag}:agg:repeats"

    def surge_bucket(self, start_s: int) -> str:
        """Hash: contacts per surge key (``kind:value``) in one period (``cases/surge.py``)."""
        return f"{self.tag}:surge:b:{start_s}"

    def surge_emitted(self, key: str, start_s: int) -> str:
        """String, expiring: when a surge of ``key`` was written in the period (two windows; a
        repeat's: the day) starting at ``start_s``; set NX, so it is written once."""
        return f"{self.tag}:surge:e:{_short(key)}:{start_s}"

    def surge_samples(self, key: str, start_s: int) -> str:
        """List: the latest contact ids of ``key`` in one period."""
        return f"{self.tag}:surge:s:{_short(key)}:{start_s}"

    @property
    def surge_first(self) -> str:
        """String: the arrival (us) of the first contact the surge counters hold."""
        return f"{self.tag}:surge:first"

    @property
    def surges(self) -> str:
        """Sorted set: surge event JSON, scored by when it was emitted (us)."""
        return f"{self.tag}:surges"


def _short(value: str) -> str:
    """Keep keys bounded: long or binary-ish identifiers are hashed."""
    if len(value) <= 128 and value.isprintable():
        return value
    return "sha1:" + hashlib.sha1(value.encode("utf-8", "surrogatepass")).hexdigest()  # noqa: S324
