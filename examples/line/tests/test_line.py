"""The LINE adapter's own tests, as a distribution outside the gateway writes them: the kit's
contract checks and a table of webhook cases (run with ``pytest examples/line``)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from gateway_line.adapter import signature
from gateway_line.kit import KIT, SECRET, USER, event_body, inbound

from gateway.testing import ALL_CHECKS, Request, WebhookCase, run_case


@pytest.mark.parametrize("check", sorted(ALL_CHECKS))
async def test_kit(check: str, start_gateway: Any, own_redis: Any) -> None:
    await ALL_CHECKS[check](start_gateway, KIT, own_redis)


def signed(body: bytes) -> Request:
    return Request("/line/webhook", body, {"Content-Type": "application/json",
                                           "X-Line-Signature": signature(SECRET, body)})


FOLLOW = orjson.dumps({"destination": "Ubot", "events": [
    {"type": "follow", "timestamp": 1795594480000, "webhookEventId": "f1",
     "source": {"type": "user", "userId": USER}, "replyToken": "r"}]})
STICKER = orjson.dumps({"destination": "Ubot", "events": [
    {"type": "message", "timestamp": 1795594480000, "webhookEventId": "s1",
     "source": {"type": "user", "userId": USER},
     "message": {"type": "sticker", "id": "1", "packageId": "1", "stickerId": "1"}}]})
VERIFY = orjson.dumps({"destination": "Ubot", "events": []})  # the console's "Verify" button

CASES = [
    WebhookCase("text message", inbound("e1", "路灯坏了"), 200,
                contact={"text": "路灯坏了", "channel": "chat", "sender.address": "line:" + USER,
                         "external_id": "e1", "meta.provider": "line",
                         "origin_at": 1795594480000000},
                events=["enqueued"]),
    WebhookCase("follow event: acknowledged, nothing stored", signed(FOLLOW), 200),
    WebhookCase("sticker: acknowledged, nothing stored", signed(STICKER), 200),
    WebhookCase("webhook verification (no events)", signed(VERIFY), 200),
    WebhookCase("forged signature", KIT.bad[0], 403),
    WebhookCase("no signature", KIT.bad[1], 401),
    WebhookCase("malformed JSON", KIT.bad[2], 400),
    WebhookCase("signature over another body",
                Request("/line/webhook", event_body("o", "x"),
                        {"X-Line-Signature": signature(SECRET, event_body("o", "y"))}), 403),
]


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
async def test_webhook(case: WebhookCase, start_gateway: Any) -> None:
    await run_case(await start_gateway(adapters=KIT.adapters()), case)
