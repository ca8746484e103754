"""One bad contact fails alone: never an outage, never the others of its batch in the spool."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.adapters import IntakeUnavailable, InvalidContact
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.records import Inbound, Sender


def _nested(depth: int) -> dict[str, Any]:
    deep: dict[str, Any] = {}
    for _ in range(depth - 1):
        deep = {"x": deep}
    return deep


async def test_meta_nested_253_deep_is_answered_400_like_254(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    for depth in (252, 253, 254):
        async with aiohttp_client_session.post(
            url, json={"text": "deep", "meta": _nested(depth)}
        ) as resp:
            assert resp.status == 400, (depth, await resp.text())
            assert resp.content_type == "application/problem+json"
    assert gw.intake.redis_up
    assert await gw.read_contacts() == []


async def test_bad_contacts_in_a_busy_batch_spool_none_of_the_good_ones(
    start_gateway, aiohttp_client_session
):
    gw = await start_gateway()
    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"

    async def post(body: dict[str, Any]) -> tuple[int, Any]:
        async with aiohttp_client_session.post(url, json=body) as resp:
            return resp.status, await resp.json(content_type=None)

    good = [post({"text": f"good {i}", "external_id": f"g{i}"}) for i in range(400)]
    bad = [post({"text": "bad", "meta": _nested(253)}) for _ in range(20)]
    mixed = [x for pair in zip(good[:20], bad, strict=True) for x in pair] + good[20:]
    results = await asyncio.gather(*mixed)
    statuses = [r[1].get("status") for r in results if r[0] == 202]
    assert sum(1 for r in results if r[0] == 400) == 20
    assert statuses.count("enqueued") == 400 and "spooled" not in statuses
    assert gw.intake.redis_up and gw.spool.depth == 0
    assert len(await gw.read_contacts()) == 400


def _inbound(external_id: str, **kw: Any) -> Inbound:
    return Inbound(
        channel="sms",
        adapter="test",
        external_id=external_id,
        sender=kw.pop("sender", Sender("+8613800138000")),
        recipient="12345",
        received_at=SYSTEM_CLOCK.now_us(),
        text=kw.pop("text", "hello"),
        **kw,
    )


async def test_an_unencodable_key_or_text_is_invalid_alone(start_gateway):
    gw = await start_gateway()
    bad = [
        _inbound("lone-\udc80-surrogate"),
        _inbound("t", text="text \ud800"),
        _inbound("s", sender=Sender("+86138\udcff")),
        _inbound("m", meta={"x": _nested(253)}),
        _inbound("o", meta={"x": object()}),
    ]
    good = [_inbound(f"g{i}") for i in range(50)]
    results = await asyncio.gather(
        *(gw.intake.submit(i) for i in [*bad, *good]), return_exceptions=True
    )
    assert all(isinstance(r, InvalidContact) for r in results[: len(bad)]), results[: len(bad)]
    assert [r.status for r in results[len(bad):]] == ["enqueued"] * 50  # type: ignore[union-attr]
    assert gw.intake.redis_up and gw.spool.depth == 0


async def test_a_contact_redis_refuses_fails_alone_and_is_not_an_outage(start_gateway):
    gw = await start_gateway()
    # a key of the wrong type makes the intake script fail for exactly this contact
    await gw.queue.load_pseudonym_key()  # dedupe keys are named by the id's pseudonym
    await gw.redis.hset(gw.keys.dedupe("test", gw.queue.pseudonym("refused")), "not", "a string")
    results = await asyncio.gather(
        gw.intake.submit(_inbound("refused")),
        *(gw.intake.submit(_inbound(f"g{i}")) for i in range(20)),
        return_exceptions=True,
    )
    assert isinstance(results[0], IntakeUnavailable)
    assert [r.status for r in results[1:]] == ["enqueued"] * 20  # type: ignore[union-attr]
    assert gw.intake.redis_up and gw.spool.depth == 0
