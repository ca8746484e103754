"""The consumer API over real HTTP and a real Redis: every operation, and how it refuses."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import pytest
from aiohttp import web

from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.cases.conftest import API, Client, auth, submit
from tests.harness import ServerRelay

CONTACTS = "/v1/groups/{group}/contacts"
EVENTS = "/v1/groups/{group}/events"


async def read(client: Client, group: str, consumer: str, **params: str) -> list[dict]:
    status, body = await client.call(
        "GET",
        f"/v1/groups/{group}/contacts",
        CONTACTS,
        params={"consumer": consumer, **params},
    )
    assert status == 200, body
    return list(body["entries"])


async def test_two_consumers_compete_and_share_the_stream(client: Client) -> None:
    ids = [await submit(client, f"pothole {i}") for i in range(20)]
    a = await read(client, "cases", "worker-a", count="7")
    b = await read(client, "cases", "worker-b", count="100")
    got_a = [e["contact"]["id"] for e in a]
    got_b = [e["contact"]["id"] for e in b]
    assert len(got_a) == 7
    assert not set(got_a) & set(got_b)
    assert sorted(got_a + got_b) == sorted(ids)
    assert got_a + got_b == ids  # stream order, split between the two
    # a second group sees everything again
    other = await read(client, "audit", "auditor", count="100")
    assert [e["contact"]["id"] for e in other] == ids
    # nothing new for the first group
    assert await read(client, "cases", "worker-a") == []
    status, acked = await client.call(
        "POST",
        "/v1/groups/cases/contacts/ack",
        "/v1/groups/{group}/contacts/ack",
        json_body={"ids": [e["entry_id"] for e in a]},
    )
    assert (status, acked) == (200, {"acked": 7})
    # acking again acknowledges nothing
    status, acked = await client.call(
        "POST",
        "/v1/groups/cases/contacts/ack",
        "/v1/groups/{group}/contacts/ack",
        json_body={"ids": [a[0]["entry_id"]]},
    )
    assert acked == {"acked": 0}
    # b's entries are still pending for b, and only for b
    pending_b = await read(client, "cases", "worker-b", pending="true", count="100")
    assert [e["contact"]["id"] for e in pending_b] == got_b
    assert await read(client, "cases", "worker-a", pending="true") == []


async def test_long_poll_returns_when_a_contact_arrives(client: Client) -> None:
    assert await read(client, "cases", "w", start="new") == []
    poll = asyncio.ensure_future(read(client, "cases", "w", wait_ms="20000"))
    await asyncio.sleep(0.3)
    assert not poll.done()
    cid = await submit(client, "late arrival")
    entries = await poll
    assert [e["contact"]["id"] for e in entries] == [cid]


async def test_long_poll_with_nothing_returns_empty(client: Client) -> None:
    assert await read(client, "quiet", "w", start="new", wait_ms="300") == []


async def test_start_new_skips_history(client: Client) -> None:
    await submit(client, "old")
    assert await read(client, "late-group", "w", start="new") == []
    cid = await submit(client, "new")
    assert [e["contact"]["id"] for e in await read(client, "late-group", "w")] == [cid]


async def test_a_dying_consumer_leaves_its_entries_to_reclaim(client: Client) -> None:
    ids = [await submit(client, f"noise {i}") for i in range(5)]
    dead = await read(client, "cases", "dies", count="5")
    assert len(dead) == 5
    # it acknowledges the first two, then dies holding three
    await client.call(
        "POST",
        "/v1/groups/cases/contacts/ack",
        "/v1/groups/{group}/contacts/ack",
        json_body={"ids": [dead[0]["entry_id"], dead[1]["entry_id"]]},
    )
    # too fresh to take over with a long idle bound
    status, body = await client.call(
        "POST",
        "/v1/groups/cases/contacts/reclaim",
        "/v1/groups/{group}/contacts/reclaim",
        json_body={"consumer": "survivor", "min_idle_ms": 600000},
    )
    assert status == 200 and body["entries"] == []
    await asyncio.sleep(0.05)
    status, body = await client.call(
        "POST",
        "/v1/groups/cases/contacts/reclaim",
        "/v1/groups/{group}/contacts/reclaim",
        json_body={"consumer": "survivor", "min_idle_ms": 10},
    )
    assert status == 200
    assert [e["contact"]["id"] for e in body["entries"]] == ids[2:]
    assert body["next"] == "0-0"
    # now the survivor holds them: they are its own pending entries
    mine = await read(client, "cases", "survivor", pending="true")
    assert [e["contact"]["id"] for e in mine] == ids[2:]
    assert await read(client, "cases", "dies", pending="true") == []


async def test_events_group_read_ack_and_reclaim(client: Client) -> None:
    cid = await submit(client, "hello")
    status, body = await client.call(
        "GET", "/v1/groups/ev/events", EVENTS, params={"consumer": "e1", "count": "50"}
    )
    assert status == 200
    mine = [e for e in body["entries"] if e["event"]["contact_id"] == cid]
    assert [e["event"]["type"] for e in mine] == ["enqueued"]
    status, body = await client.call(
        "POST",
        "/v1/groups/ev/events/reclaim",
        "/v1/groups/{group}/events/reclaim",
        json_body={"consumer": "e2", "min_idle_ms": 0},
    )
    assert [e["entry_id"] for e in body["entries"]] == [mine[0]["entry_id"]]
    status, body = await client.call(
        "POST",
        "/v1/groups/ev/events/ack",
        "/v1/groups/{group}/events/ack",
        json_body={"ids": [mine[0]["entry_id"]]},
    )
    assert body == {"acked": 1}


async def test_get_contact_with_its_events(client: Client) -> None:
    cid = await submit(client, "street light out")
    status, body = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body={"type": "responded", "detail": {"case": "C-1"}},
    )
    assert status == 201 and body["recorded"] is True
    assert body["event"]["met"] is True and body["event"]["source"] == "api:replier"

    async def both() -> dict | None:
        status, body = await client.call("GET", f"/v1/contacts/{cid}", "/v1/contacts/{contact_id}")
        assert status == 200
        types = [e["type"] for e in body["events"]]
        return body if types == ["enqueued", "responded"] else None

    body = await eventually(both)
    assert body["contact"]["id"] == cid and body["contact"]["text"] == "street light out"
    assert body["events"][1]["detail"] == {"case": "C-1"}
    # a second responded is not recorded again
    status, again = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body={"type": "responded"},
    )
    assert (status, again) == (200, {"recorded": False, "event": None})


async def test_closed_settles_the_deadline(client: Client, api_gateway: Gateway) -> None:
    cid = await submit(client, "never mind")
    keys = api_gateway.keys
    assert await api_gateway.redis.zscore(keys.deadlines, cid) is not None
    status, body = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body={"type": "closed", "at": "2026-01-01T00:00:00Z"},
    )
    assert status == 201 and body["event"]["type"] == "closed"
    assert body["event"]["at"] == "2026-01-01T00:00:00.000000Z"
    assert await api_gateway.redis.zscore(keys.deadlines, cid) is None
    assert await api_gateway.redis.zscore(keys.warnings, cid) is None
    status, body = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body={"type": "closed"},
    )
    assert (status, body) == (200, {"recorded": False, "event": None})
    closed = [e for e in await api_gateway.read_events() if e.type == "closed"]
    assert len(closed) == 1


async def test_concurrent_closes_write_one_event(client: Client, api_gateway: Gateway) -> None:
    """Case systems closing the same contact at once: one close is written (201), the others
    answered ``recorded: false``; the check and the mark are in the call that writes it."""
    cid = await submit(client, "close me")
    answers = await asyncio.gather(*(client.call(
        "POST", f"/v1/contacts/{cid}/events", "/v1/contacts/{contact_id}/events",
        token="replier", json_body={"type": "closed", "detail": {"n": n}},
    ) for n in range(8)))  # eight different events: not the digest's once
    assert sorted(status for status, _ in answers) == [200] * 7 + [201]
    closed = [e for e in await api_gateway.read_events() if e.type == "closed"]
    assert len(closed) == 1
    mark = await api_gateway.redis.hget(api_gateway.keys.contact(cid), "stamp:closed")
    assert mark is not None and int(mark) == closed[0].at


async def test_a_contact_an_older_instance_closed_is_closed(
    client: Client, api_gateway: Gateway
) -> None:
    """A rolling upgrade: the older route's mark (``HSET stamp:closed`` after its write)
    refuses this version's close."""
    cid = await submit(client, "closed elsewhere")
    await api_gateway.redis.hset(api_gateway.keys.contact(cid), "stamp:closed", 1)
    status, body = await client.call(
        "POST", f"/v1/contacts/{cid}/events", "/v1/contacts/{contact_id}/events",
        token="replier", json_body={"type": "closed"},
    )
    assert (status, body) == (200, {"recorded": False, "event": None})
    assert [e for e in await api_gateway.read_events() if e.type == "closed"] == []


