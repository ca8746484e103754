"""The behavioural contract every HTTP webhook adapter keeps, as checks a test suite runs.

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
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.testing.poll import eventually
from gateway.testing.webhook import Request, send

if TYPE_CHECKING:
    from gateway.queueing.embedded import EmbeddedRedis
    from gateway.server.runtime import Gateway

StartGateway = Callable[..., Awaitable["Gateway"]]
"""``await start(adapters={...}, url=..., data_dir=..., redis={...})``: a started gateway,
stopped by the fixture at teardown."""


@dataclass(frozen=True, slots=True)
class ProviderAnswer:
    """What the local stand-in for the provider's send API answers to every request."""

    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"


@dataclass(frozen=True)
class WebhookKit:
    """How the kit reaches one HTTP webhook adapter.

    ``inbound(message_id, text)`` builds a valid, authenticated request for one new message
    (called again with the same arguments: the provider's redelivery of that message, which
    may carry a fresh nonce or timestamp as the provider's own retries do). ``bad`` are requests
    the adapter must refuse with a 4xx and store nothing (forged signature, malformed body...).
    ``secrets`` and ``phone`` must never reach a log. ``reply_config(provider_url)`` returns the
    config keys that point the adapter's sending at a local provider answering
    ``reply_answer``; ``None`` when the adapter sends no replies over HTTP.
    """

    type: str
    table: Mapping[str, Any]
    inbound: Callable[[str, str], Request]
    bad: Sequence[Request]
    secrets: Sequence[str]
    phone: str = ""
    retry_later: Collection[int] = (503,)
    reply_config: Callable[[str], Mapping[str, Any]] | None = None
    reply_answer: ProviderAnswer = field(default_factory=ProviderAnswer)
    name: str = "kit"

    def adapters(self, **extra: Any) -> dict[str, dict[str, Any]]:
        return {self.name: {"type": self.type, **self.table, **extra}}


def _ok(status: int) -> bool:
    return 200 <= status < 300


async def check_acknowledged_only_once_durable(
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """A 2xx means the contact is already in Redis when the answer arrives (no polling)."""
    gw = await start(adapters=kit.adapters())
    answer = await send(gw, kit.inbound("kit-durable-1", "路灯不亮"))
    assert _ok(answer.status), (answer.status, answer.body[:200])
    contacts = await gw.read_contacts()
    assert [c.adapter for c in contacts] == [kit.name], contacts
    assert contacts[0].received_at > 0


def _break_spool(data_dir: Path) -> None:
    """Make the local spool unusable (a file where its folder should be)."""
    spool = data_dir / "spool"
    if spool.exists():
        for child in sorted(spool.rglob("*"), reverse=True):
            child.unlink() if child.is_file() or child.is_symlink() else child.rmdir()
        spool.rmdir()
    spool.write_bytes(b"not a folder")


async def check_retry_later_when_nothing_stored(
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """Redis stopped and the spool unusable: the protocol's retry-later, nothing acknowledged."""
    gw = await start(adapters=kit.adapters(), url=own_redis.url,
                     redis={"write_timeout": "300ms"})
    own_redis.stop_sync()
    _break_spool(gw.settings.gateway.data_dir)
    answer = await send(gw, kit.inbound("kit-down-1", "水管爆了"))
    assert answer.status in kit.retry_later, (answer.status, answer.body[:200])


async def check_redelivery_deduplicated(
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """The provider sends the same message again (its ack was lost): one contact."""
    gw = await start(adapters=kit.adapters())
    for _ in range(3):
        answer = await send(gw, kit.inbound("kit-dup-1", "噪音扰民"))
        assert _ok(answer.status), (answer.status, answer.body[:200])
    assert len(await gw.read_contacts()) == 1


async def check_bad_input_refused(
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """Each bad request gets a 4xx and stores nothing; the listener still serves after."""
    assert kit.bad, "a kit lists at least one request to refuse"
    gw = await start(adapters=kit.adapters())
    for request in kit.bad:
        answer = await send(gw, request)
        assert 400 <= answer.status < 500, (request, answer.status, answer.body[:200])
    assert await gw.read_contacts() == []
    answer = await send(gw, kit.inbound("kit-after-bad", "还在吗"))
    assert _ok(answer.status), answer.status
    assert len(await gw.read_contacts()) == 1


@contextlib.contextmanager
def _captured_logs() -> Any:
    """Every record at DEBUG, as written (before the masking filter of ``gateway serve``: it
    redacts configured secrets as a backstop, and the check is that the adapter never needs it).
    """
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def check_no_secret_in_logs(
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """Start, good and bad requests, a refused send: no secret nor full number is logged (the
    records as the adapter wrote them, before any masking)."""
    with _captured_logs() as stream:
        async with _provider(ProviderAnswer(500, b"boom", "text/plain")) as url:
            extra = dict(kit.reply_config(url)) if kit.reply_config else {}
            gw = await start(adapters=kit.adapters(**extra))
            assert _ok((await send(gw, kit.inbound("kit-log-1", "你好"))).status)
            for request in kit.bad:
                await send(gw, request)
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
    start: StartGateway, kit: WebhookKit, own_redis: EmbeddedRedis
) -> None:
    """A reply sent through the adapter stamps ``responded`` on the contact."""
    assert kit.reply_config is not None, "this adapter sends no replies"
    async with _provider(kit.reply_answer) as url:
        gw = await start(adapters=kit.adapters(**kit.reply_config(url)))
        assert _ok((await send(gw, kit.inbound("kit-reply", "请回电"))).status)
        await _post_reply_and_wait(gw, "responded")


Check = Callable[[StartGateway, WebhookKit, "EmbeddedRedis"], Awaitable[None]]

ALL_CHECKS: dict[str, Check] = {
    "acknowledged_only_once_durable": check_acknowledged_only_once_durable,
    "retry_later_when_nothing_stored": check_retry_later_when_nothing_stored,
    "redelivery_deduplicated": check_redelivery_deduplicated,
    "bad_input_refused": check_bad_input_refused,
    "no_secret_in_logs": check_no_secret_in_logs,
    "replies_stamped": check_replies_stamped,
}
"""Every check by name; ``replies_stamped`` only applies when ``reply_config`` is set."""
