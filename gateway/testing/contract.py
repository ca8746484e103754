"""The behavioural contract every adapter keeps, as checks a test suite runs.

A check talks to the adapter through a kit (``AdapterKit``): ``deliver`` one new message as the
peer would (an HTTP webhook, an SMTP transaction, a FastAGI call, an SMPP deliver_sm...) and
say how the adapter answered it, in the protocol's own terms mapped to ``ok`` (acknowledged),
``retry`` (the protocol's retry-later) or ``refused`` (the protocol's error for bad input).
``WebhookKit`` (HTTP), ``SmtpKit`` (``gateway.testing.smtp``) and ``AgiKit``
(``gateway.testing.agi``) are ready-made kits; ``PeerKit`` takes any protocol as two callables.

Each check starts its own gateway through ``start`` (the fixture of ``gateway.testing.plugin``
or the project's own ``start_gateway``) on a real Redis; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from aiohttp import web

from gateway.testing.poll import eventually
from gateway.testing.webhook import Request, RequestSource, send, stored_as

if TYPE_CHECKING:
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.records import Contact
    from gateway.server.runtime import Gateway

StartGateway = Callable[..., Awaitable["Gateway"]]
"""``await start(adapters={...}, url=..., data_dir=..., redis={...})``: a started gateway,
stopped by the fixture at teardown."""

Outcome = Literal["ok", "retry", "refused", "other"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """How the adapter answered one delivery: ``outcome`` in the kit's terms, ``answer`` in the
    protocol's own (``HTTP 503``, ``SMTP 451 4.3.0 ...``, ``GATEWAY_STATUS=FAILED``) for the
    failure messages."""

    outcome: Outcome
    answer: str

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What the local stand-in for the provider's send API answers to every request."""

    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"


class AdapterKit(Protocol):
    """What the checks need of a kit (``WebhookKit``, ``SmtpKit``, ``AgiKit``, ``PeerKit``)."""

    @property
    def name(self) -> str: ...
    @property
    def secrets(self) -> Sequence[str]: ...
    @property
    def phone(self) -> str: ...
    @property
    def reply_config(self) -> Callable[[str], Mapping[str, Any]] | None: ...
    @property
    def reply_answer(self) -> ProviderAnswer: ...

    def adapters(self, **extra: Any) -> dict[str, dict[str, Any]]:
        """The ``[adapters]`` table of a gateway running the adapter as ``name``."""
        ...

    async def ready(self, gateway: Gateway) -> None:
        """Wait until the adapter takes deliveries (bound, webhook registered...)."""
        ...

    async def deliver(self, gateway: Gateway, message_id: str, text: str) -> Delivery:
        """Deliver one new message as the peer does (again with the same arguments: the
        peer's redelivery of that message, its acknowledgement having been lost)."""
        ...

    async def refusals(self, gateway: Gateway) -> list[Delivery]:
        """Deliver each bad input the adapter must refuse; how each was answered."""
        ...


def _ok(status: int) -> bool:
    return 200 <= status < 300


class KitAdapter:
    """What every kit does alike: the adapter table that starts its adapter under ``name``,
    and the wait until that adapter takes input (``until_ready``, if the kit has one)."""

    type: str
    table: Mapping[str, Any]
    name: str
    until_ready: Callable[[Gateway], Awaitable[None]] | None

    def adapters(self, **extra: Any) -> dict[str, dict[str, Any]]:
        return {self.name: {"type": self.type, **self.table, **extra}}

    async def ready(self, gateway: Gateway) -> None:
        if self.until_ready is not None:
            await self.until_ready(gateway)


@dataclass(frozen=True)
class WebhookKit(KitAdapter):
    """How the kit reaches one HTTP webhook adapter.

    ``inbound(message_id, text)`` builds a valid, authenticated request for one new message
    (called again with the same arguments: the provider's redelivery of that message, which
    may carry a fresh nonce or timestamp as the provider's own retries do). ``bad`` are requests
    the adapter must refuse with a 4xx and store nothing (forged signature, malformed body...);
    one signed over a timestamp is given as a function that builds it, so it is fresh when sent.
    ``secrets`` and ``phone`` must never reach a log. ``reply_config(provider_url)`` returns the
    config keys that point the adapter's sending at a local provider answering
    ``reply_answer``; ``None`` when the adapter sends no replies over HTTP. ``until_ready``
    waits until a started adapter takes webhooks (e.g. once it registered with the provider).
    """

    type: str
    table: Mapping[str, Any]
    inbound: Callable[[str, str], Request]
    bad: Sequence[RequestSource]
    secrets: Sequence[str]
    phone: str = ""
    retry_later: Collection[int] = (503,)
    reply_config: Callable[[str], Mapping[str, Any]] | None = None
    reply_answer: ProviderAnswer = field(default_factory=ProviderAnswer)
    name: str = "kit"
    until_ready: Callable[[Gateway], Awaitable[None]] | None = None

    def _delivery(self, status: int, body: bytes) -> Delivery:
        outcome: Outcome = ("ok" if _ok(status) else "retry" if status in self.retry_later
                            else "refused" if 400 <= status < 500 else "other")
        return Delivery(outcome, f"HTTP {status} {body[:200]!r}")

    async def deliver(self, gateway: Gateway, message_id: str, text: str) -> Delivery:
        return await self.deliver_request(gateway, self.inbound(message_id, text))

    async def deliver_request(self, gateway: Gateway, request: RequestSource) -> Delivery:
        """Send any request; its status in the kit's terms."""
        answer = await send(gateway, request)
        return self._delivery(answer.status, answer.body)

    async def refusals(self, gateway: Gateway) -> list[Delivery]:
        return [await self.deliver_request(gateway, request) for request in self.bad]


