"""``POST /v1/intake``: the happy path, API keys, and bad input that writes nothing."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import orjson
import pytest

from tests.harness import read_answer, settings_for  # noqa: F401  (settings: documented)


async def post(session, gw, body: bytes, headers=None):
    async with session.post(
        f"http://127.0.0.1:{gw.http_port}/v1/intake", data=body, headers=headers or {}
    ) as resp:
        return resp.status, await resp.read()


async def test_accepts_a_contact_and_answers_202_with_id_and_deadline(
    start_gateway, aiohttp_client_session
):
    gw = await start_gateway()
    body = {
        "sender": {"address": "+8613800138000", "name": "李四"},
        "text": "噪音扰民",
        "external_id": "f1",
    }
    status, raw = await post(aiohttp_client_session, gw, orjson.dumps(body))
    assert status == 202
    answer = orjson.loads(raw)
    assert answer["status"] == "enqueued"
    assert answer["deadline"]["policy"] == "web_response"
    status, raw = await post(aiohttp_client_session, gw, orjson.dumps(body))
    assert status == 202 and orjson.loads(raw)["id"] == answer["id"]
    (contact,) = await gw.read_contacts()
    assert contact.id == answer["id"] and contact.text == "噪音扰民" and contact.adapter == "api"
    assert contact.language == "zh"  # a hint for every text contact, from its script


@pytest.mark.parametrize(
    ("label", "body", "status"),
    [
        ("malformed JSON", b'{"text": ', 400),
        ("not an object", b"[1, 2]", 400),
        ("invalid UTF-8", b'{"text": "\xff\xfe"}', 400),
        ("wrong type", b'{"text": 42}', 400),
        ("unknown channel", b'{"channel": "fax"}', 400),
        ("unknown field", b'{"txt": "typo"}', 400),
        ("confidential not bool", b'{"confidential": "yes"}', 400),
        ("meta not object", b'{"meta": []}', 400),
        ("bad origin time", b'{"origin_at": "yesterday"}', 400),
        ("huge body", b'{"text": "' + b"x" * (2 << 20) + b'"}', 413),
    ],
)
async def test_bad_input_gets_a_clear_4xx_and_writes_nothing(
    start_gateway, aiohttp_client_session, label, body, status
):
    gw = await start_gateway()
    got, raw = await post(aiohttp_client_session, gw, body, {"Content-Type": "application/json"})
    assert got == status, (label, raw)
    if got != 413:
        problem = orjson.loads(raw)
        assert problem["status"] == status and problem["detail"]
    assert await gw.redis.xlen(gw.keys.contacts) == 0


async def test_api_keys_are_required_when_configured(
    start_gateway, aiohttp_client_session, monkeypatch
):
    monkeypatch.setenv("TEST_APP_KEY", "s3cret-key-of-the-app")
    keys = [
        {"name": "app", "key_env": "TEST_APP_KEY"},
        {"name": "reader", "key": "reader-only-key", "scopes": ["read"]},
    ]
    gw = await start_gateway(api={"open_to_loopback": False, "keys": keys})
    body = orjson.dumps({"text": "hi"})
    assert (await post(aiohttp_client_session, gw, body))[0] == 401
    status, raw = await post(aiohttp_client_session, gw, body, {"Authorization": "Bearer wrong"})
    assert status == 401 and orjson.loads(raw)["detail"] == "unknown API key"
    status, raw = await post(aiohttp_client_session, gw, body, {"X-API-Key": "reader-only-key"})
    assert status == 403 and "intake" in orjson.loads(raw)["detail"]
    status, _raw = await post(
        aiohttp_client_session, gw, body, {"Authorization": "Bearer s3cret-key-of-the-app"}
    )
    assert status == 202
    status, _ = await post(aiohttp_client_session, gw, body, {"X-API-Key": "s3cret-key-of-the-app"})
    assert status == 202
    contacts = await gw.read_contacts()
    assert len(contacts) == 2 and {c.adapter for c in contacts} == {"api:app"}


async def test_health_ready_and_metrics(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    await post(aiohttp_client_session, gw, orjson.dumps({"channel": "sms", "text": "x"}))
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp_client_session.get(base + "/healthz") as resp:
        assert resp.status == 200
    async with aiohttp_client_session.get(base + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["redis"] is True
    async with aiohttp_client_session.get(base + "/metrics") as resp:
        text = await resp.text()
    assert 'gateway_contacts_enqueued_total{adapter="api",channel="sms"} 1.0' in text
    assert 'gateway_edge_to_enqueue_seconds_count{adapter="api",channel="sms"} 1.0' in text
    assert "gateway_stream_length 1.0" in text
    assert "gateway_spool_depth 0.0" in text


async def test_a_body_arriving_in_many_pieces_is_read_whole(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    body = orjson.dumps({"text": "长" * 10_000, "external_id": "chunked"})

    async def pieces():
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]
            await asyncio.sleep(0)

    url = f"http://127.0.0.1:{gw.http_port}/v1/intake"
    async with aiohttp_client_session.post(url, data=pieces()) as resp:
        assert resp.status == 202, await resp.text()
    (contact,) = await gw.read_contacts()
    assert contact.text == "长" * 10_000


async def test_phone_senders_of_sms_and_voice_become_e164(start_gateway, aiohttp_client_session):
    gw = await start_gateway()
    for channel, sender in (("sms", "138 0013 8000"), ("web", "138 0013 8000")):
        body = orjson.dumps({"channel": channel, "sender": sender, "text": "x"})
        assert (await post(aiohttp_client_session, gw, body))[0] == 202
    sms, web = await gw.read_contacts()
    assert sms.sender.address == "+8613800138000"
    assert web.sender.address == "138 0013 8000"  # a web sender is whatever the form said


async def _exchange(
    port: int, request: bytes, answers: int = 1, closing: bool = True
) -> tuple[list[bytes], bool]:
    """Send raw ``request`` bytes; read ``answers`` responses (head and body each), then
    (``closing``) whether the server closed the connection: a connection kept open is closed
    by the keep-alive clock (30 s), so a caller that does not ask gets False at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        out = []
        for _ in range(answers):
            out.append(await read_answer(reader))
        closed = closing and await reader.read(1) == b""
    finally:
        writer.close()
    return out, closed


