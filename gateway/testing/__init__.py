"""The adapter kit: what any channel adapter (built-in or from another distribution) runs in
its own tests to show it keeps the gateway's contract.

Public API (see docs/adapters.md):

- ``WebhookKit``, ``Request``: how to reach one HTTP webhook adapter (its config table, a valid
  signed request for a message id and text, requests it must refuse, its secrets).
- ``SmtpKit`` (SMTP transactions over a socket), ``AgiKit`` (FastAGI calls from a fake
  Asterisk), ``PeerKit`` (any other protocol as two callables: deliver one message, deliver
  one bad input): the same checks for adapters that are not HTTP webhooks. Every kit answers
  the ``AdapterKit`` protocol; a delivery's answer is a ``Delivery`` (``ok``, ``retry`` or
  ``refused``, with the protocol's own answer).
- ``check_*`` coroutines: the behavioural contract (acknowledged only once durable, the
  protocol's retry-later when nothing can be stored, redelivery deduplicated, bad input
  refused without a crash, no secret nor full number in logs, replies stamped).
- ``WebhookCase``, ``run_case``: a table-driven runner (a request, the expected status, the
  contact's fields and the events stamped), in the spirit of courier's handler tests;
  ``KitCase``, ``run_kit_case``: the same for any kit (a delivery and its expected outcome).
- ``eventually``: the polling helper the checks use (and the gateway's own tests);
  ``break_spool``: make a gateway's local spool unusable (with Redis stopped: nothing stored).
- ``gateway.testing.plugin``: pytest fixtures (a session Redis, a Redis of one's own, a gateway
  starter) for a distribution's own test suite: ``pytest_plugins = ["gateway.testing.plugin"]``.

Version policy: ``KIT_VERSION`` is the kit's own major version. Names exported here keep their
meaning and signatures within one major version; new checks and new optional fields (with
defaults) may be added in any release, so an adapter that passes the kit may fail a newer kit
only where it breaks a rule the gateway already documents. Anything not exported here
(underscored names, other modules' internals) may change at any time.
"""

from __future__ import annotations

from gateway.testing.agi import AgiKit
from gateway.testing.contract import (
    ALL_CHECKS,
    AdapterKit,
    Delivery,
    KitCase,
    PeerKit,
    ProviderAnswer,
    StartGateway,
    WebhookKit,
    break_spool,
    check_acknowledged_only_once_durable,
    check_bad_input_refused,
    check_no_secret_in_logs,
    check_redelivery_deduplicated,
    check_replies_stamped,
    check_retry_later_when_nothing_stored,
    run_kit_case,
)
from gateway.testing.poll import eventually
from gateway.testing.smtp import SmtpKit
from gateway.testing.webhook import (
    Request,
    RequestSource,
    WebhookCase,
    build,
    field_of,
    run_case,
    send,
)

KIT_VERSION = 1

__all__ = [
    "ALL_CHECKS",
    "KIT_VERSION",
    "AdapterKit",
    "AgiKit",
    "Delivery",
    "KitCase",
    "PeerKit",
    "ProviderAnswer",
    "Request",
    "RequestSource",
    "SmtpKit",
    "StartGateway",
    "WebhookCase",
    "WebhookKit",
    "break_spool",
    "build",
    "check_acknowledged_only_once_durable",
    "check_bad_input_refused",
    "check_no_secret_in_logs",
    "check_redelivery_deduplicated",
    "check_replies_stamped",
    "check_retry_later_when_nothing_stored",
    "eventually",
    "field_of",
    "run_case",
    "run_kit_case",
    "send",
]
