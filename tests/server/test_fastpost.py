"""``POST /v1/intake`` answered from the connection (``gateway/server/fastpost.py``): taken
only in the plain case and only where aiohttp is between requests, answered as aiohttp answers
it, in order with the connection's other requests, within aiohttp's keep-alive clock, drained
within the stop's bound, held back while the client reads no answers; and a differential of
its head parser against aiohttp's. Every exchange is raw HTTP/1.1 over a real socket to a
real gateway (or the gateway's HTTP server with a route of the test's) and a real Valkey.
Several tests come from two independent reviews of the path; each failed on the code it
found wanting."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.fastpost import frame, one_request, split_post
from tests.harness import read_answer

LINE = b"POST /v1/intake HTTP/1.1\r\n"


def whole(body: bytes, *extra: str) -> bytes:
    """A request the connection may take: head and body in one write."""
    head = ["Host: x", f"Content-Length: {len(body)}", *extra]
    return LINE + ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(body: bytes, *extra: str) -> bytes:
    """The same request with a chunked body: always aiohttp's to answer."""
    head = ["Host: x", "Transfer-Encoding: chunked", *extra]
    return (
        LINE + ("\r\n".join(head) + "\r\n\r\n").encode()
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )


async def exchange(port: int, *writes: bytes, answers: int = 1) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in writes:
            writer.write(data)
            await writer.drain()
        return [await read_answer(reader) for _ in range(answers)]
    finally:
        writer.close()


def parts(answer: bytes) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Status line, headers but ``Date`` (lower-case names), body."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        if name.lower() != b"date":
            headers[name.lower()] = value.strip()
    return status, headers, body


def taken(gw: Any) -> int:
    return int(gw.http.fast.taken)


async def test_the_plain_case_is_taken_from_the_connection_and_answered_as_aiohttp_does(
    start_gateway,
):
    gw = await start_gateway()
    body = orjson.dumps({"text": "路灯坏了", "sender": "+8613800138000", "external_id": "a"})
    (fast,) = await exchange(gw.http_port, whole(body))
    assert taken(gw) == 1
    other = orjson.dumps({"text": "路灯坏了", "sender": "+8613800138000", "external_id": "b"})
    (slow,) = await exchange(gw.http_port, chunked(other))
    assert taken(gw) == 1  # aiohttp's
    (fast_status, fast_headers, fast_body), (status, headers, body_) = parts(fast), parts(slow)
    assert fast_status == status == b"HTTP/1.1 202 Accepted"
    assert fast_headers.keys() == headers.keys()
    assert {k: v for k, v in fast_headers.items() if k != b"content-length"} == {
        k: v for k, v in headers.items() if k != b"content-length"
    }
    one, two = orjson.loads(fast_body), orjson.loads(body_)
    assert one.keys() == two.keys() and one["status"] == "enqueued"
    assert one["deadline"]["policy"] == two["deadline"]["policy"] == "web_response"
    contacts = {c.external_id: c for c in await gw.read_contacts()}
    assert contacts["a"].id == one["id"] and contacts["b"].id == two["id"]
    assert contacts["a"].text == "路灯坏了" and contacts["a"].adapter == "api"
    assert contacts["a"].sender.address == "+8613800138000"
    # the same contact again: its repeat, answered with the first's id
    (again,) = await exchange(gw.http_port, whole(body))
    assert orjson.loads(parts(again)[2])["id"] == one["id"] and taken(gw) == 2


async def test_the_path_is_counted_and_can_be_turned_off(start_gateway):
    """``gateway_http_fast_requests_total`` counts what the path takes; with
    ``[http] fast_intake = false`` aiohttp answers every request, the same 202."""
    from tests.server.test_observability import sample

    gw = await start_gateway()
    body = orjson.dumps({"text": "x", "external_id": "on"})
    (on,) = await exchange(gw.http_port, whole(body))
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/metrics"
    ) as resp:
        text = await resp.text()
    assert sample(text, "gateway_http_fast_requests_total", route="/v1/intake",
                  outcome="taken") == 1
    off = await start_gateway(http={"fast_intake": False})
    assert off.http.fast is None
    (answer,) = await exchange(off.http_port, whole(orjson.dumps({"text": "x"})))
    assert parts(answer)[0] == parts(on)[0] == b"HTTP/1.1 202 Accepted"
    assert parts(answer)[1].keys() == parts(on)[1].keys()


