"""How the gateway's adapter kit reaches this adapter (``gateway.testing.WebhookKit``)."""

from __future__ import annotations

import orjson

from gateway.testing import Request, WebhookKit
from gateway_line.adapter import signature

SECRET = "kit-line-secret-6a1f"  # noqa: S105 (a test value)
TOKEN = "kit-line-token-2c7b"  # noqa: S105 (a test value)
USER = "U4af4980629a0b7c2f2e3d1c0b9a8f7e6"


def event_body(event_id: str, text: str) -> bytes:
    return orjson.dumps({
        "destination": "Ubot0000000000000000000000000000",
        "events": [{
            "type": "message", "mode": "active", "timestamp": 1795594480000,
            "webhookEventId": event_id, "deliveryContext": {"isRedelivery": False},
            "replyToken": "nHuyWiB7yP5Zw52FIkcQobQuGDXCTA",
            "source": {"type": "user", "userId": USER},
            "message": {"type": "text", "id": "m-" + event_id, "quoteToken": "q",
                        "text": text},
        }],
    })


def inbound(event_id: str, text: str) -> Request:
    body = event_body(event_id, text)
    return Request("/line/webhook", body, {"Content-Type": "application/json",
                                           "X-Line-Signature": signature(SECRET, body)})


KIT = WebhookKit(
    type="line",
    table={"channel_secret": SECRET, "channel_access_token": TOKEN},
    inbound=inbound,
    bad=[
        Request("/line/webhook", event_body("f", "x"),
                {"X-Line-Signature": signature("guess", event_body("f", "x"))}),
        Request("/line/webhook", event_body("n", "x")),
        Request("/line/webhook", b"{", {"X-Line-Signature": signature(SECRET, b"{")}),
        Request("/line/webhook", b'{"events": [{"type": "message", "message": {"type": "text"}}]}',
                {"X-Line-Signature": signature(
                    SECRET, b'{"events": [{"type": "message", "message": {"type": "text"}}]}')}),
    ],
    secrets=[SECRET, TOKEN],
    reply_config=lambda url: {"api_base_url": url},
)
