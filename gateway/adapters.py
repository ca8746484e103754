"""The adapter interface every channel plugs into, and the registry of channel types.

A channel type (``ChannelType``) names a config dataclass and a factory. The factory gets an
``AdapterContext`` (the door into the gateway: Intake, events, HTTP routes, attachments, clock)
and returns an ``Adapter``. Built-in types are listed in ``gateway.channels.BUILTIN`` (each
medium folder registers its own in ``TYPES``); other packages add types through the
``gateway.channels`` entry-point group.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from gateway.contact.clock import Clock, Micros
from gateway.contact.media import DeadlineRule as DeadlineRule  # public: declaring a medium
from gateway.contact.media import Media
from gateway.contact.media import Medium as Medium
from gateway.records import Contact, Deadline, Event, EventType, Inbound, Repeat, Reply
from gateway.server.egress import SendRate
from gateway.server.metrics import AdapterMetrics
from gateway.server.supervise import Supervisor

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.contact.attachments import AttachmentStore
    from gateway.queueing.coordination import Leases, SharedState
    from gateway.server.config import AdapterCheck, AdapterSettings


@dataclass(frozen=True, slots=True)
class Receipt:
    """What Intake answers once a contact is durable.

    ``status`` is ``enqueued`` (in Redis), ``duplicate`` (already there: ``contact_id`` is the
    first contact's id) or ``spooled`` (in the local spool, replayed to Redis later).
    """

    contact_id: str
    status: str
    deadline: Deadline
    repeat: Repeat

    @property
    def durable(self) -> bool:
        return self.status in ("enqueued", "duplicate", "spooled")


class IntakeUnavailable(Exception):
    """Neither Redis nor the spool could take the contact: the peer must retry later."""


class Overloaded(IntakeUnavailable):
    """The gateway holds as much as it may (``[limits] in_flight``, ``loop_lag``): the peer
    must retry later. Counted and logged in summary by the gateway, not per contact."""


class RateLimited(Exception):
    """Too many contacts from one sender (or through one adapter) in the configured window:
    the peer must slow down. Answered the protocol's way: HTTP 429 with ``Retry-After``, SMTP
    451 4.7.1, AGI the fail path (``GATEWAY_STATUS=FAILED``, the call still queues)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate limited, retry after {retry_after_s:.0f} s")
        self.retry_after_s = retry_after_s


class InvalidContact(ValueError):
    """The contact cannot be encoded (e.g. ``meta`` nested too deep): refuse it as bad input."""


class Submitter(Protocol):
    """The one door into the queue."""

    async def submit(
        self, inbound: Inbound, *, held: tuple[str, Mapping[str, bytes]] | None = None
    ) -> Receipt:
        """Make the contact durable and return its receipt.

        Raises ``IntakeUnavailable`` (retry later) or ``InvalidContact`` (bad input). Cancelling
        the caller does not cancel the write: the contact still becomes durable. ``held``: a
        hash key and fields (``AttachmentStore.plan``) set in Redis in the contact's own write,
        before it; only a receipt ``enqueued`` says they were (a spooled contact has none).
        """
        ...


class EventSink(Protocol):
    """Writes events on ``{gateway}:events``."""

    async def emit(self, event: Event) -> None:
        """Append one event."""
        ...

    async def stamp(
        self,
        contact_id: str,
        type: EventType,
        at: Micros,
        source: str,
        detail: dict[str, Any] | None = None,
    ) -> Event | None:
        """Record a deadline event (answered, responded, acknowledged) once per contact and type.

        Computes ``elapsed_ms`` from the contact's ``received_at`` and ``met`` against its deadline,
        clears the deadline when it is the contact's own kind, and returns the event, or None when
        that type was already stamped (or the contact is unknown).
        """
        ...


class ContactLookup(Protocol):
    """Finds a contact by id (reply routing, callbacks)."""

    async def get(self, contact_id: str) -> Contact | None: ...

    async def events(self, contact_id: str) -> list[Event]:
        """The contact's events so far, oldest first (empty once it has expired)."""
        ...


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """A reply handed to the provider; ``external_id`` is the provider's own id, if any."""

    external_id: str | None = None
    detail: Mapping[str, Any] | None = None


class SendError(Exception):
    """A reply could not be delivered. ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class AdapterContext:
    """Everything an adapter may touch; it never sees Redis or the server itself.

    ``leases`` (``gateway.queueing.coordination.Leases``): what must run once per fleet of
    instances on one Redis (a poller, a tracker) runs as ``await ctx.leases.exclusive(name,
    work)``: ``work(fence)`` runs only while this instance holds lease ``name``, is cancelled
    when the lease is lost or Redis is away, and the loop contends again. Name the lease by the
    remote thing (the bot, the PBX), not by the instance. ``fence.token`` grows with every
    acquisition; writes passed ``fence=`` happen only while it is still held.

    ``state`` (``SharedState``, scoped to this adapter's name): small state with expiry that
    the fleet shares and a restart keeps: ``put``/``get``/``pop``, ``remove_if``
    (compare-and-delete: let one's own claim go), ``hash_add``/``hash_set``/
    ``hash_all``/``hash_take``/``hash_remove`` (parts collected by several instances, taken
    by one), ``admit`` (at most N uses in a sliding window).
    """

    name: str
    intake: Submitter
    events: EventSink
    contacts: ContactLookup
    router: web.UrlDispatcher
    attachments: AttachmentStore
    clock: Clock
    settings: AdapterSettings
    """What the adapter may read of the configuration: data folder, public URL, body and
    attachment bounds, SLA; never a secret of the core or of another adapter."""
    leases: Leases
    state: SharedState
    supervisor: Supervisor = field(default_factory=Supervisor)
    """Runs the adapter's background loops (``spawn(f"{name}-poll", ...)``), restarted after
    an error and reported in ``/readyz``; the gateway's own one when run by ``Gateway``."""
    metrics: AdapterMetrics = field(default_factory=AdapterMetrics.detached)
    """Where the adapter reports sessions, links and send waits (series labelled with its
    name); on a registry of its own unless run by ``Gateway``."""


class Adapter(Protocol):
    """A running channel adapter instance."""

    name: str
    channel: str

    async def start(self) -> None:
        """Start listening; return once the listener accepts connections."""
        ...

    async def stop(self) -> None:
        """Stop accepting, drain in-flight work; safe to call twice or before start."""
        ...

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Deliver one reply to the citizen of ``contact``; raise ``SendError``."""
        ...


ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True, slots=True)
class ChannelType(Generic[ConfigT]):
    """A registered kind of adapter: ``type = "<name>"`` in an ``[adapters.X]`` table."""

    name: str
    channel: str
    config: type[ConfigT]
    factory: Callable[[AdapterContext, ConfigT], Adapter]
    example: Mapping[str, Any]
    """A minimal valid config table (without ``type``), used by docs and the contract tests."""
    send_rate: SendRate = SendRate()
    """The provider's documented send limits, the default of ``send_rate`` & co."""
    sender_contacts: int = 0
    """A floor for ``[limits] sender_contacts`` on this type's adapters (0: none): a medium
    where one citizen's ordinary use sends many contacts a minute (a chat)."""
    check: AdapterCheck | None = None
    """Rules the config's field types cannot express, run by the one validation
    (``parse_settings``) that ``serve`` and ``check-config`` share; a factory never refuses
    a config that passed it."""
    medium: Medium | None = None
    """The medium this type brings when ``channel`` names none of the registered ones: its
    deadlines, report rows and words (docs/adapters.md, "Declaring a medium")."""


ENTRY_POINT_GROUP = "gateway.channels"


@functools.cache
def load_channel_types() -> dict[str, ChannelType[Any]]:
    """Return every channel type: the built-in ones, then those from entry points (cached)."""
    from gateway.channels import BUILTIN

    types: dict[str, ChannelType[Any]] = {}
    for spec in BUILTIN:
        channel_type = _load_spec(spec)
        types[channel_type.name] = channel_type
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        channel_type = ep.load()
        if not isinstance(channel_type, ChannelType):
            raise TypeError(f"entry point {ep.name!r} is not a gateway.adapters.ChannelType")
        types.setdefault(channel_type.name, channel_type)
    return types


def _load_spec(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


@functools.cache
def load_media() -> Media:
    """Return the registered media: the built-in ones, then those the channel types declare
    (cached). A channel type whose ``channel`` no medium declares is refused."""
    from gateway.channels import BUILTIN_MEDIA

    types = load_channel_types()
    declared = [_load_spec(spec) for spec in BUILTIN_MEDIA]
    declared += [t.medium for t in types.values() if t.medium is not None]
    media = Media(declared)
    for channel_type in types.values():
        if channel_type.medium is not None and channel_type.medium.name != channel_type.channel:
            raise TypeError(
                f"channel type {channel_type.name!r}: channel {channel_type.channel!r} is not "
                f"the medium it declares ({channel_type.medium.name!r})"
            )
        if channel_type.channel not in media:
            raise TypeError(
                f"channel type {channel_type.name!r}: no medium {channel_type.channel!r} is "
                "registered (declare it as ChannelType.medium)"
            )
    return media