async def test_a_close_of_a_contact_gone_meanwhile_writes_nothing(api_gateway: Gateway) -> None:
    """The contact's hash expired between the route's read of it and the close: nothing is
    written, and the hash is not made again (it would have no expiry)."""
    from gateway.contact.clock import SYSTEM_CLOCK
    from gateway.records import Event, Inbound, Sender

    receipt = await api_gateway.intake.submit(Inbound(
        channel="web", adapter="test", external_id="gone", sender=Sender("a@example.org"),
        recipient="12345", received_at=SYSTEM_CLOCK.now_us(), text="x",
    ))
    key = api_gateway.keys.contact(receipt.contact_id)
    await api_gateway.redis.delete(key)
    event = Event(receipt.contact_id, "closed", SYSTEM_CLOCK.now_us(), "test")
    assert await api_gateway.queue.emit(event, once=True) is False
    assert not await api_gateway.redis.exists(key)
    assert [e for e in await api_gateway.read_events() if e.type == "closed"] == []


class ExpiresAtItsFacts(ServerRelay):
    """A relay in front of the embedded server that deletes ``key`` (as its expiry would), by a
    connection of its own, just before it passes on the first ``HMGET`` of it: the writers'
    read of a contact's facts, after the route has read the contact."""

    def __init__(self, server: Any, client: Any) -> None:
        super().__init__(server)
        self.client = client
        self.key = b""

    async def passing(self, command: list[Any]) -> bool:
        if self.key and command[:2] == [b"HMGET", self.key]:
            await self.client.delete(self.key)
            self.key = b""
        return True


