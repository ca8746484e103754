"""Streams are trimmed only below what every consumer group has read; a backlog past its bounds
shows in metrics, logs and /readyz, then new contacts are refused the protocol's retry-later way."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import time

import pytest

from gateway.adapters import IntakeUnavailable
from gateway.queueing import ContactConsumer
from gateway.testing import eventually
from tests.channels.email.conftest import MAILBOX
from tests.queueing.test_intake import inbound


async def _submit_many(gw, n: int, tag: str = "c") -> None:
    for start in range(0, n, 100):
        batch = range(start, min(n, start + 100))
        await asyncio.gather(*(gw.intake.submit(inbound(external_id=f"{tag}{i}")) for i in batch))


async def _drain(consumer: ContactConsumer) -> list[str]:
    seen: list[str] = []
    while batch := await consumer.read(count=500, block_ms=None):
        seen += [d.record.id for d in batch if d.record is not None]
        await consumer.ack(*(d.entry_id for d in batch))
    return seen


async def test_a_small_stream_cap_trims_nothing_a_consumer_group_has_not_read(start_gateway):
    """Issue 10, observed 6: with stream_maxlen 100 and a group behind, 1,000 contacts acknowledged
    used to leave 104 for the group (XADD MAXLEN ~ dropped the rest unread)."""
    gw = await start_gateway(redis={"stream_maxlen": 100})
    consumer = ContactConsumer(gw.redis, "cases", "w1", prefix=gw.keys.prefix)
    await consumer.ensure_group()
    await _submit_many(gw, 1000)
    await gw.keeper.check()  # the periodic trim runs now (it also runs on its own)
    assert len(set(await _drain(consumer))) == 1000
    await gw.keeper.check()  # read and acknowledged by every group: now the cap applies
    assert await gw.redis.xlen(gw.keys.contacts) == 100


async def _http(session, gw, method: str, path: str, **kw):
    async with session.request(method, f"http://127.0.0.1:{gw.http_port}{path}", **kw) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


def _smtp_data(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail("citizen@example.org")
        client.rcpt(MAILBOX)
        return client.data(b"Subject: bin\r\n\r\nThe bin was not emptied.\r\n")


async def test_a_backlog_is_reported_then_refused_the_retry_later_way_until_read(
    start_gateway, aiohttp_client_session, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway.queueing.backlog")
    gw = await start_gateway(
        redis={"backlog_warning": 20, "backlog_limit": 50, "trim_interval": "1h"},
        adapters={"mail": {"type": "smtp", "listen": "127.0.0.1:0", "mailboxes": [MAILBOX]}},
    )
    consumer = ContactConsumer(gw.redis, "cases", "w1", prefix=gw.keys.prefix)
    await consumer.ensure_group()
    await _submit_many(gw, 30)
    backlog = await gw.keeper.check()
    assert backlog.state == "warning" and backlog.slowest["contacts"] == "cases"
    assert any("backlog_warning" in r.getMessage() and "slowest group" in r.getMessage()
               for r in caplog.records)
    status, _, body = await _http(aiohttp_client_session, gw, "GET", "/readyz")
    # the events stream has the dashboard's group too: its backlog may be the larger one
    assert status == 200 and body["backlog"]["state"] == "warning"
    assert body["backlog"]["entries"] >= 30 and "backlog_warning" in body["backlog"]["reason"]
    metrics = (await gw._render_metrics()).decode()
    assert 'gateway_stream_backlog{stream="contacts"} 30.0' in metrics

    await _submit_many(gw, 30, tag="more")
    assert (await gw.keeper.check()).state == "refusing"
    assert "gateway_intake_refusing 1.0" in (await gw._render_metrics()).decode()
    status, _, body = await _http(aiohttp_client_session, gw, "GET", "/readyz")
    assert status == 503 and body["backlog"]["state"] == "refusing"
    assert body["backlog"]["slowest"]["contacts"] == "cases"
    with pytest.raises(IntakeUnavailable):
        await gw.intake.submit(inbound(external_id="refused"))
    status, headers, _ = await _http(aiohttp_client_session, gw, "POST", "/v1/intake",
                                     json={"channel": "web", "text": "x"})
    assert status == 503 and "Retry-After" in headers
    code, _ = await asyncio.to_thread(_smtp_data, gw.adapters["mail"].port)
    assert code == 451

    assert len(await _drain(consumer)) == 60  # the case system catches up

    async def within_bounds() -> bool:
        return (await gw.keeper.check()).state == "ok"

    await eventually(within_bounds)  # (once the dashboard's group has read the events too)
    status, _, body = await _http(aiohttp_client_session, gw, "GET", "/readyz")
    assert status == 200 and body["backlog"]["state"] == "ok"
    code, _ = await asyncio.to_thread(_smtp_data, gw.adapters["mail"].port)
    assert code == 250


async def test_redis_near_its_maxmemory_refuses_new_contacts(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"memory_limit": 0.5})
    await gw.intake.submit(inbound(external_id="before"))
    used = int((await gw.redis.info("memory"))["used_memory"])
    await gw.redis.config_set("maxmemory", used + used // 2)  # used is past half of it
    try:
        backlog = await gw.keeper.check()
        assert backlog.state == "refusing" and "maxmemory" in (backlog.reason or "")
        with pytest.raises(IntakeUnavailable):
            await gw.intake.submit(inbound(external_id="during"))
    finally:
        await gw.redis.config_set("maxmemory", 0)
    assert (await gw.keeper.check()).state == "ok"
    assert (await gw.intake.submit(inbound(external_id="after"))).status == "enqueued"


async def test_an_operator_retention_trims_unread_entries_older_than_it(start_gateway):
    gw = await start_gateway(redis={"stream_retention": "1h"})
    consumer = ContactConsumer(gw.redis, "cases", "w1", prefix=gw.keys.prefix)
    await consumer.ensure_group()
    hour_ago_ms = int(time.time() * 1000) - 3_700_000
    await gw.redis.xadd(gw.keys.contacts, {"id": "old"}, id=f"{hour_ago_ms}-0")
    await gw.intake.submit(inbound(external_id="new"))
    await gw.keeper.check()
    ids = [fields[b"id"] for _, fields in await gw.redis.xrange(gw.keys.contacts)]
    assert len(ids) == 1 and ids[0] != b"old"


async def test_a_stream_no_group_reads_is_capped(start_gateway):
    gw = await start_gateway(redis={"stream_maxlen": 100})
    await _submit_many(gw, 300)
    await gw.keeper.check()
    assert await gw.redis.xlen(gw.keys.contacts) == 100


async def test_idle_consumers_with_nothing_pending_leave_the_gateways_own_groups(start_gateway):
    """Consumer names carry the instance and its pid, so each restart of N workers added N
    consumers to every group of the gateway, for ever. The keeper forgets those idle past
    ``consumer_idle_s`` with nothing pending; one with an entry pending stays (another takes it
    over), and a case system's group is not touched."""
    gw = await start_gateway()
    redis, keys = gw.redis, gw.keys
    stream = keys.replies_to("nowhere")  # an adapter no instance runs: no live consumer
    await redis.sadd(keys.reply_adapters, "nowhere")
    for group in ("gateway-replies", "case-system"):
        await redis.xgroup_create(stream, group, id="0", mkstream=True)
        await redis.xgroup_createconsumer(stream, group, "host-101-w0")
    await redis.xadd(stream, {"x": "1"})
    await redis.xreadgroup("gateway-replies", "host-102-w1", {stream: ">"}, count=1)
    await asyncio.sleep(0.3)
    assert gw.keeper is not None
    gw.keeper.consumer_idle_s = 0.2
    gw.keeper.consumers_every_s = 0.0
    await gw.keeper.check()

    def names(group: str) -> list[str]:
        return sorted(c["name"].decode() for c in consumers[group])

    groups = ("gateway-replies", "case-system")
    consumers = {g: await redis.xinfo_consumers(stream, g) for g in groups}
    assert names("gateway-replies") == ["host-102-w1"]  # its entry is pending: kept
    assert names("case-system") == ["host-101-w0"]


async def test_the_keeper_says_how_late_the_wallboard_is(start_gateway):
    """``gateway_dashboard_behind_seconds``: the age of the oldest event the wallboard's reader
    has not read (its group's place). It grows while no instance reads (the reader stopped
    here, as one that keeps failing, or a lease between holders, would leave it) as while one
    cannot keep up, and is 0 once the reader has read everything."""
    gw = await start_gateway()
    aggregator = gw.cases.aggregator
    await aggregator.stop()
    await aggregator.catch_up()

    def behind() -> float:
        value = gw.metrics.registry.get_sample_value("gateway_dashboard_behind_seconds")
        assert value is not None
        return value

    await gw.keeper.check()
    assert behind() == 0
    started = time.time()
    await _submit_many(gw, 5)
    await asyncio.sleep(0.3)
    await gw.keeper.check()
    first = behind()
    assert 0.3 <= first <= time.time() - started + 0.01  # seconds, from the oldest unread
    await asyncio.sleep(0.3)
    await gw.keeper.check()
    assert behind() >= first + 0.3  # nobody reads: it grows
    assert await aggregator.catch_up() >= 5
    await gw.keeper.check()
    assert behind() == 0
