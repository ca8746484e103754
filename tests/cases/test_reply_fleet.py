"""Replies in a fleet: two and three instances on one Redis with different adapter sets. Each reply
reaches an instance running the contact's adapter and is sent exactly once (counted at a local
fake SMS provider); a reply for an adapter no instance runs is held, reported, then sent."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from gateway.cases.replies import GROUP, reply_queues
from gateway.queueing import post_reply as put_reply
from gateway.records import Reply
from gateway.server.cli import _info
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.sms.fakes import Answer, FakeProvider, running
from tests.e2e.test_serve import start_serve, wait_healthy
from tests.harness import free_port, free_ports
from tests.queueing.test_intake import inbound


def sms(api: FakeProvider, name: str, timeout: str = "5s") -> dict[str, Any]:
    """A generic SMS webhook adapter whose replies go to the fake provider ``api``."""
    return {"type": "sms-webhook", "path": f"/sms/{name}", "secret": "s" * 16, "region": "CN",
            "recipient": "12345",
            "send": {"url": api.url + "/send", "authorization": "Bearer tok", "timeout": timeout}}


def ok() -> FakeProvider:
    return FakeProvider(Answer(200, b'{"ok":true}'))


async def contact_of(gw: Gateway, adapter: str, n: int) -> str:
    receipt = await gw.intake.submit(inbound(adapter=adapter, external_id=f"{adapter}-{n}",
                                             sender=f"+861380013{n:04d}"))
    return receipt.contact_id


async def post_reply(
    session: aiohttp.ClientSession, gw: Gateway, contact_id: str, text: str
) -> None:
    url = f"http://127.0.0.1:{gw.http_port}/v1/contacts/{contact_id}/replies"
    async with session.post(url, json={"text": text}) as resp:
        assert resp.status == 202, await resp.text()


async def called(api: FakeProvider, times: int) -> bool:
    return len(api.calls) >= times


def sent_texts(api: FakeProvider) -> Counter[str]:
    return Counter(orjson.loads(call.body)["text"] for call in api.calls)


async def all_sent(gw: Gateway) -> bool:
    """Nothing left to route or send, fleet-wide (every entry acknowledged)."""
    public = await gw.redis.xinfo_groups(gw.keys.replies)
    if any(g["pending"] or g["lag"] is None or g["lag"]
           for g in public if g["name"].decode() == GROUP):
        return False
    return all(q.waiting == 0 and q.pending == 0 for q in await reply_queues(gw.redis, gw.keys))


async def test_replies_posted_through_either_instance_are_sent_once_by_the_right_one(
    start_gateway, aiohttp_client_session
):
    """Issue 10, observed 3: with one shared group, the instance without the SMS adapter took
    replies and marked them failed (3 of 6 in the report)."""
    async with running(ok()) as api_a, running(ok()) as api_b:
        gw_a = await start_gateway(gateway={"instance": "a"}, adapters={"agg": sms(api_a, "agg")})
        gw_b = await start_gateway(gateway={"instance": "b"},
                                   adapters={"other": sms(api_b, "other")})
        expected: dict[str, Counter[str]] = {"agg": Counter(), "other": Counter()}
        for n in range(3):
            for adapter in ("agg", "other"):
                cid = await contact_of(gw_a if n % 2 else gw_b, adapter, n)
                for via in (gw_a, gw_b):
                    text = f"{adapter} {n} via {via.instance}"
                    await post_reply(aiohttp_client_session, via, cid, text)
                    expected[adapter][text] += 1
        await eventually(lambda: all_sent(gw_a))
        assert sent_texts(api_a) == expected["agg"]
        assert sent_texts(api_b) == expected["other"]
        events = await gw_a.read_events()
        assert [e for e in events if e.type == "failed"] == []
        assert len([e for e in events if e.type == "responded"]) == 6  # one per contact


async def test_a_reply_for_an_adapter_no_instance_runs_is_held_then_sent(
    start_gateway, aiohttp_client_session, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway.cases.replies")
    async with running(ok()) as api:
        gw_b = await start_gateway(gateway={"instance": "b"}, adapters={})
        cid = await contact_of(gw_b, "agg", 1)
        await post_reply(aiohttp_client_session, gw_b, cid, "已派单")

        async def held() -> bool:
            queues = {q.adapter: q for q in await gw_b.replies.report()}
            return "agg" in queues and queues["agg"].held == 1

        await eventually(held)
        assert any("held" in r.getMessage() and "'agg'" in r.getMessage() for r in caplog.records)
        metrics = (await gw_b._render_metrics()).decode()
        assert 'gateway_replies_held{adapter="agg"} 1.0' in metrics
        async with aiohttp_client_session.get(f"http://127.0.0.1:{gw_b.http_port}/readyz") as r:
            assert r.status == 200 and (await r.json())["replies_held"] == {"agg": 1}
        info = await _info(gw_b.settings)
        assert info["replies"]["agg"]["held"] == 1 and info["replies"]["agg"]["senders"] == []
        assert not [e for e in await gw_b.read_events() if e.type == "failed"]
        assert api.calls == []

        gw_a = await start_gateway(gateway={"instance": "a"}, adapters={"agg": sms(api, "agg")})
        await eventually(lambda: all_sent(gw_a))
        assert sent_texts(api) == Counter({"已派单": 1})
        assert [e.type for e in await gw_a.read_events() if e.contact_id == cid][-1] == "responded"
        queues = {q.adapter: q for q in await gw_b.replies.report()}
        assert queues["agg"].held == 0 and queues["agg"].senders == ("a",)
        assert 'gateway_replies_held{adapter="agg"} 0.0' in (await gw_b._render_metrics()).decode()


async def test_a_slow_send_is_not_taken_over_by_another_sender(start_gateway):
    """The sending instance keeps its entry from reclaim while the provider is slow."""
    provider = ok()
    provider.answers = [Answer(200, b'{"ok":true}', hang=True)]
    async with running(provider) as api:
        # the sender touches its entry every third of reclaim_after: with 300 ms a pause of
        # 0.2 s (this process runs both instances) could let the other reclaim it
        replies = {"reclaim_after": "2s"}
        agg = sms(api, "agg", timeout="30s")  # the send outlasts the hold below
        gw_a = await start_gateway(gateway={"instance": "a"}, replies=replies,
                                   adapters={"agg": agg})
        gw_b = await start_gateway(gateway={"instance": "b"}, replies=replies,
                                   adapters={"agg": agg})
        cid = await contact_of(gw_a, "agg", 1)
        await put_reply(gw_a.redis, Reply(cid, "慢"), prefix=gw_a.keys.prefix)
        await eventually(lambda: called(api, 1))
        await asyncio.sleep(5)  # reclaim periods go by while the provider holds the send
        api._release.set()
        await eventually(lambda: all_sent(gw_b))
        assert sent_texts(api) == Counter({"慢": 1})


def serve_config(tmp_path: Path, instance: str, redis_url: str, prefix: str, port: int,
                 api: FakeProvider | None, timeout: str = "5s") -> Path:
    """A `gateway serve` config on the test's Redis; with ``api``, the SMS adapter ``agg``."""
    config = tmp_path / f"{instance}.toml"
    adapter = "" if api is None else f"""
[adapters.agg]
type = "sms-webhook"
path = "/sms/agg"
secret = "{'s' * 16}"
region = "CN"
recipient = "12345"
send = {{ url = "{api.url}/send", authorization = "Bearer tok", timeout = "{timeout}" }}
"""
    config.write_text(f"""
[gateway]
data_dir = "{tmp_path / (instance + '-data')}"
instance = "{instance}"
[redis]
url = "{redis_url}"
prefix = "{prefix}"
[replies]
reclaim_after = "1s"
[http]
listen = "127.0.0.1:{port}"
[api]
open_to_loopback = true
{adapter}""")
    return config