async def test_an_event_for_a_contact_gone_since_the_routes_read_is_404(
    start_gateway: Any, session: Any, redis_server: Any, redis_client: Any
) -> None:
    """The contact expires between the route's read of it and the write (the relay deletes
    it as the writer reads its facts): 404, as for a contact unknown, not 200 ``recorded:
    false``, which says that it was recorded before; nothing is written, no hash made."""
    relay = ExpiresAtItsFacts(redis_server, redis_client)
    gw = await start_gateway(api=API, url=await relay.start())
    try:
        client = Client(session, f"http://127.0.0.1:{gw.http_port}")
        for type_ in ("answered", "responded", "closed"):
            cid = await submit(client, f"gone before its {type_}")
            key = gw.keys.contact(cid)
            relay.key = key.encode()
            status, problem = await client.call(
                "POST", f"/v1/contacts/{cid}/events", "/v1/contacts/{contact_id}/events",
                token="replier", json_body={"type": type_},
            )
            assert relay.key == b"", type_  # it was deleted between the read and the write
            assert status == 404 and "past retention" in problem["detail"], (type_, problem)
            assert not await gw.redis.exists(key)
            assert [e for e in await gw.read_events()
                    if e.contact_id == cid and e.type == type_] == []
    finally:
        relay.close()


async def test_unknown_contact_is_404(client: Client) -> None:
    for method, path, template, token, body in [
        ("GET", "/v1/contacts/0190-nope", "/v1/contacts/{contact_id}", "reader", None),
        (
            "POST",
            "/v1/contacts/0190-nope/replies",
            "/v1/contacts/{contact_id}/replies",
            "replier",
            {"text": "hi"},
        ),
        (
            "POST",
            "/v1/contacts/0190-nope/events",
            "/v1/contacts/{contact_id}/events",
            "replier",
            {"type": "answered"},
        ),
    ]:
        status, problem = await client.call(method, path, template, token=token, json_body=body)
        assert status == 404, (path, problem)


