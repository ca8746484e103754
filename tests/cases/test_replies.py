"""Reply routing failure paths that need no channel: unknown contact, no adapter to send through."""

from __future__ import annotations

from gateway.queueing import post_reply
from gateway.records import Reply
from gateway.testing import eventually
from tests.queueing.test_intake import inbound


async def wait_for_event(gw, contact_id: str, type_: str):
    async def found():
        for event in await gw.read_events():
            if event.contact_id == contact_id and event.type == type_:
                return event
        return None

    return await eventually(found)


async def test_reply_to_unknown_contact_emits_failed_and_is_acked(start_gateway):
    gw = await start_gateway()
    await post_reply(gw.redis, Reply(contact_id="nope", text="hi", id="r1"), prefix=gw.keys.prefix)
    event = await wait_for_event(gw, "nope", "failed")
    assert event.detail == {"reason": "unknown contact", "reply_id": "r1"}
    async def settled():
        return not (await gw.redis.xpending(gw.keys.replies, "gateway-replies"))["pending"]

    await eventually(settled)
    assert (await gw.redis.xpending(gw.keys.replies, "gateway-replies"))["pending"] == 0


async def test_reply_to_an_api_contact_without_a_channel_fails_with_a_reason(start_gateway):
    gw = await start_gateway()
    receipt = await gw.intake.submit(inbound(adapter="api"))
    await post_reply(
        gw.redis, Reply(contact_id=receipt.contact_id, text="收到"), prefix=gw.keys.prefix
    )
    event = await wait_for_event(gw, receipt.contact_id, "failed")
    assert "no adapter" in event.detail["reason"]
    assert not [e for e in await gw.read_events() if e.type == "responded"]