@dataclass(frozen=True)
class PeerKit(KitAdapter):
    """A kit for any protocol, as callables: ``send(gateway, message_id, text)`` delivers one
    message as the peer does; ``bad`` are callables that each deliver one input the adapter
    must refuse. Both answer a ``Delivery``. ``until_ready`` waits until a started adapter
    takes deliveries (bound to its SMSC...)."""

    type: str
    table: Mapping[str, Any]
    send: Callable[[Gateway, str, str], Awaitable[Delivery]]
    bad: Sequence[Callable[[Gateway], Awaitable[Delivery]]]
    secrets: Sequence[str]
    phone: str = ""
    reply_config: Callable[[str], Mapping[str, Any]] | None = None
    reply_answer: ProviderAnswer = field(default_factory=ProviderAnswer)
    name: str = "kit"
    until_ready: Callable[[Gateway], Awaitable[None]] | None = None

    async def deliver(self, gateway: Gateway, message_id: str, text: str) -> Delivery:
        return await self.send(gateway, message_id, text)

    async def refusals(self, gateway: Gateway) -> list[Delivery]:
        return [await bad(gateway) for bad in self.bad]


@dataclass(frozen=True)
class KitCase:
    """One row of a handler table for any kit: ``deliver(gateway)`` delivers one input (e.g.
    ``lambda gw: SMTP.deliver(gw, "m1", "路灯坏了")`` or a raw message, header block, PDU),
    ``outcome`` is how it must be answered, ``contact`` the expected fields of the one contact
    stored (dotted paths; ``None``: nothing stored), ``events`` the event types stamped."""

    label: str
    deliver: Callable[[Gateway], Awaitable[Delivery]]
    outcome: Outcome
    contact: Mapping[str, Any] | None = None
    events: Sequence[str] = ()


async def run_kit_case(gateway: Gateway, case: KitCase) -> Contact | None:
    """Deliver the case's input to a fresh gateway and check the answer, contact and events."""
    answer = await case.deliver(gateway)
    assert answer.outcome == case.outcome, (case.label, answer)
    return await stored_as(gateway, case.label, case.contact, case.events)


async def _started(start: StartGateway, kit: AdapterKit, **options: Any) -> Gateway:
    extra = options.pop("extra", {})
    gw = await start(adapters=kit.adapters(**extra), **options)
    await kit.ready(gw)
    return gw