async def test_reply_lands_on_the_replies_stream_and_fails_visibly(
    client: Client, api_gateway: Gateway
) -> None:
    """A contact from /v1/intake has no adapter to answer through: the router says so."""
    cid = await submit(client, "where is my bin")
    data = b"%PDF-1.4 fake"
    status, body = await client.call(
        "POST",
        f"/v1/contacts/{cid}/replies",
        "/v1/contacts/{contact_id}/replies",
        token="replier",
        json_body={
            "text": "We are on it.",
            "attachments": [
                {
                    "name": "notice.pdf",
                    "content_type": "application/pdf",
                    "data": base64.b64encode(data).decode(),
                }
            ],
        },
    )
    assert status == 202
    reply_id = body["id"]
    raw = await api_gateway.redis.xrange(api_gateway.keys.replies)
    import orjson

    on_stream = [orjson.loads(f[b"reply"]) for _, f in raw]
    assert [r["id"] for r in on_stream] == [reply_id]
    assert on_stream[0]["text"] == "We are on it."
    attachment = on_stream[0]["attachments"][0]
    assert attachment["sha256"] == hashlib.sha256(data).hexdigest()
    assert attachment["size"] == len(data)
    assert api_gateway.attachments.read(attachment["sha256"]) == data

    async def failed() -> dict | None:
        _, body = await client.call("GET", f"/v1/contacts/{cid}", "/v1/contacts/{contact_id}")
        return next((e for e in body["events"] if e["type"] == "failed"), None)

    event = await eventually(failed)
    assert event["detail"]["reply_id"] == reply_id
    # the stored file can be attached to another reply by its digest alone
    status, body = await client.call(
        "POST",
        f"/v1/contacts/{cid}/replies",
        "/v1/contacts/{contact_id}/replies",
        token="replier",
        json_body={"attachments": [{"sha256": attachment["sha256"], "name": "again.pdf"}]},
    )
    assert status == 202


@pytest.mark.parametrize(
    ("token", "method", "path", "template", "body", "status"),
    [
        (None, "GET", "/v1/groups/g/contacts?consumer=c", CONTACTS, None, 401),
        ("bogus", "GET", "/v1/groups/g/contacts?consumer=c", CONTACTS, None, 401),
        ("replier", "GET", "/v1/groups/g/contacts?consumer=c", CONTACTS, None, 403),
        ("intake", "GET", "/v1/groups/g/events?consumer=c", EVENTS, None, 403),
        (
            "reader",
            "POST",
            "/v1/contacts/x/replies",
            "/v1/contacts/{contact_id}/replies",
            {"text": "hi"},
            403,
        ),
        (
            "reader",
            "POST",
            "/v1/contacts/x/events",
            "/v1/contacts/{contact_id}/events",
            {"type": "closed"},
            403,
        ),
        ("reader", "GET", "/v1/admin/deadletter", "/v1/admin/deadletter", None, 403),
        ("replier", "GET", "/v1/report", "/v1/report", None, 403),
        (None, "GET", "/v1/report", "/v1/report", None, 401),
        ("admin", "GET", "/v1/report", "/v1/report", None, 200),
        ("admin", "GET", "/v1/groups/g/contacts?consumer=c", CONTACTS, None, 200),
    ],
)
async def test_tokens_and_scopes(
    client: Client,
    token: str | None,
    method: str,
    path: str,
    template: str,
    body: object,
    status: int,
) -> None:
    headers = {}
    if token == "bogus":
        headers = {"Authorization": "Bearer not-a-token"}
        token = None
    got, answer = await client.call(
        method, path, template, token=token, json_body=body, headers=headers
    )
    assert got == status, answer
    if status == 401:
        assert answer["title"] == "Unauthorized"


async def test_open_to_loopback_lets_local_callers_in(start_gateway, session) -> None:
    """The try-it-here default: no token needed from 127.0.0.1."""
    gw = await start_gateway()
    local = Client(session, f"http://127.0.0.1:{gw.http_port}")
    status, _ = await local.call(
        "GET", "/v1/groups/g/contacts", CONTACTS, token=None, params={"consumer": "c"}
    )
    assert status == 200