def _post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def test_every_way_of_posting_a_contact_gets_its_whole_answer(start_gateway):
    """``/v1/intake`` is served straight from the connection (``add_direct``, a prebuilt
    answer) when nothing is unusual; the other spellings go through the router to the same
    handler. Each way: the same 202 and its headers, the connection kept or closed as the
    client asked, and every request counted under the route's pattern."""
    from tests.server.test_observability import sample

    gw = await start_gateway()
    port = gw.http_port
    body = orjson.dumps({"text": "路灯坏了", "sender": "+8613800138000"})
    # on one connection: direct, with a query (router), direct again, then one that closes
    answers, closed = await _exchange(port, b"".join([
        _post("/v1/intake", body), _post("/v1/intake?from=app", body), _post("/v1/intake", body),
        _post("/v1/intake", body, "Connection: close"),
    ]), 4)
    assert closed and b"Connection: close" in answers[3]
    assert all(b"Connection" not in answer for answer in answers[:3])  # HTTP/1.1: kept
    (answer,), closed = await _exchange(port, _post("/v1/intake", body, version="1.0"))
    assert closed and answer.startswith(b"HTTP/1.0 202 Accepted")
    answers.append(answer)
    (go_on, answer), closed = await _exchange(
        port, _post("/v1/intake", body, "Expect: 100-continue", "Connection: close"), 2
    )
    assert closed and go_on == b"HTTP/1.1 100 Continue\r\n\r\n"
    answers.append(answer)
    for answer in answers:
        head, _, payload = answer.rpartition(b"\r\n\r\n")
        assert b" 202 Accepted\r\n" in head, answer
        lines = {line.partition(b":")[0].lower() for line in head.split(b"\r\n")[1:]}
        assert {b"content-type", b"content-length", b"date", b"server"} <= lines, head
        assert b"application/json; charset=utf-8" in head
        assert orjson.loads(payload)["status"] == "enqueued"
    assert len(await gw.read_contacts()) == 6
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{port}/metrics"
    ) as resp:
        text = await resp.text()
    assert sample(text, "gateway_http_requests_total", route="/v1/intake", method="POST",
                  status="202") == 6


async def test_a_sender_over_its_rate_on_the_direct_route_is_a_counted_429(start_gateway):
    """The direct route has the middleware's guard: ``RateLimited`` from Intake is a 429
    problem with ``Retry-After``, counted, and the connection serves the next request."""
    from tests.server.test_observability import sample

    gw = await start_gateway(limits={"sender_contacts": 1, "sender_window": "60s"})
    one = orjson.dumps({"text": "x", "sender": "+8613800138000"})
    other = orjson.dumps({"text": "x", "sender": "+8613900139000"})
    (first, second, third), _ = await _exchange(
        gw.http_port,
        _post("/v1/intake", one) + _post("/v1/intake", one) + _post("/v1/intake", other), 3,
        closing=False,
    )
    assert first.startswith(b"HTTP/1.1 202") and third.startswith(b"HTTP/1.1 202")
    head, _, payload = second.rpartition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429") and b"application/problem+json" in head
    assert b"Retry-After: " in head and orjson.loads(payload)["status"] == 429
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/metrics"
    ) as resp:
        text = await resp.text()
    assert sample(text, "gateway_http_requests_total", route="/v1/intake", status="429") == 1
    assert sample(text, "gateway_http_requests_total", route="/v1/intake", status="202") == 2


async def test_a_raw_answer_waits_while_the_client_reads_no_answers():
    """``RawResponse`` (the direct route's 202) keeps aiohttp's back-pressure: a client that
    pipelines requests and reads no answers has its next request handled only once the
    answers before it have left the process (aiohttp's own answers drain in ``write_eof``;
    without it every request was handled and its answer buffered, without bound). The
    gateway's own server (connection guard, direct dispatch), answers of 16 MiB: far more
    than the sockets take."""
    from aiohttp import web

    from gateway.server.config import HostPort
    from gateway.server.fastpost import raw_answer
    from gateway.server.http import HttpServer, RawResponse, add_direct, build_app

    size = 16 * 1024 * 1024
    raw = raw_answer(b"HTTP/1.1 200 OK", b"application/octet-stream", b"x" * size)
    buffered: list[int] = []  # the process's unsent bytes when each request is handled

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        buffered.append(request.transport.get_write_buffer_size())
        return RawResponse(200, "OK", raw)

    app = build_app(1024)
    add_direct(app, "GET", "/big", handler)
    server = HttpServer(app, HostPort("127.0.0.1", 0))
    await server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # no autotuning
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
        for _ in range(2):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(size)
        writer.close()
    finally:
        await server.stop()
    # the second request came once the first answer had gone, but for the transport's
    # low-water mark (fails before: over 12 MiB of it still in the process)
    assert len(buffered) == 2 and buffered[1] < 1024 * 1024, buffered
