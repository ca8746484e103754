"""Limits over real sockets: slow-loris heads and bodies closed, a connection cap per listener,
per-sender and per-adapter rate limits answered the protocol's "slow down" way."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.testing import eventually

FAST = {"header_timeout": "500ms", "body_timeout": "500ms"}


async def _closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes; the wait is bounded so a server that never closes fails
    the test instead of hanging it."""
    async with asyncio.timeout(20):
        return await reader.read()


async def test_a_request_head_that_trickles_in_is_closed(start_gateway: Any) -> None:
    gw = await start_gateway(limits=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(b"POST /v1/intake HTTP/1.1\r\nHost: x\r\n")
    for _ in range(3):  # a byte now and then: never idle, never a whole head
        await asyncio.sleep(0.3)
        writer.write(b"X")
    assert await _closed_by_server(reader) == b""
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed(start_gateway: Any) -> None:
    gw = await start_gateway(limits=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    assert await _closed_by_server(reader) == b""
    writer.close()


async def test_a_body_that_stops_arriving_is_closed(start_gateway: Any) -> None:
    gw = await start_gateway(limits=FAST)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(
        b"POST /v1/intake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"text\": "
    )
    assert await _closed_by_server(reader) == b""
    writer.close()
    assert await gw.read_contacts() == []


async def test_slow_but_steady_requests_still_pass(start_gateway: Any) -> None:
    gw = await start_gateway(limits={"header_timeout": "3s", "body_timeout": "3s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    body = b'{"text": "slow but fine"}'
    writer.write(
        b"POST /v1/intake HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    for i in range(0, len(body), 8):
        await asyncio.sleep(0.1)
        writer.write(body[i : i + 8])
    async with asyncio.timeout(20):
        status = await reader.readline()
    assert status.split()[1] == b"202"
    writer.close()


async def test_http_connection_cap(start_gateway: Any) -> None:
    gw = await start_gateway(limits={"max_connections": 3})
    held = [await asyncio.open_connection("127.0.0.1", gw.http_port) for _ in range(3)]
    await eventually(lambda: gw.http.connections.open == 3)  # the server has accepted them
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    answer = await _closed_by_server(reader)
    assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in answer
    writer.close()
    for _, w in held:
        w.close()
    # once they are gone, a new connection is served
    await eventually(lambda: gw.http.connections.open == 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await _closed_by_server(reader)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_per_sender_rate_limit_is_429_and_shared_by_the_fleet(
    start_gateway: Any, aiohttp_client_session: Any
) -> None:
    limits = {"sender_contacts": 3, "sender_window": "1h"}
    one = await start_gateway(limits=limits)
    two = await start_gateway(limits=limits)

    async def post(gw: Any, sender: str, external_id: str) -> Any:
        async with aiohttp_client_session.post(
            f"http://127.0.0.1:{gw.http_port}/v1/intake",
            json={"text": "x", "sender": sender, "external_id": external_id},
        ) as resp:
            return resp.status, resp.headers.get("Retry-After"), await resp.json()

    flood = "citizen@example.org"
    assert [(await post(one, flood, f"m{i}"))[0] for i in range(3)] == [202] * 3
    assert (await post(one, flood, "m0"))[2]["status"] == "duplicate"  # a retry is not "more"
    status, retry_after, body = await post(two, flood, "m3")  # another instance: same count
    assert status == 429 and int(retry_after) > 0
    assert body["status"] == 429
    assert (await post(two, "other@example.org", "o1"))[0] == 202
    assert len(await one.read_contacts()) == 4


async def test_per_adapter_rate_limit(start_gateway: Any, aiohttp_client_session: Any) -> None:
    gw = await start_gateway(limits={"adapter_contacts": 5, "adapter_window": "1h"})
    statuses = []
    for i in range(8):
        async with aiohttp_client_session.post(
            f"http://127.0.0.1:{gw.http_port}/v1/intake",
            json={"text": "x", "sender": f"s{i}@example.org"},
        ) as resp:
            statuses.append(resp.status)
    assert statuses == [202] * 5 + [429] * 3


async def test_fastagi_connection_cap(start_gateway: Any) -> None:
    from gateway.testing.webhook import eventually
    from tests.channels.voice.fakes import agi_fixture, fake_call

    gw = await start_gateway(
        adapters={"pbx": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                          "session_timeout": "60s", "agi_read_timeout": "60s"}},
        limits={"max_connections": 2},
    )
    server = gw.adapters["pbx"].server
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]

    async def both_held() -> bool:  # the server has taken both sessions (header not sent)
        return bool(server.connections.open == 2)

    await eventually(both_held)
    # over the cap: closed at once, before any command (Asterisk's AGI() then returns and the
    # dialplan's fail path queues the call), and no contact
    call = await fake_call(server.port, agi_fixture("sip_call.agi"))
    assert call.closed_by_server and call.commands == []
    assert server.connections.refused == 1
    for _, writer in held:
        writer.close()

    async def released() -> bool:
        return bool(server.connections.open == 0)

    await eventually(released)
    call = await fake_call(server.port, agi_fixture("sip_call.agi"))
    assert call.variables["GATEWAY_STATUS"] == "OK"
    assert len(await gw.read_contacts()) == 1


async def test_sender_limit_per_medium_shared_senders_and_per_adapter(
    start_gateway: Any, aiohttp_client_session: Any
) -> None:
    gw = await start_gateway(
        limits={"sender_contacts": 2, "sender_window": "1h",
                "sender_exempt": ["relay@example.org"]},
        adapters={"wb": {"type": "weibo", "app_secret": "s", "verify": False},
                  "wb1": {"type": "weibo", "app_secret": "s", "verify": False,
                          "path": "/chat/weibo-strict", "sender_contacts": 1}},
    )
    base = f"http://127.0.0.1:{gw.http_port}"

    async def intake(sender: str) -> int:
        async with aiohttp_client_session.post(
            f"{base}/v1/intake", json={"text": "x", "sender": sender}
        ) as resp:
            return int(resp.status)

    async def weibo(path: str, n: int, sender: str = "5001") -> int:
        body = {"type": "text", "sender_id": sender, "receiver_id": "2", "text": f"井盖{n}",
                "created_at": "Mon Nov 30 10:00:00 +0800 2026", "data": {}}
        async with aiohttp_client_session.post(
            f"{base}{path}?signature=x&timestamp=1&nonce={n}", json=body
        ) as resp:
            return int(resp.status)

    assert [await intake("citizen@example.org") for _ in range(3)] == [202, 202, 429]
    # a shared sender (an e-mail relay, a company's SMS gateway) is not limited per sender
    assert [await intake("relay@example.org") for _ in range(4)] == [202] * 4
    # a chat: one citizen's many short messages pass the chat floor (120 a minute)
    assert [await weibo("/chat/weibo/wb", n) for n in range(5)] == [200] * 5
    # an adapter's own sender_contacts
    assert await weibo("/chat/weibo-strict", 10, "5002") == 200
    assert await weibo("/chat/weibo-strict", 11, "5002") != 200
    texts = [c.text for c in await gw.read_contacts() if c.adapter == "wb1"]
    assert texts == ["井盖10"]


async def test_stop_closes_an_idle_keep_alive_connection_at_once(start_gateway: Any) -> None:
    """A client that keeps its connection open after a request (keep-alive, as aiohttp's
    and every provider's client pool does) does not hold the gateway's stop: the server
    closes the idle connection as it stops (the keep-alive timeout is 30 s: any wait for it
    would be the bounded read's 20 s failing this test)."""
    gw = await start_gateway(limits={"keepalive_timeout": "60s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await gw.stop()
    rest = await _closed_by_server(reader)
    assert b"HTTP/1.1" not in rest  # nothing more was answered: the connection just closed
    writer.close()


async def test_a_refused_contact_gives_back_its_dedupe_key_and_the_counts_it_took(
    start_gateway: Any, aiohttp_client_session: Any
) -> None:
    """``intake.lua`` claims the dedupe key and takes each counter first (``SET NX GET``,
    ``INCR``); a refusal by a later counter gives them back, so nothing is counted and the
    peer's retry of the same id is a new contact once the window allows it."""
    gw = await start_gateway(limits={"sender_contacts": 5, "sender_window": "1h",
                                     "adapter_contacts": 2, "adapter_window": "1h"})

    async def post(external_id: str) -> int:
        async with aiohttp_client_session.post(
            f"http://127.0.0.1:{gw.http_port}/v1/intake",
            json={"text": "x", "sender": "citizen@example.org", "external_id": external_id},
        ) as resp:
            return int(resp.status)

    assert [await post(f"m{i}") for i in range(4)] == [202, 202, 429, 429]
    names = [n async for n in gw.redis.scan_iter(match=gw.keys.tag + ":*", count=1000)]
    rates = {n: int(await gw.redis.get(n)) for n in names if b":rate:" in n}
    assert sorted(rates.values()) == [2, 2]  # the sender's counter: 2, not 4
    assert len([n for n in names if b":dedupe:" in n]) == 2  # m2, m3 claimed nothing
    for name in rates:
        await gw.redis.delete(name)  # the next window
    assert await post("m2") == 202  # not "duplicate" of a contact never written
    assert len(await gw.read_contacts()) == 3