@pytest.mark.parametrize(
    ("method", "path", "template", "kwargs", "status"),
    [
        ("GET", "/v1/groups/g/contacts", CONTACTS, {}, 400),  # consumer missing
        ("GET", "/v1/groups/g/contacts?consumer=a/b", CONTACTS, {}, 400),
        ("GET", "/v1/groups/gateway-replies/contacts?consumer=c", CONTACTS, {}, 400),
        ("GET", "/v1/groups/g/contacts?consumer=c&count=0", CONTACTS, {}, 400),
        ("GET", "/v1/groups/g/contacts?consumer=c&count=abc", CONTACTS, {}, 400),
        ("GET", "/v1/groups/g/contacts?consumer=c&wait_ms=999999", CONTACTS, {}, 400),
        ("GET", "/v1/groups/g/contacts?consumer=c&start=middle", CONTACTS, {}, 400),
        ("GET", "/v1/groups/g/contacts?consumer=c&pending=maybe", CONTACTS, {}, 400),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"data": b"{not json"},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"data": b"[1,2]"},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"json_body": {"ids": ["not-an-id"]}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"json_body": {"ids": []}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"json_body": {"ids": ["1-0"], "extra": 1}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"data": b'{"ids":["1-0"]}', "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"json_body": {"ids": ["1234567890-0"] * 6000}},
            413,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"min_idle_ms": 5}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"consumer": "c", "min_idle_ms": -1}},
            400,
        ),
        (
            "POST",
            "/v1/groups/never-made/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"consumer": "c"}},
            404,
        ),
        (  # a non-string consumer was a plain-text 500 (TypeError)
            "POST",
            "/v1/groups/g/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"consumer": 5}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"consumer": ["w"]}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/contacts/reclaim",
            "/v1/groups/{group}/contacts/reclaim",
            {"json_body": {"consumer": "c", "cursor": "18446744073709551616-0"}},
            400,
        ),
        (  # an id Redis refuses (past 2^64 - 1) was a 503 "queue unavailable"
            "POST",
            "/v1/groups/g/contacts/ack",
            "/v1/groups/{group}/contacts/ack",
            {"json_body": {"ids": ["99999999999999999999-0"]}},
            400,
        ),
        (
            "POST",
            "/v1/groups/g/events/ack",
            "/v1/groups/{group}/events/ack",
            {"json_body": {"ids": ["1-18446744073709551616"]}},
            400,
        ),
        (
            "GET",
            "/v1/groups/g/contacts?consumer=w%0A",
            "/v1/groups/{group}/contacts",
            {},
            400,
        ),
        ("GET", "/v1/groups/g/contacts?consumer=w&count=%C2%B2", CONTACTS, {}, 400),
        ("GET", "/v1/report?since=forever", "/v1/report", {}, 400),
        ("GET", "/v1/report?by=week", "/v1/report", {}, 400),
    ],
)
async def test_malformed_requests(
    client: Client, method: str, path: str, template: str, kwargs: dict, status: int
) -> None:
    got, problem = await client.call(method, path, template, **kwargs)
    assert got == status, problem


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"type": "abandoned"}, 400),
        ({"type": "answered", "at": "yesterday"}, 400),
        ({"type": "answered", "at": "2999-01-01T00:00:00Z"}, 409),
        ({"type": "answered", "at": "2026-11-30"}, 400),  # a date is no RFC 3339 date-time
        ({"type": "answered", "detail": "text"}, 400),
        ({"type": "answered", "detail": {"x": "y" * 5000}}, 400),
        ({"type": "answered", "who": "me"}, 400),
    ],
)
async def test_malformed_events(client: Client, body: dict, status: int) -> None:
    cid = await submit(client, "x")
    got, problem = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body=body,
    )
    assert got == status, problem


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 400),
        ({"text": "   "}, 400),
        ({"text": 5}, 400),
        ({"text": "x" * 70000}, 400),
        ({"text": "hi", "attachments": {}}, 400),
        ({"text": "hi", "attachments": [{"name": "a"}]}, 400),
        ({"text": "hi", "attachments": [{"data": "***not base64***"}]}, 400),
        ({"text": "hi", "attachments": [{"sha256": "ab" * 32}]}, 404),
        ({"text": "hi", "attachments": [{"sha256": "ab" * 32, "data": "QQ=="}]}, 400),
        ({"text": "hi", "attachments": [{"sha256": "zz"}]}, 400),
        ({"text": "hi", "attachments": [{"data": "QQ=="}] * 11}, 400),
        # an empty file was accepted and sent to the citizen
        ({"text": "hi", "attachments": [{"data": ""}]}, 400),
        ({"attachments": [{"name": "empty.pdf", "data": ""}]}, 400),
        ({"text": "y" * (2 << 20)}, 413),
    ],
)
async def test_malformed_replies(client: Client, body: dict, status: int) -> None:
    cid = await submit(client, "x")
    got, problem = await client.call(
        "POST",
        f"/v1/contacts/{cid}/replies",
        "/v1/contacts/{contact_id}/replies",
        token="replier",
        json_body=body,
    )
    assert got == status, problem


