"""Hostile input to the consumer API, over real HTTP: a client error, never a server error."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cases.conftest import Client, submit

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "ids": st.lists(st.text(max_size=25), max_size=4) | JSON,
        "consumer": st.text(max_size=70) | JSON,
        "min_idle_ms": st.integers() | JSON,
        "count": st.integers() | JSON,
        "cursor": st.text(max_size=25) | JSON,
        "text": st.text(max_size=50) | JSON,
        "attachments": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.text(max_size=20) | JSON,
                    "content_type": st.text(max_size=20) | JSON,
                    "data": st.text(max_size=20) | JSON,
                    "sha256": st.text(alphabet="0123456789abcdefz", max_size=64) | JSON,
                },
            ),
            max_size=3,
        )
        | JSON,
        "type": st.sampled_from(["answered", "responded", "closed", "breached", ""]) | JSON,
        "at": st.text(max_size=30) | JSON,
        "detail": JSON,
    },
)
TARGETS = [
    ("/v1/groups/fz/contacts/ack", "/v1/groups/{group}/contacts/ack", "reader"),
    ("/v1/groups/fz/events/reclaim", "/v1/groups/{group}/events/reclaim", "reader"),
    ("/v1/contacts/{cid}/replies", "/v1/contacts/{contact_id}/replies", "replier"),
    ("/v1/contacts/{cid}/events", "/v1/contacts/{contact_id}/events", "replier"),
]
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(body=FIELDS | JSON, target=st.sampled_from(TARGETS))
async def test_json_bodies(client: Client, body: Any, target: tuple[str, str, str]) -> None:
    cid = await submit(client, "fuzz")
    path, template, token = target
    await client.call("GET", "/v1/groups/fz/events", params={"consumer": "x"})
    status, answer = await client.call(
        "POST", path.format(cid=cid), template, token=token, json_body=body
    )
    assert status in (200, 201, 202, 400, 404, 413), answer


@FUZZ
@given(raw=st.binary(max_size=300), target=st.sampled_from(TARGETS))
async def test_raw_bytes(client: Client, raw: bytes, target: tuple[str, str, str]) -> None:
    path, template, token = target
    status, answer = await client.call(
        "POST", path.format(cid="0190-x"), template, token=token, data=raw
    )
    assert status in (200, 400, 404, 413), answer


@FUZZ
@given(
    group=st.text(max_size=70),
    query=st.dictionaries(
        st.sampled_from(["consumer", "count", "wait_ms", "start", "pending"]),
        st.text(max_size=12),
    ),
)
async def test_query_strings(client: Client, group: str, query: dict[str, str]) -> None:
    from urllib.parse import quote

    query = {k: v for k, v in query.items() if k != "wait_ms" or not v.isdigit()}
    status, answer = await client.call(
        "GET", f"/v1/groups/{quote(group, safe='')}/contacts", params=query
    )
    assert status in (200, 400, 404, 405), answer