@pytest.mark.parametrize(
    "extra",
    [
        ("Connection: close",),
        ("Expect: 100-continue",),
        ("Content-Encoding: identity",),
        ("Upgrade: h2c", "Connection: Upgrade"),
        ("X-Folded: a", " b"),  # obs-fold
        ("Bad Name: x",),
        ("Content-Length: 2",),  # said twice
    ],
)
async def test_anything_unusual_is_left_to_aiohttp(start_gateway, extra):
    gw = await start_gateway()
    body = orjson.dumps({"text": "x"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    writer.write(whole(body, *extra))
    answer = await reader.read(4096)  # whatever aiohttp answers: a 202, a 100, a 400
    writer.close()
    assert answer.startswith(b"HTTP/1."), answer
    assert taken(gw) == 0


API_KEYS = [
    {"name": "app", "key": "app-key-0123456789"},
    {"name": "reader", "key": "reader-key-0123456789", "scopes": ["read"]},
]


@pytest.mark.parametrize(
    ("label", "body", "extra", "status"),
    [
        ("malformed JSON", b'{"text": ', (), 400),
        ("not an object", b"[1, 2]", (), 400),
        ("invalid UTF-8", b'{"text": "\xff\xfe"}', (), 400),
        ("wrong type", b'{"text": 42}', (), 400),
        ("unknown field", b'{"txt": "typo"}', (), 400),
        ("unknown channel", b'{"channel": "fax"}', (), 400),
        ("over the bound", b'{"text": "' + b"x" * (2 << 20) + b'"}', (), 413),
        ("no key", b'{"text": "x"}', None, 401),
        ("unknown key", b'{"text": "x"}', ("Authorization: Bearer nope",), 401),
        ("read-only key", b'{"text": "x"}', ("X-API-Key: reader-key-0123456789",), 403),
    ],
)
async def test_a_refusal_before_the_write_is_aiohttps_own_answer(
    start_gateway, label, body, extra, status
):
    """Declined by the connection, the request is aiohttp's: the same bytes as the same
    request in chunks (only ``Date`` differs), nothing written."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    key = ("X-API-Key: app-key-0123456789",) if extra == () else (extra or ())
    (fast,) = await exchange(gw.http_port, whole(body, *key))
    (slow,) = await exchange(gw.http_port, chunked(body, *key))
    assert parts(fast)[0].startswith(b"HTTP/1.1 %d " % status), (label, fast)
    if status != 413:  # chunked: aiohttp's stream refuses it as it reads, its own way
        assert parts(fast) == parts(slow), label
    assert taken(gw) == 0
    assert await gw.redis.xlen(gw.keys.contacts) == 0


async def test_the_rest_of_a_body_aiohttp_is_reading_is_no_request(start_gateway):
    """A request refused before its body is read (a bad key), whose body's rest, arriving
    after the answer, looks like a whole request with a good key: aiohttp reads it as the
    body it is (no contact), not the connection as a request of its own (request
    smuggling through a proxy that shares one upstream connection among clients)."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    inner = whole(orjson.dumps({"text": "smuggled"}), "X-API-Key: app-key-0123456789")
    outer = LINE + b"Host: x\r\nX-API-Key: wrong\r\nContent-Length: %d\r\n\r\n" % (
        len(inner) + 2
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    try:
        writer.write(outer + b"{ ")
        answer = await read_answer(reader)  # 401 before the body is read
        assert answer.startswith(b"HTTP/1.1 401"), answer
        writer.write(inner)
        await writer.drain()
        writer.write(whole(orjson.dumps({"text": "next"}), "X-API-Key: app-key-0123456789"))
        after = await read_answer(reader)
    finally:
        writer.close()
    # the next request is answered; the body's rest was no request
    assert after.startswith(b"HTTP/1.1 202"), after
    assert [c.text for c in await gw.read_contacts()] == ["next"]


async def test_a_key_is_checked_as_aiohttp_checks_it(start_gateway):
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    body = orjson.dumps({"text": "x", "external_id": "k1"})
    (one,) = await exchange(gw.http_port, whole(body, "authorization: bearer  app-key-0123456789 "))
    body = orjson.dumps({"text": "x", "external_id": "k2"})
    (two,) = await exchange(gw.http_port, whole(body, "x-api-key: app-key-0123456789"))
    assert one.startswith(b"HTTP/1.1 202") and two.startswith(b"HTTP/1.1 202")
    assert taken(gw) == 2
    assert {c.adapter for c in await gw.read_contacts()} == {"api:app"}


async def test_a_key_that_is_not_utf8_is_a_401_not_a_bug(start_gateway, caplog):
    """aiohttp decodes header values with surrogates for bytes that are not UTF-8; the key's
    compare encoded them strictly and raised: a 500 logged as a bug, for anyone to fill the
    error log with. Both ways now: the key is unknown, 401."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    body = orjson.dumps({"text": "x"})
    request = LINE + b"Host: x\r\nX-API-Key: \xff\xfe\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body
    )
    with caplog.at_level(logging.ERROR):
        (fast,) = await exchange(gw.http_port, request)
        (slow,) = await exchange(gw.http_port, LINE + (
            b"Host: x\r\nX-API-Key: \xff\xfe\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        ))
    for answer in (fast, slow):
        assert parts(answer)[0] == b"HTTP/1.1 401 Unauthorized", answer
        assert b"unknown API key" in parts(answer)[2]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert await gw.redis.xlen(gw.keys.contacts) == 0


async def test_errors_of_the_write_are_answered_and_counted_as_aiohttps(start_gateway):
    """A sender over its rate: the same 429 problem as aiohttp's route gives (only
    ``Date`` and the retry's seconds may differ), counted under the route."""
    from tests.server.test_observability import sample

    gw = await start_gateway(limits={"sender_contacts": 1, "sender_window": "60s"})
    first = orjson.dumps({"text": "x", "sender": "+8613800138000", "external_id": "1"})
    second = orjson.dumps({"text": "x", "sender": "+8613800138000", "external_id": "2"})
    third = orjson.dumps({"text": "x", "sender": "+8613800138000", "external_id": "3"})
    (ok,) = await exchange(gw.http_port, whole(first))
    (fast,) = await exchange(gw.http_port, whole(second))
    (slow,) = await exchange(gw.http_port, chunked(third))
    assert taken(gw) == 2
    assert ok.startswith(b"HTTP/1.1 202")
    (fast_status, fast_headers, fast_body), (status, headers, body) = parts(fast), parts(slow)
    assert fast_status == status == b"HTTP/1.1 429 Too Many Requests"
    assert fast_body == body and orjson.loads(body)["status"] == 429
    assert fast_headers.keys() == headers.keys()
    assert fast_headers[b"content-type"] == headers[b"content-type"]
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/metrics"
    ) as resp:
        text = await resp.text()
    assert sample(text, "gateway_http_requests_total", route="/v1/intake", status="429") == 2
    assert sample(text, "gateway_http_requests_total", route="/v1/intake", status="202") == 1


async def test_a_handler_error_is_a_logged_counted_500(caplog):
    """A bug in a route's work: a 500 problem, logged with its traceback, counted, and the
    connection serves its next request (the server's own app, a route of the test's)."""
    from gateway.server.config import HostPort
    from gateway.server.fastpost import Post
    from gateway.server.http import HttpServer, add_direct, build_app
    from gateway.server.metrics import Metrics

    async def work() -> tuple[int, bytes]:
        raise RuntimeError("a bug")

    def fast(post: Post):
        return work()

    async def handler(request):
        raise AssertionError("not aiohttp's")

    metrics = Metrics()
    app = build_app(1024, metrics)
    add_direct(app, "POST", "/v1/bug", handler, fast=fast)
    server = HttpServer(app, HostPort("127.0.0.1", 0))
    await server.start()
    try:
        request = b"POST /v1/bug HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
        with caplog.at_level(logging.ERROR, logger="gateway.server.http"):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                one = await exchange_on(reader, writer, request)
                two = await exchange_on(reader, writer, request)
            finally:
                writer.close()
    finally:
        await server.stop()
    for answer in (one, two):
        status, headers, body = parts(answer)
        assert status == b"HTTP/1.1 500 Internal Server Error"
        assert headers[b"content-type"] == b"application/problem+json"
        assert orjson.loads(body) == {
            "status": 500, "title": "Internal Server Error", "detail": "internal error"
        }
    assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("a bug",)] * 2
    text = metrics.render().decode()
    assert 'route="/v1/bug",status="500"' in text.replace('method="POST",', "")


async def paused(url: str, ms: int) -> aioredis.Redis:
    """Redis's writes paused for ``ms`` (a contact's write held in hand)."""
    client = aioredis.Redis.from_url(url)
    await client.execute_command("CLIENT", "PAUSE", ms, "WRITE")
    return client


async def test_requests_behind_one_in_hand_are_answered_in_order(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "10s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)

    async def behind(first: bytes, *then: bytes) -> list[bytes]:
        """``first`` taken and held in hand by Redis; ``then`` written while it is."""
        client = await paused(own_redis.url, 5000)
        try:
            before = taken(gw)
            writer.write(first)
            await asyncio.sleep(0.3)  # taken, its write held by Redis
            assert taken(gw) == before + 1
            for data in then:
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.05)
            await client.execute_command("CLIENT", "UNPAUSE")
            return [await read_answer(reader) for _ in range(1 + len(then))]
        finally:
            await client.aclose()

    def contact(name: str) -> bytes:
        return orjson.dumps({"text": name, "external_id": name})

    try:
        # one request behind: held, then taken in its turn
        answers = await behind(whole(contact("a")), whole(contact("b")))
        assert taken(gw) == 2
        # several behind: held, then aiohttp's, all of them (they came as one chunk)
        answers += await behind(
            whole(contact("c")),
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
            chunked(contact("d")),
            whole(contact("e")),
        )
        assert taken(gw) == 3
        # the connection's bytes then went to aiohttp not one request a chunk: it keeps them
        answers += [(await exchange_on(reader, writer, whole(contact("f"))))]
        assert taken(gw) == 3
    finally:
        writer.close()
    statuses = [parts(a)[0] for a in answers]
    assert statuses[3] == b"HTTP/1.1 200 OK" and b'"ok"' in answers[3]
    ids = [orjson.loads(parts(a)[2])["id"] for i, a in enumerate(answers) if i != 3]
    contacts = {c.id: c.external_id for c in await gw.read_contacts()}
    assert [contacts[i] for i in ids] == ["a", "b", "c", "d", "e", "f"]


async def exchange_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await read_answer(reader)


async def test_a_connection_busy_past_the_keep_alive_clock_gets_its_answer(
    start_gateway, own_redis
):
    """aiohttp's keep-alive clock closes a connection it sees idle: one whose request is in
    hand longer than ``keepalive_timeout`` is not idle, and once answered it is idle again,
    closed when the clock runs out."""
    gw = await start_gateway(
        url=own_redis.url, redis={"write_timeout": "10s"}, limits={"keepalive_timeout": "1s"}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    client = await paused(own_redis.url, 2500)
    try:
        writer.write(whole(orjson.dumps({"text": "a"})))
        answer = await read_answer(reader)
        assert answer.startswith(b"HTTP/1.1 202") and taken(gw) == 1
        closed = await asyncio.wait_for(reader.read(1), 10)  # then closed for idling
        assert closed == b""
    finally:
        await client.aclose()
        writer.close()


async def test_stop_waits_for_the_requests_in_hand(start_gateway, own_redis):
    gw = await start_gateway(url=own_redis.url, redis={"write_timeout": "10s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    client = await paused(own_redis.url, 3000)
    try:
        writer.write(whole(orjson.dumps({"text": "a", "external_id": "a"})))
        await asyncio.sleep(0.3)
        assert taken(gw) == 1
        await gw.http.stop()  # Redis lets the write through after 3 s
        answer = await read_answer(reader)
    finally:
        await client.aclose()
        writer.close()
    assert answer.startswith(b"HTTP/1.1 202")
    redis = aioredis.Redis.from_url(own_redis.url)
    try:
        assert await redis.xlen(gw.keys.contacts) == 1
    finally:
        await redis.aclose()


async def test_a_request_still_in_hand_past_the_stop_bound_is_cancelled_and_counted(caplog):
    """The stop's one bound (``shutdown_timeout``) covers the requests in hand: one that
    outlives it is cancelled (counted 499, said in the log) and the stop returns."""
    from gateway.server.config import HostPort
    from gateway.server.http import HttpServer, add_direct, build_app
    from gateway.server.metrics import Metrics

    started = asyncio.Event()
    cancelled: list[bool] = []

    async def work() -> tuple[int, bytes]:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        raise AssertionError("never")

    async def handler(request):
        raise AssertionError("not aiohttp's")

    metrics = Metrics()
    app = build_app(1024, metrics)
    add_direct(app, "POST", "/v1/slow", handler, fast=lambda post: work())
    server = HttpServer(app, HostPort("127.0.0.1", 0))
    server.shutdown_timeout = 0.5
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /v1/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await asyncio.wait_for(started.wait(), 5)
        with caplog.at_level(logging.WARNING, logger="gateway.server.fastpost"):
            await asyncio.wait_for(server.stop(), 10)
        assert await reader.read() == b""  # closed, unanswered
    finally:
        writer.close()
    assert cancelled == [True]
    assert any("still in hand" in r.getMessage() for r in caplog.records)
    assert 'route="/v1/slow",status="499"' in metrics.render().decode().replace(
        'method="POST",', ""
    )


async def test_a_client_that_reads_no_answers_gets_no_more_taken():
    """While the transport's writing is paused (the client reads nothing), the next request
    is aiohttp's, which waits for the answer before it to drain: answers of 16 MiB, far more
    than the sockets hold."""
    from gateway.server.config import HostPort
    from gateway.server.fastpost import Post, raw_answer
    from gateway.server.http import HttpServer, RawResponse, add_direct, build_app

    size = 16 * 1024 * 1024
    raw = raw_answer(b"HTTP/1.1 200 OK", b"application/octet-stream", b"x" * size)
    calls: list[str] = []

    async def work() -> tuple[int, bytes]:
        return 200, raw

    def fast(post: Post):
        calls.append("fast")
        return work()

    async def handler(request):
        calls.append("aiohttp")
        await request.read()
        return RawResponse(200, "OK", raw)

    app = build_app(1024)
    add_direct(app, "POST", "/big", handler, fast=fast)
    server = HttpServer(app, HostPort("127.0.0.1", 0))
    await server.start()
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        for _ in range(3):  # one a chunk, none read
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            await asyncio.sleep(0.2)
        before = list(calls)
        for _ in range(3):
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(size)
        writer.close()
    finally:
        await server.stop()
    # fails without the check: fast, fast, fast, every answer buffered in the process
    assert before == ["fast", "aiohttp"] and calls == ["fast", "aiohttp", "aiohttp"]


# -- never a request where aiohttp is not between requests (found by review) ---------

GOOD = "X-API-Key: app-key-0123456789"
HEALTH = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_a_head_aiohttp_began_in_a_pipelined_chunk_is_not_a_new_request(start_gateway):
    """One chunk: a whole GET and the first lines of a POST's head. aiohttp parses the GET
    and keeps the POST's head begun; the next chunk continues that head for aiohttp (here: a
    second Host, its 400, nothing written), never a request of its own (``_at_boundary``:
    that chunk was not exactly one request)."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    try:
        writer.write(HEALTH + LINE + b"Host: x\r\nX-Junk: ")
        first = await read_answer(reader)
        assert first.startswith(b"HTTP/1.1 200"), first
        await asyncio.sleep(0.1)
        writer.write(whole(orjson.dumps({"text": "smuggled"}), GOOD))
        await writer.drain()
        second = await asyncio.wait_for(read_answer(reader), 5)
    finally:
        writer.close()
    contacts = [c.text for c in await gw.read_contacts()]
    assert (parts(second)[0][9:12], taken(gw), contacts) == (b"400", 0, [])  # aiohttp: HTTP/1.0 400


UPGRADE = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.mark.parametrize(
    ("label", "before", "answers"),
    [("32 pipelined requests", HEALTH * 32, 32), ("a declined upgrade", UPGRADE, 1)],
)
async def test_the_rest_of_a_body_parsed_inside_aiohttp_is_no_request(
    start_gateway, label, before, answers
):
    """``test_the_rest_of_a_body_aiohttp_is_reading_is_no_request`` with the refused POST
    parsed by aiohttp outside the guard's call of its ``data_received``: behind 32 requests
    in the same chunk (aiohttp's queue holds 32; its parser keeps the rest and parses it from
    ``_resume_reading_if_drained``), or behind a declined upgrade (its tail parsed in
    ``finish_response``). After the 401 (sent before the body is read) aiohttp lingers
    reading the body: the body's rest is no request."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    inner = whole(orjson.dumps({"text": "smuggled"}), GOOD)
    outer = LINE + b"Host: x\r\nX-API-Key: wrong\r\nContent-Length: %d\r\n\r\n" % (
        len(inner) + 2
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    try:
        writer.write(before + outer + b"{ ")
        for _ in range(answers):
            assert (await read_answer(reader)).startswith(b"HTTP/1.1 200"), label
        answer = await read_answer(reader)  # 401 before the body is read
        assert answer.startswith(b"HTTP/1.1 401"), answer
        writer.write(inner)
        await writer.drain()
        writer.write(whole(orjson.dumps({"text": "next"}), GOOD))
        after = await asyncio.wait_for(read_answer(reader), 5)
    finally:
        writer.close()
    assert after.startswith(b"HTTP/1.1 202"), after
    assert [c.text for c in await gw.read_contacts()] == ["next"]


async def test_a_head_over_aiohttps_limits_is_aiohttps_400(start_gateway):
    """aiohttp refuses a header field over 8190 bytes and more than 128 headers (400,
    ``LineTooLong`` / ``Too many headers received``): such heads are aiohttp's
    (``fastpost.MAX_HEAD``, ``MAX_FIELDS``), never a contact written."""
    gw = await start_gateway()
    results = []
    for label, extra in (
        ("long field", ("X-Long: " + "a" * 9000,)),
        ("129 headers", tuple(f"X-A{i}: v" for i in range(127))),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
        try:
            writer.write(whole(orjson.dumps({"text": label}), *extra))
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(65536), 5)
        finally:
            writer.close()
        results.append((label, answer[9:12]))  # aiohttp: HTTP/1.0 400
    assert results == [("long field", b"400"), ("129 headers", b"400")]
    assert taken(gw) == 0 and await gw.read_contacts() == []


async def test_a_request_behind_one_aiohttp_has_just_dequeued_is_not_taken(start_gateway):
    """aiohttp's ``start()`` pops a request from its queue and creates the task that
    handles it; that task marks the request in hand only at its first step, an iteration of
    the loop later. A chunk read in between waits a turn (``_between``: None); it is taken
    only once aiohttp's loop is back on its waiter, the GET answered (with a handler done in
    one step), or given to aiohttp behind the GET (``/metrics`` suspends: in hand, False).
    Taken before, its 202 could come before the GET's answer. The second request is sent
    from a reader callback that runs right after the loop read the first (same ``select``),
    so it is read in the next iteration, the one in which ``start()`` pops the first."""
    gw = await start_gateway()
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(sock, ("127.0.0.1", gw.http_port))
    await asyncio.sleep(0.05)
    r, w = os.pipe()

    def after_first() -> None:
        os.read(r, 1)
        loop.remove_reader(r)
        sock.send(whole(orjson.dumps({"text": "w", "external_id": "w"})))

    loop.add_reader(r, after_first)
    sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    os.write(w, b"x")  # readable after the socket: its callback runs after the socket's read
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        statuses = [parts(await asyncio.wait_for(read_answer(reader), 10))[0] for _ in range(2)]
    finally:
        writer.close()
        os.close(r)
        os.close(w)
    assert (taken(gw), statuses) == (0, [b"HTTP/1.1 200 OK", b"HTTP/1.1 202 Accepted"])


# -- found by the second review ---------------------------------------------------

async def test_the_body_of_a_connect_is_no_request_boundary(start_gateway):
    """aiohttp's C parser reads a ``CONNECT`` as an upgrade whatever its ``Content-Length``:
    the bytes after its head are a tunnel's; once the CONNECT is declined, ``finish_response``
    feeds them to the parser as the start of the next request. Here they are a begun head,
    and the next chunk (a whole plain POST) is its rest for aiohttp (a second Host: 400,
    nothing written), never a request of its own (``one_request`` frames no CONNECT)."""
    gw = await start_gateway(api={"open_to_loopback": False, "keys": API_KEYS})
    begun = LINE + b"Host: x\r\nX-Junk: "
    connect = b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        len(begun), begun
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
    try:
        writer.write(connect)
        first = await read_answer(reader)  # aiohttp's answer to the CONNECT, kept alive
        assert first.startswith(b"HTTP/1.1 4"), first
        await asyncio.sleep(0.1)  # aiohttp parked on its waiter (not an assertion)
        writer.write(whole(orjson.dumps({"text": "smuggled"}), GOOD))
        await writer.drain()
        second = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    contacts = [c.text for c in await gw.read_contacts()]
    # aiohttp alone (fast path off): b"HTTP/1.0 400 Bad Request", nothing taken, no contact
    assert (second[9:12], taken(gw), contacts) == (b"400", 0, [])


def _server_with_slow_routes(shutdown_timeout: float) -> tuple[Any, asyncio.Event, Any]:
    """An HttpServer with ``POST /v1/slow`` answered from the connection and never done
    (until cancelled), ``GET /wait`` answered by aiohttp once ``release`` is set, and
    ``GET /ok`` answered by aiohttp at once."""
    from gateway.server.config import HostPort
    from gateway.server.http import HttpServer, add_direct, build_app
    from gateway.server.metrics import Metrics

    started = asyncio.Event()
    release = asyncio.Event()

    async def work() -> tuple[int, bytes]:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("never")

    async def not_aiohttps(request: web.Request) -> web.Response:
        raise AssertionError("not aiohttp's")

    async def wait(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="waited")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = build_app(1024, Metrics())
    add_direct(app, "POST", "/v1/slow", not_aiohttps, fast=lambda post: work())
    app.router.add_get("/wait", wait)
    app.router.add_get("/ok", ok)
    server = HttpServer(app, HostPort("127.0.0.1", 0))
    server.shutdown_timeout = shutdown_timeout
    return server, release, started


SLOW = b"POST /v1/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def test_the_stop_bound_still_bounds_aiohttp_after_a_drain_that_used_it_all():
    """When the drain used the whole bound (a request in hand past it), aiohttp's own wait
    still has one: aiohttp reads a timeout of 0 as none at all (``helpers.ceil_timeout``),
    so it is given what is left, at least 50 ms. Here: bound 0.5 s, an aiohttp request
    waiting on an event that is set only after the check."""
    server, release, started = _server_with_slow_routes(0.5)
    await server.start()
    _, w1 = await asyncio.open_connection("127.0.0.1", server.port)
    _, w2 = await asyncio.open_connection("127.0.0.1", server.port)
    stop = None
    try:
        w1.write(SLOW)  # taken, in hand past the bound
        await asyncio.wait_for(started.wait(), 5)
        w2.write(b"GET /wait HTTP/1.1\r\nHost: x\r\n\r\n")  # aiohttp's, in hand
        await w2.drain()
        await asyncio.sleep(0.2)
        stop = asyncio.ensure_future(server.stop())
        done, _ = await asyncio.wait({stop}, timeout=10)  # 20x the bound: a hang guard
        assert stop in done, "stop still waiting for aiohttp's request 9.5 s past its bound"
    finally:
        release.set()
        if stop is not None:
            await stop
        w1.close()
        w2.close()


async def test_a_request_behind_one_cancelled_at_stop_is_not_answered_in_its_place():
    """A request in hand past the stop bound is cancelled: its connection is closed with
    no answer, and the bytes held behind it are dropped. Handed to aiohttp, the GET's 200
    would be read as the POST's answer (for two pipelined contacts: the second's 202 as the
    first's, and the first, cancelled, never retried)."""
    server, release, started = _server_with_slow_routes(0.5)
    release.set()
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(SLOW)
        await asyncio.wait_for(started.wait(), 5)
        writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")  # held behind the POST
        await writer.drain()
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.stop(), 10)
        got = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert got == b"", f"the POST's connection answered: {parts(got)[0]!r} {parts(got)[2]!r}"


# -- the turn's wait (found by the third review) ------------------------------------

def _fast_and_aiohttp_routes() -> Any:
    """``POST /v1/fast`` answered from the connection; ``GET /ok`` answered by aiohttp at
    once (its task done in its first step); ``POST /echo`` aiohttp's, answering the length
    of the body it read."""
    from gateway.server.config import HostPort
    from gateway.server.http import HttpServer, add_direct, build_app
    from gateway.server.metrics import Metrics

    async def work() -> tuple[int, bytes]:
        return 202, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"

    async def not_aiohttps(request: web.Request) -> web.Response:
        return web.Response(status=202)

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(request: web.Request) -> web.Response:
        return web.Response(text=str(len(await request.read())))

    app = build_app(1024, Metrics())
    add_direct(app, "POST", "/v1/fast", not_aiohttps, fast=lambda post: work())
    app.router.add_get("/ok", ok)
    app.router.add_post("/ok", ok)
    app.router.add_post("/echo", echo)
    return HttpServer(app, HostPort("127.0.0.1", 0))


def test_bytes_held_past_HELD_in_the_turn_wait_do_not_leave_reading_paused():
    """Bytes held past ``HELD`` while aiohttp passes between requests leave no reading
    paused. On uvloop, the gateway's loop (``cli``): libuv reads a readable socket until it
    has nothing (up to 32 reads), so a turn can hold far more than one read's worth. (Found
    by the third review.)"""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_held_past_HELD())


async def _held_past_HELD() -> None:
    """The turn's wait (``_between`` None) holds the chunk in ``_held``, and ``_hold``
    pauses the transport's reading once ``_held`` passes ``HELD``; when the held bytes are
    not one request they go to aiohttp, the reading resumed first (``_release``). Paused,
    nothing more was read on the connection: aiohttp answered what it was given, then waited
    for the rest of a head that never came (its keep-alive clock ended the connection with
    the client's requests unanswered: 17 of 22 answered).

    Timeline: the GET is read in iteration A; the pipelined POSTs are sent from a reader
    callback that runs after that read, so they are read in A+1, after ``start()`` popped
    the GET and made its task (None: held, turn 1; libuv's further reads of the same socket
    in that turn: ``_hold``, past HELD, reading paused); in A+2 the GET's task runs to its
    end, then ``_again`` (None: held again, turn 2); in A+3 ``start()`` is back on its
    waiter, ``_again`` finds aiohttp between requests, ``take`` declines (not one request)
    and aiohttp is given the bytes, the reading still paused."""
    from gateway.server.config import Duration, LimitsSection

    server = _fast_and_aiohttp_routes()
    # the end comes sooner
    server.limits = LimitsSection(body_timeout=Duration(2), keepalive_timeout=Duration(2))
    await server.start()
    loop = asyncio.get_running_loop()
    # no body (a body's end or read resumes the transport in aiohttp), fewer than aiohttp's
    # 32 queued messages (it pauses and resumes for those): heads of 32 KB, 4 fields each
    count = 20
    pad = "".join(f"X-Pad-{i}: {'p' * 8000}\r\n" for i in range(4)).encode()
    get = b"GET /ok HTTP/1.1\r\nHost: x\r\n" + pad + b"\r\n"
    rest = b"POST /v1/fast HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" + get * count
    # a receive window as the kernel's autotuning gives a busy connection (accepted sockets
    # inherit the listener's): a read of uvloop's whole buffer at once
    assert server._server is not None
    server._server.sockets[0].setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"POST /v1/fast HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    await read_answer(reader)
    assert server.fast is not None and server.fast.taken == 1
    await asyncio.sleep(0.05)
    r, w = os.pipe()
    sent = 0

    def after_first() -> None:
        nonlocal sent
        os.read(r, 1)
        loop.remove_reader(r)
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            sent = 0

    loop.add_reader(r, after_first)
    sock.send(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    os.write(w, b"x")
    await asyncio.sleep(0)
    answers: list[bytes] = []
    try:
        while sent == 0:
            await asyncio.sleep(0.01)
        writer.write(rest[sent:])
        try:
            # a hang guard 10x the body clock, not a timing: the connection ends first
            for _ in range(count + 2):  # the GET, the POST, the GETs
                answers.append(await asyncio.wait_for(read_answer(reader), 20))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
    finally:
        writer.close()
        os.close(r)
        os.close(w)
        await server.stop()
    # aiohttp alone (or the turn's wait resuming the reading): every request answered
    assert len(answers) == count + 2, (
        f"{len(answers)} of {count + 2} answered, then the connection ended "
        f"({sent} bytes in the first send)"
    )


# -- the head's parser against aiohttp's ------------------------------------------------

_name = st.sampled_from(
    ["Host", "Content-Length", "content-length", "Content-Type", "X-API-Key", "Authorization",
     "Connection", "Transfer-Encoding", "Expect", "X-Other", "Bad Name", "", "X\x00"]
)
_value = st.one_of(
    st.sampled_from(["2", "02", " 2 ", "-2", "2, 2", "keep-alive", "close", "chunked", "x"]),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=8),
)
_line = st.one_of(
    st.tuples(_name, _value).map(lambda nv: f"{nv[0]}: {nv[1]}".encode()),
    st.binary(max_size=12),
)


class _Protocol:
    """What aiohttp's parser asks of its protocol."""

    _reading_paused = False
    transport = None

    def pause_reading(self, **_: object) -> None: ...

    def resume_reading(self, **_: object) -> None: ...


_length = st.sampled_from(
    ["Content-Length: {}", "content-length:{}", "CONTENT-LENGTH: \t{} ", None]
)
_METHODS = (
    "GET HEAD POST PUT PATCH DELETE OPTIONS CONNECT TRACE PROPFIND PROPPATCH MKCOL COPY MOVE "
    "LOCK UNLOCK SEARCH REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE "
    "PURGE MKCALENDAR LINK UNLINK SOURCE PRI DESCRIBE ANNOUNCE SETUP PLAY PAUSE TEARDOWN "
    "GET_PARAMETER SET_PARAMETER REDIRECT RECORD FLUSH QUERY ACL BIND REBIND UNBIND FOO"
).split()
_request_line = st.one_of(
    st.sampled_from([
        LINE, b"GET  / HTTP/1.1\r\n", b"POST /v1/intake HTTP/1.0\r\n", b"GET / HTTP/1.1 \r\n",
    ]),
    st.builds(
        lambda method, target: f"{method} {target} HTTP/1.1\r\n".encode(),
        st.sampled_from(_METHODS), st.sampled_from(["/x", "*", "a:1", "/v1/intake?x=1"]),
    ),
)


@settings(max_examples=int(os.environ.get("FASTPOST_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    _request_line, st.lists(_line, max_size=4), _length, st.integers(0, 5), st.integers(0, 5),
    st.binary(max_size=4),
)
def test_what_the_head_parser_takes_aiohttp_parses_the_same(
    request_line, lines, length, at, host, body
):
    """Whatever ``frame`` takes as one whole request (``one_request``: after it aiohttp is
    between requests), aiohttp's parser reads as that one request with that body and no
    transfer coding, and the headers this path reads as aiohttp reads them: the connection
    never reads a request otherwise than aiohttp."""
    if length is not None:
        lines.insert(min(at, len(lines)), length.format(len(body)).encode())
    lines.insert(min(host, len(lines)), b"Host: x")
    data = request_line + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body
    framed = frame(data, len(request_line))
    whole_one = one_request(data)
    if framed is None or not whole_one:
        assert split_post(data, len(request_line)) is None or not whole_one
        return
    read, start, stop = framed
    assert stop == len(data)
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(_Protocol(), loop, 2**16, max_line_size=8190,
                                   max_field_size=8190)
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError:
            # aiohttp refuses it (a target its parser does not take): a 400 that ends the
            # connection, so no later chunk is read in its wake; never the fast path's request
            assert request_line != LINE
            return
    finally:
        loop.close()
    assert len(messages) == 1 and not upgraded and tail == b""
    message, payload = messages[0]
    assert request_line.startswith(message.method.encode() + b" ")
    assert not message.chunked and message.compression is None and not message.upgrade
    assert message.should_close is False
    assert int(message.headers.get("Content-Length", "0")) == stop - start
    assert (b"".join(payload._buffer) if stop > start else b"") == data[start:stop]
    for name in ("Authorization", "X-API-Key"):
        value = read.get(name.lower().encode())
        expected = message.headers.get(name)
        assert (value.decode("utf-8", "surrogateescape") if value is not None else None) == (
            expected
        )
