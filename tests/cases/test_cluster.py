"""The case-systems side on a Redis Cluster of three masters: the same code, one hash slot."""

from __future__ import annotations

import json
from typing import Any

from gateway.testing import eventually
from tests.cases.conftest import API, Client, Receiver, submit
from tests.queueing.test_topologies import cluster  # noqa: F401 - the three-master fixture


async def test_api_push_watcher_and_index_on_a_cluster(
    cluster: list[int],  # noqa: F811
    start_gateway: Any,
    session: Any,
    receiver: Receiver,
) -> None:
    receiver.plan = ["fail"]  # one retry on the way
    gw = await start_gateway(
        url=f"redis://127.0.0.1:{cluster[0]}",
        redis={"cluster": True},
        api=API,
        # the warning 1.5 s before the breach: a pause of the machine across a narrower
        # window left it out (the watcher skips a warning already past its deadline)
        sla={"sms_response": "2s", "warning_fraction": 0.25},
        push={
            "subscribers": [
                {
                    "name": "crm",
                    "url": f"http://127.0.0.1:{receiver.port}/hook",
                    "secret": "s",
                    "events": True,
                    "backoff": "20ms",
                }
            ]
        },
    )
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    ids = [await submit(client, f"c{i}", channel="sms") for i in range(3)]
    status, page = await client.call(
        "GET",
        "/v1/groups/cases/contacts",
        "/v1/groups/{group}/contacts",
        params={"consumer": "w", "count": "10"},
    )
    assert status == 200 and [e["contact"]["id"] for e in page["entries"]] == ids
    status, acked = await client.call(
        "POST",
        "/v1/groups/cases/contacts/ack",
        "/v1/groups/{group}/contacts/ack",
        json_body={"ids": [e["entry_id"] for e in page["entries"]]},
    )
    assert acked == {"acked": 3}

    async def breached_all() -> bool:
        return sum(e.type == "breached" for e in await gw.read_events()) == 3

    await eventually(breached_all)

    async def indexed() -> Any:
        _, body = await client.call("GET", f"/v1/contacts/{ids[0]}", "/v1/contacts/{contact_id}")
        types = [e["type"] for e in body["events"]]
        return types if types == ["enqueued", "warning", "breached"] else None

    await eventually(indexed)

    async def pushed() -> bool:
        docs = [json.loads(b) for b in receiver.accepted]
        return (
            sum(d["type"] == "contact" for d in docs) == 3
            and sum(d["type"] == "event" and d["data"]["type"] == "breached" for d in docs) == 3
        )

    await eventually(pushed)
    docs = [json.loads(b) for b in receiver.accepted]
    assert [d["data"]["id"] for d in docs if d["type"] == "contact"] == ids