async def test_replies_through_serve_processes_while_the_sender_is_killed_and_restarted(
    start_gateway, redis_url, prefix, tmp_path: Path
):
    """Two `gateway serve` processes: `front` without adapters takes the replies over HTTP,
    `sms` sends them. `sms` is killed -9 before a round of replies and started again after
    the round was posted: the round waits (held), then every reply goes out once."""
    async with running(ok()) as api:
        maker = await start_gateway(gateway={"instance": "maker"}, adapters={})
        contacts = [await contact_of(maker, "agg", n) for n in range(5)]
        front_port, sms_port = free_ports(2)
        front = start_serve(serve_config(tmp_path, "front", redis_url, prefix, front_port, None))
        sms_config = serve_config(tmp_path, "sms", redis_url, prefix, sms_port, api)
        sms = start_serve(sms_config)
        expected: Counter[str] = Counter()
        try:
            async with aiohttp.ClientSession() as session:
                await wait_healthy(session, front_port, front)
                await wait_healthy(session, sms_port, sms)
                for round_ in range(1):  # (each start of `gateway serve` costs seconds)
                    os.kill(sms.pid, signal.SIGKILL)
                    sms.wait()
                    for n, cid in enumerate(contacts):
                        text = f"round {round_} contact {n}"
                        url = f"http://127.0.0.1:{front_port}/v1/contacts/{cid}/replies"
                        async with session.post(url, json={"text": text}) as resp:
                            assert resp.status == 202
                        expected[text] += 1
                    sms = start_serve(sms_config)
                    await wait_healthy(session, sms_port, sms)
                    await eventually(lambda: all_sent(maker))
                    assert sent_texts(api) == expected
        finally:
            for proc in (front, sms):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert not [e for e in await maker.read_events() if e.type == "failed"]


async def test_a_sender_killed_mid_send_is_taken_over_by_another_instance(
    start_gateway, redis_url, prefix, tmp_path: Path
):
    """A `gateway serve` process holding a reply in the middle of its send is killed -9; an
    instance with the same adapter reclaims the reply and sends it, once."""
    provider = ok()
    provider.answers = [Answer(200, b'{"ok":true}', hang=True)]
    async with running(provider) as api:
        router = await start_gateway(gateway={"instance": "router"}, adapters={})
        cid = await contact_of(router, "agg", 1)
        port = free_port()
        config = serve_config(tmp_path, "proc", redis_url, prefix, port, api, timeout="60s")
        proc = start_serve(config)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_healthy(session, port, proc)
            await put_reply(router.redis, Reply(cid, "接管"), prefix=prefix)
            await eventually(lambda: called(api, 1))  # in the send
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        survivor = await start_gateway(gateway={"instance": "survivor"},
                                       replies={"reclaim_after": "1s"},
                                       adapters={"agg": sms(api, "agg")})
        await eventually(lambda: all_sent(survivor))
        assert len(api.calls) == 2  # the one cut off by the kill, then the survivor's
        responded = [e for e in await survivor.read_events() if e.type == "responded"]
        assert [(e.contact_id, e.source) for e in responded] == [(cid, "agg")]