async def check_acknowledged_only_once_durable(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """An acknowledgement means the contact is already in Redis when it arrives (no polling)."""
    gw = await _started(start, kit)
    answer = await kit.deliver(gw, "kit-durable-1", "路灯不亮")
    contacts = await gw.read_contacts()
    assert answer.ok, answer
    assert [c.adapter for c in contacts] == [kit.name], ("acknowledged before stored", answer)
    assert contacts[0].received_at > 0


def break_spool(data_dir: Path) -> None:
    """Make the local spool of the gateway with this data folder unusable (a file where its
    folder should be): with Redis stopped too, nothing can be stored."""
    spool = data_dir / "spool"
    if spool.exists():
        for child in sorted(spool.rglob("*"), reverse=True):
            child.unlink() if child.is_file() or child.is_symlink() else child.rmdir()
        spool.rmdir()
    spool.write_bytes(b"not a folder")


async def check_retry_later_when_nothing_stored(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """Redis stopped and the spool unusable: the protocol's retry-later, nothing acknowledged."""
    gw = await _started(start, kit, url=own_redis.url, redis={"write_timeout": "300ms"})
    own_redis.stop_sync()
    break_spool(gw.settings.gateway.data_dir)
    with contextlib.suppress(Exception):
        await gw.spool.rotate()  # a segment open before: closed, the next one fails to open
    answer = await kit.deliver(gw, "kit-down-1", "水管爆了")
    assert answer.outcome == "retry", answer


async def check_redelivery_deduplicated(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """The peer delivers the same message again (its acknowledgement was lost): one contact."""
    gw = await _started(start, kit)
    for _ in range(3):
        answer = await kit.deliver(gw, "kit-dup-1", "噪音扰民")
        assert answer.ok, answer
    assert len(await gw.read_contacts()) == 1


async def check_bad_input_refused(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """Each bad input gets the protocol's error and stores nothing; the listener still serves
    after."""
    gw = await _started(start, kit)
    answers = await kit.refusals(gw)
    assert answers, "a kit lists at least one input to refuse"
    for n, answer in enumerate(answers):
        assert answer.outcome == "refused", (n, answer)
    assert await gw.read_contacts() == []
    answer = await kit.deliver(gw, "kit-after-bad", "还在吗")
    assert answer.ok, answer
    assert len(await gw.read_contacts()) == 1


@contextlib.contextmanager
def _captured_logs() -> Any:
    """Every record at DEBUG, as written (before the masking filter of ``gateway serve``: it
    redacts configured secrets as a backstop, and the check is that the adapter never needs it),
    with the libraries' loggers at the levels ``gateway serve`` gives them.
    """
    from gateway.server.logs import library_levels

    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    level = root.level
    libraries = {name: logging.getLogger(name).level for name in library_levels(logging.DEBUG)}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name, library_level in library_levels(logging.DEBUG).items():
        logging.getLogger(name).setLevel(library_level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, old in libraries.items():
            logging.getLogger(name).setLevel(old)


async def check_no_secret_in_logs(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """Start, good and bad input, a refused send: no secret nor full number is logged (the
    records as the adapter wrote them, before any masking)."""
    with _captured_logs() as stream:
        async with _provider(ProviderAnswer(500, b"boom", "text/plain")) as url:
            extra = dict(kit.reply_config(url)) if kit.reply_config else {}
            gw = await _started(start, kit, extra=extra)
            assert (await kit.deliver(gw, "kit-log-1", "你好")).ok
            await kit.refusals(gw)
            if kit.reply_config:  # the adapter's send, straight: the provider refuses it
                from gateway.records import Reply

                (contact,) = await gw.read_contacts()
                with contextlib.suppress(Exception):
                    await gw.adapters[kit.name].send(contact, Reply(contact.id, "收到", id="r"))
            await gw.adapters[kit.name].stop()
    text = stream.getvalue()
    assert text, "the adapter logged nothing at DEBUG (is the logger wired?)"
    for secret in kit.secrets:
        assert secret not in text, "a secret reached the log"
    if kit.phone:
        assert kit.phone not in text, "a full phone number reached the log"


@contextlib.asynccontextmanager
async def _provider(answer: ProviderAnswer) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=answer.status, body=answer.body,
                            content_type=answer.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)  # its log would show what we send
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _post_reply_and_wait(gw: Gateway, outcome: str) -> None:
    from gateway.queueing import post_reply
    from gateway.records import Reply

    (contact,) = await gw.read_contacts()
    await post_reply(gw.redis, Reply(contact.id, "已收到，正在处理", id="kit-reply-1"),
                     prefix=gw.keys.prefix)

    async def stamped() -> bool:
        return any(e.contact_id == contact.id and e.type == outcome
                   for e in await gw.read_events())

    await eventually(stamped)


async def check_replies_stamped(
    start: StartGateway, kit: AdapterKit, own_redis: EmbeddedRedis
) -> None:
    """A reply sent through the adapter stamps ``responded`` on the contact."""
    assert kit.reply_config is not None, "this adapter sends no replies"
    async with _provider(kit.reply_answer) as url:
        gw = await _started(start, kit, extra=dict(kit.reply_config(url)))
        assert (await kit.deliver(gw, "kit-reply", "请回电")).ok
        await _post_reply_and_wait(gw, "responded")


Check = Callable[[StartGateway, Any, "EmbeddedRedis"], Awaitable[None]]

ALL_CHECKS: dict[str, Check] = {
    "acknowledged_only_once_durable": check_acknowledged_only_once_durable,
    "retry_later_when_nothing_stored": check_retry_later_when_nothing_stored,
    "redelivery_deduplicated": check_redelivery_deduplicated,
    "bad_input_refused": check_bad_input_refused,
    "no_secret_in_logs": check_no_secret_in_logs,
    "replies_stamped": check_replies_stamped,
}
"""Every check by name; ``replies_stamped`` only applies when ``reply_config`` is set."""
