"""A table-driven runner for HTTP webhook adapters: real HTTP to a started gateway, then the
contact and events read back from Redis."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.testing.poll import eventually

if TYPE_CHECKING:
    from gateway.records import Contact
    from gateway.server.runtime import Gateway


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request to the gateway's listener (``path`` may carry a query)."""

    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    method: str = "POST"


RequestSource = Request | Callable[[], Request]
"""A request, or a function that builds it when it is sent: a request signed over a timestamp
(WeChat, Weibo) goes stale minutes after it was built (the provider's window), and a table
built when the tests are collected would be refused for that instead of for what it tests."""


def build(request: RequestSource) -> Request:
    """The request to send now (built at this moment when it is a function)."""
    return request if isinstance(request, Request) else request()


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


async def send(gateway: Gateway, source: RequestSource) -> Answer:
    """Send a request (built now if ``source`` is a function) to ``gateway``'s HTTP listener
    over a real socket."""
    request = build(source)
    url = f"http://127.0.0.1:{gateway.http_port}{request.path}"
    async with aiohttp.ClientSession() as http, http.request(
        request.method, url, data=request.body, headers=dict(request.headers)
    ) as resp:
        return Answer(resp.status, dict(resp.headers), await resp.read())


def field_of(contact: Contact, path: str) -> Any:
    """A contact's field by dotted path: ``text``, ``sender.address``, ``meta.provider``."""
    value: Any = contact
    for key in path.split("."):
        value = value[key] if isinstance(value, Mapping) else getattr(value, key)
    return value


@dataclass(frozen=True, slots=True)
class WebhookCase:
    """One row of a handler table.

    ``contact``: the expected fields of the one contact stored (dotted paths), or ``None`` when
    the request must store nothing (any status but 2xx stores nothing). ``events``: event types
    that must be stamped for that contact (others may be stamped too).
    """

    label: str
    request: RequestSource
    status: int
    contact: Mapping[str, Any] | None = None
    events: Sequence[str] = ()


async def run_case(gateway: Gateway, case: WebhookCase) -> Contact | None:
    """Send the case's request to a fresh gateway and check status, contact and events."""
    answer = await send(gateway, case.request)
    assert answer.status == case.status, (case.label, answer.status, answer.body[:200])
    return await stored_as(gateway, case.label, case.contact, case.events)


async def stored_as(gateway: Gateway, label: str, expected: Mapping[str, Any] | None,
                    events: Sequence[str] = ()) -> Contact | None:
    """The one contact stored, with the ``expected`` fields (dotted paths) and the ``events``
    stamped (polled); or, with ``expected=None``, nothing stored at all."""
    contacts = await gateway.read_contacts()
    if expected is None:
        assert contacts == [], (label, "stored a contact", contacts)
        return None
    assert len(contacts) == 1, (label, contacts)
    (contact,) = contacts
    for path, value in expected.items():
        assert field_of(contact, path) == value, (label, path, field_of(contact, path))
    wanted = set(events)

    async def stamped() -> bool:
        seen = {e.type for e in await gateway.read_events() if e.contact_id == contact.id}
        return wanted <= seen

    await eventually(stamped)
    return contact