async def test_a_stored_empty_file_is_no_reply_attachment(
    client: Client, api_gateway: Gateway
) -> None:
    """A citizen's empty upload is stored like any file; a reply naming it is refused."""
    cid = await submit(client, "x")
    empty = await api_gateway.attachments.put(b"", "empty.txt", "text/plain")
    status, problem = await client.call(
        "POST",
        f"/v1/contacts/{cid}/replies",
        "/v1/contacts/{contact_id}/replies",
        token="replier",
        json_body={"text": "see attached", "attachments": [{"sha256": empty.sha256}]},
    )
    assert status == 400 and "empty" in problem["detail"]


async def test_an_internal_error_is_a_counted_problem(
    client: Client, api_gateway: Gateway
) -> None:
    """A bug in a handler answers 500 as problem+json and shows in gateway_api_requests."""
    api = api_gateway.cases.api  # type: ignore[union-attr]

    async def broken(*args: Any) -> dict[str, Any]:
        raise TypeError("a bug")

    api.report_source = broken  # the report operation now fails inside its handler
    async with client.session.get(client.base + "/v1/report", headers=auth("reader")) as resp:
        assert resp.status == 500
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert (await resp.json(content_type=None))["title"] == "Internal Server Error"
    _, text = await client.call("GET", "/metrics", token=None)
    assert 'gateway_api_requests_total{operation="report",status="500"} 1.0' in text.decode()


async def test_api_metrics(client: Client) -> None:
    await submit(client, "m")
    await read(client, "cases", "w")
    await client.call("GET", "/v1/groups/cases/contacts", CONTACTS, token=None)
    status, text = await client.call("GET", "/metrics", token=None)
    assert status == 200
    body = text.decode()
    assert 'gateway_api_requests_total{operation="read",status="200"} 1.0' in body
    assert 'gateway_api_requests_total{operation="read",status="401"} 1.0' in body
    assert 'gateway_api_delivered_total{stream="contacts"} 1.0' in body


async def test_reply_through_a_real_adapter_shows_responded(
    start_gateway: Any, session: Any
) -> None:
    """An SMS contact from a Kannel get-url request; the API's reply goes out through Kannel's
    sendsms (a local server speaking its wire format) and comes back as ``responded``."""
    sent: list[dict[str, str]] = []

    async def sendsms(request: web.Request) -> web.Response:
        sent.append(dict(request.query))
        return web.Response(status=202, text="0: Accepted for delivery")

    app = web.Application()
    app.router.add_get("/cgi-bin/sendsms", sendsms)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        gw = await start_gateway(
            api=API,
            adapters={
                "kannel": {
                    "type": "kannel",
                    "path": "/sms/kannel",
                    "insecure_no_auth": True,
                    "sendsms_url": f"http://127.0.0.1:{port}/cgi-bin/sendsms",
                    "sendsms_username": "gw",
                    "sendsms_password": "pw",
                }
            },
        )
        base = f"http://127.0.0.1:{gw.http_port}"
        client = Client(session, base)
        async with session.get(
            base + "/sms/kannel",
            params={"from": "+8613800138000", "to": "12345", "text": "pothole", "id": "m-1"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        (contact,) = await eventually(gw.read_contacts)
        status, body = await client.call(
            "POST",
            f"/v1/contacts/{contact.id}/replies",
            "/v1/contacts/{contact_id}/replies",
            token="replier",
            json_body={"text": "Thanks, a crew is on the way."},
        )
        assert status == 202
        reply_id = body["id"]

        async def responded() -> dict | None:
            _, got = await client.call(
                "GET", f"/v1/contacts/{contact.id}", "/v1/contacts/{contact_id}"
            )
            return next((e for e in got["events"] if e["type"] == "responded"), None)

        event = await eventually(responded)
        assert event["detail"]["reply_id"] == reply_id and event["met"] is True
        assert [s["text"] for s in sent] == ["Thanks, a crew is on the way."]
        assert sent[0]["to"] == "+8613800138000"
    finally:
        await runner.cleanup()
