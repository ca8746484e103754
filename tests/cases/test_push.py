"""The pusher against a real local receiver: order, retries, timeouts, dead letters, replay."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

from gateway.cases.push.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.cases.conftest import API, Client, Receiver, submit

SECRET = "whsec-test-0123456789"


def subscriber(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {
        "subscribers": [
            {
                "name": "crm",
                "url": f"http://127.0.0.1:{receiver.port}/hook",
                "secret": SECRET,
                "backoff": "20ms",
                "max_backoff": "100ms",
                "timeout": "300ms",
                **extra,
            }
        ]
    }


def firsts(bodies: list[bytes]) -> list[dict[str, Any]]:
    """Distinct deliveries in the order the receiver first took them (at least once)."""
    seen: set[tuple[str, str]] = set()
    out = []
    for body in bodies:
        doc = json.loads(body)
        if (doc["type"], doc["delivery"]) not in seen:
            seen.add((doc["type"], doc["delivery"]))
            out.append(doc)
    return out


async def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``gateway ...`` in a child process without blocking this loop (the receiver's)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *args, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def stream_ids(gw: Gateway, key: str) -> list[str]:
    return [e.decode() for e, _ in await gw.redis.xrange(key)]


async def test_contacts_and_events_in_order_signed(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    gw = await start_gateway(api=API, push=subscriber(receiver, events=True))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    # twelve citizens (one citizen's third contact would add a repeat surge event)
    ids = [
        await submit(client, f"c{i}", sender={"address": f"c{i}@example.org"}) for i in range(12)
    ]
    await client.call(
        "POST", f"/v1/contacts/{ids[3]}/events", token="replier", json_body={"type": "responded"}
    )

    async def all_in() -> bool:
        return len(firsts(receiver.accepted)) == 12 + 12 + 1

    await eventually(all_in)
    docs = firsts(receiver.accepted)
    contacts = [d["data"]["id"] for d in docs if d["type"] == "contact"]
    assert contacts == ids
    events = [(d["data"]["contact_id"], d["data"]["type"]) for d in docs if d["type"] == "event"]
    assert events[:-1] == [(i, "enqueued") for i in ids] and events[-1] == (ids[3], "responded")
    # each contact comes before its own events
    position = {(d["type"], d["delivery"]): n for n, d in enumerate(docs)}
    for d in docs:
        if d["type"] == "event":
            contact = next(
                c
                for c in docs
                if c["type"] == "contact" and c["data"]["id"] == d["data"]["contact_id"]
            )
            assert position[("contact", contact["delivery"])] < position[("event", d["delivery"])]
    # deliveries are the stream entry ids, in stream order per kind
    assert [d["delivery"] for d in docs if d["type"] == "contact"] == await stream_ids(
        gw, gw.keys.contacts
    )
    for headers, body in receiver.received:
        assert verify(
            SECRET,
            headers[TIMESTAMP_HEADER],
            body,
            headers[SIGNATURE_HEADER],
            now_s=int(time.time()),
        )
        assert not verify(
            SECRET,
            headers[TIMESTAMP_HEADER],
            body + b" ",
            headers[SIGNATURE_HEADER],
            now_s=int(time.time()),
        )
        assert not verify(
            "other",
            headers[TIMESTAMP_HEADER],
            body,
            headers[SIGNATURE_HEADER],
            now_s=int(time.time()),
        )
        assert headers["Content-Type"] == "application/json"


def test_signature_is_hmac_sha256_over_timestamp_and_body() -> None:
    import hashlib
    import hmac

    body = b'{"type":"contact"}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == "sha256=" + expected
    assert verify("k", "1700000000", body, "sha256=" + expected, now_s=1700000100)
    assert not verify("k", "1700000000", body, "sha256=" + expected, now_s=1700001000)
    assert not verify("k", "-5", body, "sha256=" + expected, now_s=1700000000)


async def test_failing_hanging_slow_receiver_then_recovery_keeps_order_and_loses_nothing(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    receiver.plan = ["fail", "fail", "hang", "slow", "busy", "ok", "fail", "slow", "hang", "fail"]
    gw = await start_gateway(api=API, push=subscriber(receiver, max_attempts=50))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    ids = [await submit(client, f"c{i}") for i in range(10)]

    async def all_in() -> bool:
        return len(firsts(receiver.accepted)) == 10

    await eventually(all_in, timeout_s=60)
    assert [d["data"]["id"] for d in firsts(receiver.accepted)] == ids
    # no entry was taken twice out of order: every accepted body is in stream order
    order = [json.loads(b)["data"]["id"] for b in receiver.accepted]
    assert order == sorted(order, key=ids.index)
    attempts = [int(h["X-Gateway-Attempt"]) for h, _ in receiver.received]
    assert max(attempts) >= 3  # fail, fail, hang on the first contact
    assert await gw.redis.xlen(f"{gw.keys.tag}:deadletter:crm") == 0

    async def acknowledged() -> bool:  # the lane acknowledges after the answers, batched
        pending = await gw.redis.xpending(gw.keys.contacts, "gateway-push.crm")
        return int(pending["pending"]) == 0

    await eventually(acknowledged)
    metrics = (
        await (await session.get(f"http://127.0.0.1:{gw.http_port}/metrics")).read()
    ).decode()
    assert 'gateway_push_deliveries_total{outcome="delivered",subscriber="crm"} 10.0' in metrics
    assert 'gateway_push_deliveries_total{outcome="failed",subscriber="crm"}' in metrics


async def test_dead_letters_after_n_tries_then_replay_in_order(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    receiver.default = "fail"
    gw = await start_gateway(api=API, push=subscriber(receiver, max_attempts=3))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    ids = [await submit(client, f"c{i}") for i in range(3)]
    key = f"{gw.keys.tag}:deadletter:crm"

    async def parked() -> bool:
        return int(await gw.redis.xlen(key)) == 3

    await eventually(parked)
    assert len(receiver.received) == 9  # 3 tries each, then parked and acknowledged
    assert receiver.accepted == []
    _, body = await client.call(
        "GET", "/v1/admin/deadletter/crm", "/v1/admin/deadletter/{subscriber}", token="admin"
    )
    assert [e["attempts"] for e in body["entries"]] == [3, 3, 3]
    assert body["entries"][0]["error"] == "HTTP 500"
    metrics = (
        await (await session.get(f"http://127.0.0.1:{gw.http_port}/metrics")).read()
    ).decode()
    assert 'gateway_push_deadletter{subscriber="crm"} 3.0' in metrics
    # replay while the receiver still fails: nothing moves
    _, result = await client.call(
        "POST",
        "/v1/admin/deadletter/crm/replay",
        "/v1/admin/deadletter/{subscriber}/replay",
        token="admin",
        json_body={"count": 10},
    )
    assert result == {"subscriber": "crm", "replayed": 0, "remaining": 3, "error": "HTTP 500"}
    # it recovers: two replayed, oldest first, then the rest
    receiver.default = "ok"
    _, result = await client.call(
        "POST",
        "/v1/admin/deadletter/crm/replay",
        "/v1/admin/deadletter/{subscriber}/replay",
        token="admin",
        json_body={"count": 2},
    )
    assert result == {"subscriber": "crm", "replayed": 2, "remaining": 1, "error": None}
    status, result = await client.call(
        "POST",
        "/v1/admin/deadletter/crm/replay",
        "/v1/admin/deadletter/{subscriber}/replay",
        token="admin",
    )
    assert status == 200, result
    assert result["replayed"] == 1 and result["remaining"] == 0
    assert [json.loads(b)["data"]["id"] for b in receiver.accepted] == ids
    for headers, body in receiver.received[-3:]:
        assert verify(
            SECRET,
            headers[TIMESTAMP_HEADER],
            body,
            headers[SIGNATURE_HEADER],
            now_s=int(time.time()),
        )
    # new contacts flow normally again
    later = await submit(client, "after")

    async def got_later() -> bool:
        return any(json.loads(b)["data"]["id"] == later for b in receiver.accepted)

    await eventually(got_later)


async def test_replay_from_the_command_line(
    start_gateway: Any,
    session: Any,
    receiver: Receiver,
    tmp_path: Path,
    redis_url: str,
    prefix: str,
) -> None:
    receiver.default = "fail"
    gw = await start_gateway(api=API, push=subscriber(receiver, max_attempts=1))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    cid = await submit(client, "parked")
    key = f"{gw.keys.tag}:deadletter:crm"

    async def parked() -> bool:
        return int(await gw.redis.xlen(key)) == 1

    await eventually(parked)
    receiver.default = "ok"
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "cli"}"\n'
        f'[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        f'[[push.subscribers]]\nname = "crm"\nurl = "http://127.0.0.1:{receiver.port}/hook"\n'
        f'secret = "{SECRET}"\n'
    )
    code, out, err = await run_cli("deadletter", "-c", str(config))
    listing = subprocess.CompletedProcess([], code, out, err)
    assert listing.returncode == 0, listing.stderr
    assert "crm" in listing.stdout and "1" in listing.stdout
    code, out, err = await run_cli("deadletter", "-c", str(config), "--replay", "crm")
    replay = subprocess.CompletedProcess([], code, out, err)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout)["replayed"] == 1
    assert [json.loads(b)["data"]["id"] for b in receiver.accepted] == [cid]
    assert int(await gw.redis.xlen(key)) == 0


async def test_an_instance_dying_mid_delivery_hands_over_to_another(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    """Two instances share the subscriber; one holds the lease and a pending entry when it
    stops; the other takes the lease, claims it, and delivers everything in order."""
    receiver.default = "fail"
    push = subscriber(receiver, max_attempts=1000)
    a = await start_gateway(api=API, push=push, gateway={"instance": "gw-a"})
    b = await start_gateway(api=API, push=push, gateway={"instance": "gw-b"})
    client = Client(session, f"http://127.0.0.1:{a.http_port}")
    ids = [await submit(client, f"c{i}") for i in range(6)]

    async def held() -> bool:
        # the lane retries the first contact and reads no further until it is through
        pending = await a.redis.xpending(a.keys.contacts, "gateway-push.crm")
        return int(pending["pending"]) == 1 and len(receiver.received) >= 3

    await eventually(held)
    holder, other = (a, b) if "push:crm" in a.leases.held else (b, a)
    assert "push:crm" not in other.leases.held
    await holder.stop()
    receiver.default = "ok"
    more = [await submit(Client(session, f"http://127.0.0.1:{other.http_port}"), "late")]

    async def all_in() -> bool:
        return len(firsts(receiver.accepted)) == 7

    await eventually(all_in, timeout_s=60)
    assert [d["data"]["id"] for d in firsts(receiver.accepted)] == ids + more

    async def acknowledged() -> bool:  # the lane acknowledges after the answers, batched
        pending = await other.redis.xpending(other.keys.contacts, "gateway-push.crm")
        return int(pending["pending"]) == 0

    await eventually(acknowledged)


async def test_many_contacts_and_events_merge_in_order(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    """More entries than one read takes (100 per stream) pile up while the receiver is busy;
    the merged sequence still has every contact before its own events, each kind in order."""
    receiver.plan = ["busy"]
    gw = await start_gateway(api=API, push=subscriber(receiver, events=True, max_backoff="2s"))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    ids = await asyncio.gather(
        *(submit(client, f"c{i}", sender={"address": f"c{i}@example.org"}) for i in range(250))
    )

    async def all_in() -> bool:
        return len(firsts(receiver.accepted)) == 500

    await eventually(all_in, timeout_s=60)
    docs = firsts(receiver.accepted)
    contacts = [d for d in docs if d["type"] == "contact"]
    events = [d for d in docs if d["type"] == "event"]
    assert [d["delivery"] for d in contacts] == await stream_ids(gw, gw.keys.contacts)
    assert [d["delivery"] for d in events] == await stream_ids(gw, gw.keys.events)
    assert sorted(d["data"]["id"] for d in contacts) == sorted(ids)
    seen: set[str] = set()
    for d in docs:
        if d["type"] == "contact":
            seen.add(d["data"]["id"])
        else:
            assert d["data"]["contact_id"] in seen


async def test_redis_restart_api_answers_503_then_everything_resumes(
    start_gateway: Any, session: Any, receiver: Receiver, own_redis: Any
) -> None:
    gw = await start_gateway(api=API, url=own_redis.url, push=subscriber(receiver))
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    first = await submit(client, "before")

    async def delivered(n: int) -> Any:
        async def probe() -> bool:
            return len(firsts(receiver.accepted)) == n

        return probe

    await eventually(await delivered(1))
    own_redis.stop_sync()
    status, problem = await client.call(
        "GET", "/v1/groups/g/contacts", "/v1/groups/{group}/contacts", params={"consumer": "c"}
    )
    assert status == 503 and problem["detail"] == "queue unavailable, retry later"
    own_redis.start_sync()  # same data directory: the append-only file brings everything back

    async def api_back() -> bool:
        status, _ = await client.call(
            "GET", "/v1/groups/g/contacts", "/v1/groups/{group}/contacts", params={"consumer": "c"}
        )
        return status == 200

    await eventually(api_back, timeout_s=30)
    second = await submit(client, "after")
    await eventually(await delivered(2), timeout_s=30)
    assert [d["data"]["id"] for d in firsts(receiver.accepted)] == [first, second]


async def test_two_instances_of_one_name_never_deliver_at_once(
    start_gateway: Any, session: Any, receiver: Receiver
) -> None:
    """The lease is held by one process start, not by an instance name: two gateways that share
    a name (a restart beside a stale one, a copied config) still deliver one at a time."""
    receiver.default = "slow"
    receiver.slow_s = 0.05
    push = subscriber(receiver, timeout="5s")
    a = await start_gateway(api=API, push=push, gateway={"instance": "same"})
    b = await start_gateway(api=API, push=push, gateway={"instance": "same"})
    client = Client(session, f"http://127.0.0.1:{a.http_port}")
    ids = [await submit(client, f"c{i}") for i in range(20)]

    async def all_in() -> bool:
        return len(firsts(receiver.accepted)) == 20

    await eventually(all_in, timeout_s=60)
    assert receiver.most_in_flight == 1
    assert [d["data"]["id"] for d in firsts(receiver.accepted)] == ids
    assert len([gw for gw in (a, b) if "push:crm" in gw.leases.held]) == 1
