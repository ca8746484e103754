"""Overload: once a process holds ``[limits] in_flight`` contacts in flight, new ones are refused
at once, each protocol's retry-later way and before they are parsed; what was admitted is
written, and once the load falls contacts are taken again.

The contacts are held in flight by a real Valkey whose writes are paused (``CLIENT PAUSE
WRITE``), with a ``write_timeout`` long enough that nothing goes to the spool meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.adapters import IntakeUnavailable
from gateway.queueing.embedded import EmbeddedRedis
from gateway.records import Inbound, Sender
from gateway.server.problems import problem
from gateway.testing import eventually
from gateway.testing.agi import header_block
from gateway.testing.smtp import session

IN_FLIGHT = 3
MAILBOX = "12345@hotline.example.gov.cn"


async def _post(http: aiohttp.ClientSession, port: int, external_id: str) -> tuple[int, Any]:
    body = {"channel": "web", "external_id": external_id, "sender": {"address": "+8613800138000"},
            "text": "路灯坏了"}
    async with http.post(f"http://127.0.0.1:{port}/v1/intake", json=body) as r:
        return r.status, (r.headers, await r.read())


async def test_past_the_in_flight_bound_contacts_are_refused_then_taken_again(
    start_gateway: Any, own_redis: EmbeddedRedis
) -> None:
    gw = await start_gateway(
        url=own_redis.url,
        adapters={
            "pbx": {"type": "asterisk", "agi_listen": "127.0.0.1:0"},
            "mail": {"type": "smtp", "listen": "127.0.0.1:0", "mailboxes": [MAILBOX]},
        },
        limits={"in_flight": IN_FLIGHT, "sender_contacts": 0},
        redis={"write_timeout": "60s"},
    )
    admin = aioredis.from_url(own_redis.url)
    http = aiohttp.ClientSession()
    held: list[asyncio.Task[tuple[int, Any]]] = []
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        held = [asyncio.create_task(_post(http, gw.http_port, f"held-{i}"))
                for i in range(IN_FLIGHT)]
        await eventually(lambda: gw.admission.open == IN_FLIGHT)

        # HTTP: 503 + Retry-After before the request is parsed (problem+json on /v1/intake)
        status, (headers, body) = await _post(http, gw.http_port, "refused-web")
        assert status == 503
        assert headers["Retry-After"] == "5"
        assert headers["Content-Type"] == "application/problem+json"
        assert orjson.loads(body) == orjson.loads(problem(503, "overloaded").body)
        # a webhook path: the same refusal, plain
        async with http.post(f"http://127.0.0.1:{gw.http_port}/sms/x", data=b"x") as r:
            assert r.status == 503 and r.headers["Retry-After"] == "5"
        # probes are still answered
        async with http.get(f"http://127.0.0.1:{gw.http_port}/healthz") as r:
            assert r.status == 200

        # FastAGI: closed before the header block is read (no command, no variable): the
        # dialplan's fail path queues the call
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.adapters["pbx"].port)
        writer.write(header_block("refused.1", "+8613800138000", "12345"))
        async with asyncio.timeout(20):  # a liveness bound: a server that never closes fails
            try:
                assert await reader.read() == b""
            except ConnectionResetError:  # closed with the header block unread
                pass
        writer.close()

        # SMTP: RCPT answered 451 4.3.2, so the message is never sent
        replies = await session(gw.adapters["mail"].port, [
            b"EHLO mta.example.org", b"MAIL FROM:<c@example.org>", f"RCPT TO:<{MAILBOX}>".encode()
        ])
        assert replies[-1][0] == 451 and "4.3.2" in replies[-1][1]

        # and anything that reaches Intake all the same is refused there, before any work
        inbound = Inbound(channel="web", adapter="api", external_id="refused-direct",
                          sender=Sender(address="+8613800138000"), recipient="12345", text="x",
                          received_at=gw.clock.now_us())
        with pytest.raises(IntakeUnavailable):
            await gw.admission.submit(inbound)
        assert gw.admission.refused == 5
        async with http.get(f"http://127.0.0.1:{gw.http_port}/metrics") as r:
            metrics = await r.text()
        assert "gateway_overload_refused_total 5.0" in metrics
        assert f"gateway_contacts_in_flight {IN_FLIGHT}.0" in metrics
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        answers = await asyncio.gather(*held)
        await http.close()
        await admin.aclose()

    # what was admitted is written and acknowledged
    assert [status for status, _ in answers] == [202] * IN_FLIGHT
    # the load has fallen: contacts are taken again on every protocol
    http = aiohttp.ClientSession()
    try:
        status, _ = await _post(http, gw.http_port, "after")
    finally:
        await http.close()
    assert status == 202
    replies = await session(gw.adapters["mail"].port, [
        b"EHLO mta.example.org", b"MAIL FROM:<c@example.org>", f"RCPT TO:<{MAILBOX}>".encode()
    ], b"Subject: after\r\nMessage-ID: <after@example.org>\r\n\r\nhello\r\n")
    assert replies[-1][0] == 250
    external = sorted(c.external_id or "" for c in await gw.read_contacts())
    assert external == ["<after@example.org>", "after", "held-0", "held-1", "held-2"]


async def test_while_the_event_loop_runs_late_contacts_are_refused(start_gateway: Any) -> None:
    gw = await start_gateway(limits={"loop_lag": "100ms", "sender_contacts": 0})
    loop = asyncio.get_running_loop()
    hogging = True

    def hog() -> None:  # more work than the core can do: every turn of the loop is long
        if hogging:
            time.sleep(0.15)
            loop.call_soon(hog)

    async with aiohttp.ClientSession() as http:
        status, _ = await _post(http, gw.http_port, "before")
        assert status == 202
        loop.call_soon(hog)
        try:
            await eventually(lambda: gw.admission.busy)
            status, (headers, _) = await _post(http, gw.http_port, "late")
            assert status == 503 and headers["Retry-After"] == "5"
        finally:
            hogging = False
        await eventually(lambda: not gw.admission.busy)  # caught up: taken again
        status, _ = await _post(http, gw.http_port, "after")
        assert status == 202
    assert sorted(c.external_id or "" for c in await gw.read_contacts()) == ["after", "before"]


@pytest.mark.parametrize("first", [b"GET", b"GET ", b"GET /hea", b"GET /metr", b"POST /v1/in"])
def test_a_first_chunk_cut_before_its_path_decides_is_not_refused_unread(first: bytes) -> None:
    """The guard decides from a request's first chunk; one cut before its path says which (a
    probe's ``GET /hea``...) is left to the parser (a contact is still refused at submit), not
    answered the plain 503 a probe must never get."""
    from gateway.server.connguard import overload_answer

    assert overload_answer(first) is None
    assert overload_answer(b"GET /healthz HTTP/1.1\r\n") is None
    assert overload_answer(b"POST /sms/x HTTP/1.1\r\n") is not None
    assert b"problem+json" in (overload_answer(b"POST /v1/intake HTTP/1.1\r\n") or b"")
