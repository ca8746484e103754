"""A medium the gateway does not know, brought by a distribution of its own: letters (来信),
scanned by a mail room that posts each one as JSON. The channel type declares the medium: its
name, its deadline (15 days to a first response) and its row's labels. ``tests/test_media.py``
puts this folder on ``sys.path``; the gateway finds it through the ``gateway.channels`` entry
point of ``gateway_letter-0.1.dist-info`` like any installed adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
from aiohttp import web

from gateway.adapters import (
    AdapterContext,
    ChannelType,
    DeadlineRule,
    IntakeUnavailable,
    InvalidContact,
    Medium,
    SendError,
    SendReceipt,
)
from gateway.records import Contact, Inbound, Reply, Sender, clean_text

LETTER = Medium(
    name="letter",
    deadlines=(
        DeadlineRule(
            "letter_response", "response", 15 * 86400, row="letter", label=("来信", "Letters")
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class LetterConfig:
    """``[adapters.NAME]`` with ``type = "letter"``."""

    path: str = "/letters"


class LetterAdapter:
    channel = "letter"

    def __init__(self, ctx: AdapterContext, config: LetterConfig) -> None:
        self.name = ctx.name
        self.ctx = ctx
        ctx.router.add_post(config.path, self.receive)

    async def start(self) -> None:
        """Routes are on the gateway's server: nothing to start."""

    async def stop(self) -> None:
        """Nothing of its own to stop."""

    async def receive(self, request: web.Request) -> web.Response:
        received_at = self.ctx.clock.now_us()
        try:
            data = orjson.loads(await request.read())
            inbound = Inbound(
                recipient=self.name,
                channel="letter",
                adapter=self.name,
                external_id=str(data["scan"]),
                sender=Sender(clean_text(str(data["from"]))),
                received_at=received_at,
                text=clean_text(str(data["text"])),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400, text="expected {scan, from, text}\n")
        try:
            receipt = await self.ctx.intake.submit(inbound)
        except IntakeUnavailable:
            return web.Response(status=503, headers={"Retry-After": "5"})
        except InvalidContact:
            return web.Response(status=400)
        return web.json_response({"id": receipt.contact_id})

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        raise SendError("letters are answered on paper", retryable=False)


CHANNEL = ChannelType(
    name="letter",
    channel="letter",
    config=LetterConfig,
    factory=LetterAdapter,
    example={},
    medium=LETTER,
)
