"""The OpenAPI 3.1 document: well-formed, complete against the router, true to the answers.

Validation uses jsonschema only: every schema in the document is checked against the JSON
Schema 2020-12 meta-schema (the OAS 3.1 default dialect), every ``$ref`` resolves, path
parameters match their templates, and every operation is called for real, its answer
validated against its documented schema (see ``Client.call``).
"""

from __future__ import annotations

import base64
import json
import re
from importlib.resources import files
from typing import Any

import jsonschema
import pytest

from tests.cases.conftest import API, OPENAPI, Client, submit

METHODS = {"get", "post", "put", "patch", "delete"}
NOT_API = ("/healthz", "/readyz", "/metrics", "/dashboard", "/sms/", "/chat/", "/open311/")
"""Routes that are no part of the case systems' API: health and metrics, the dashboard, and
the adapters' webhooks, which speak their peers' protocols (Kannel, Telegram, Open311...)."""


def walk(node: Any, path: str = "#") -> list[tuple[str, Any]]:
    found = [(path, node)]
    if isinstance(node, dict):
        for k, v in node.items():
            found += walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += walk(v, f"{path}/{i}")
    return found


def resolve(ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = OPENAPI
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_document_shape() -> None:
    assert OPENAPI["openapi"].startswith("3.1.")
    assert OPENAPI["info"]["title"] and OPENAPI["info"]["version"]
    assert OPENAPI["jsonSchemaDialect"] == "https://json-schema.org/draft/2020-12/schema"
    operation_ids = []
    for template, item in OPENAPI["paths"].items():
        assert template.startswith("/v1/")
        variables = set(re.findall(r"{(\w+)}", template))
        for method, op in item.items():
            assert method in METHODS, (template, method)
            operation_ids.append(op["operationId"])
            assert op["responses"], op["operationId"]
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == variables, (template, method)
            for status in op["responses"]:
                assert re.fullmatch(r"[1-5]\d\d", status), status
            if op.get("security") != []:
                (requirement,) = op["security"]
                if set(requirement) == {"appKey"}:
                    assert template.startswith("/v1/apps/")
                else:
                    assert set(requirement) == {"bearer"}
                    assert requirement["bearer"][0] in ("intake", "read", "reply", "admin")
    assert len(operation_ids) == len(set(operation_ids))


def test_every_ref_resolves_and_every_schema_is_2020_12() -> None:
    refs = [v for p, v in walk(OPENAPI) if p.endswith("/$ref")]
    assert refs
    for ref in refs:
        resolve(ref)
    for name, schema in OPENAPI["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name
    for path, node in walk(OPENAPI["paths"]):
        if path.endswith("/schema"):
            jsonschema.Draft202012Validator.check_schema(node)


def test_a_broken_schema_is_caught() -> None:
    """The meta-schema check above can fail: a wrong type keyword is refused."""
    with pytest.raises(jsonschema.SchemaError):
        jsonschema.Draft202012Validator.check_schema({"type": "strnig"})


async def test_router_and_document_agree(start_gateway: Any, client: Client) -> None:
    """Every route the gateway serves under /v1/ (core, consumer API, an app adapter's) has its
    entry in the document, and every entry is served; the rest are known non-API routes."""
    gw = await start_gateway(
        api=API,
        adapters={"apps": {"type": "app", "apps": {"a1": {"key": "app-key-0123456789"}}}},
    )
    served = set()
    for resource in gw.app.router.resources():
        canonical = resource.canonical
        if canonical.startswith(NOT_API):
            continue
        for route in resource:
            if route.method.lower() in METHODS:
                served.add((canonical, route.method.lower()))
    documented = {
        (template, method) for template, item in OPENAPI["paths"].items() for method in item
    }
    assert served == documented
    status, body = await client.call("GET", "/v1/openapi.json", "/v1/openapi.json", token=None)
    assert status == 200 and body == OPENAPI


def test_records_are_the_shipped_json_schemas() -> None:
    """Contact and Event are the schemas in gateway/schemas/, not a hand copy."""
    from gateway.cases.api.openapi import shipped_schema

    for name, file in (("Contact", "contact.schema.json"), ("Event", "event.schema.json")):
        shipped = json.loads(files("gateway").joinpath("schemas", file).read_text())
        embedded = OPENAPI["components"]["schemas"][name]
        assert embedded == shipped_schema(name)
        assert embedded["required"] == shipped["required"]
        assert embedded["properties"].keys() == shipped["properties"].keys()
        assert embedded.get("additionalProperties") == shipped.get("additionalProperties")
    raw = json.loads(files("gateway.cases.api").joinpath("openapi.json").read_text())
    assert not {"Contact", "Event"} & set(raw["components"]["schemas"])


async def test_every_operation_answers_as_documented(
    start_gateway: Any, session: Any, receiver: Any
) -> None:
    receiver.default = "fail"
    gw = await start_gateway(
        api=API,
        adapters={"apps": {"type": "app", "apps": {"a1": {"key": "app-key-0123456789"}}}},
        push={
            "subscribers": [
                {
                    "name": "crm",
                    "url": f"http://127.0.0.1:{receiver.port}/hook",
                    "secret": "s",
                    "max_attempts": 1,
                }
            ]
        },
    )
    client = Client(session, f"http://127.0.0.1:{gw.http_port}")
    cid = await submit(client, "walk")
    client.calls.append(("/v1/intake", "post", 202))  # submit() checked it against the document
    app = {"X-API-Key": "app-key-0123456789"}
    status, accepted = await client.call(
        "POST", "/v1/apps/a1/contacts", "/v1/apps/{app}/contacts", token=None, headers=app,
        json_body={"text": "from the app", "sender": {"address": "u-1"}},
    )
    assert status == 202, accepted
    status, _ = await client.call(
        "GET", f"/v1/apps/a1/contacts/{accepted['id']}", "/v1/apps/{app}/contacts/{id}",
        token=None, headers=app,
    )
    assert status == 200
    stored = await gw.attachments.put(b"%PDF-1.7", "a.pdf", "application/pdf")
    status, _ = await client.call(
        "GET", stored.ref, "/v1/attachments/{sha256}", token="reader"
    )
    assert status == 200
    for stream in ("contacts", "events"):
        base = f"/v1/groups/walk/{stream}"
        template = "/v1/groups/{group}/" + stream
        status, body = await client.call("GET", base, template, params={"consumer": "w"})
        assert status == 200 and body["entries"]
        ids = [e["entry_id"] for e in body["entries"]]
        status, _ = await client.call(
            "POST", base + "/reclaim", template + "/reclaim", json_body={"consumer": "v"}
        )
        assert status == 200
        status, _ = await client.call(
            "POST", base + "/ack", template + "/ack", json_body={"ids": ids}
        )
        assert status == 200
    status, _ = await client.call("GET", f"/v1/contacts/{cid}", "/v1/contacts/{contact_id}")
    assert status == 200
    status, _ = await client.call(
        "POST",
        f"/v1/contacts/{cid}/replies",
        "/v1/contacts/{contact_id}/replies",
        token="replier",
        json_body={"text": "ok", "attachments": [{"data": base64.b64encode(b"x").decode()}]},
    )
    assert status == 202
    status, _ = await client.call(
        "POST",
        f"/v1/contacts/{cid}/events",
        "/v1/contacts/{contact_id}/events",
        token="replier",
        json_body={"type": "answered"},
    )
    assert status == 201
    status, report = await client.call(
        "GET", "/v1/report", "/v1/report", params={"charts": "1", "by": "hour"}
    )
    assert status == 200 and report["charts"]
    status, _ = await client.call(
        "GET", "/v1/admin/deadletter", "/v1/admin/deadletter", token="admin"
    )
    assert status == 200
    status, _ = await client.call(
        "GET", "/v1/admin/deadletter/crm", "/v1/admin/deadletter/{subscriber}", token="admin"
    )
    assert status == 200
    status, _ = await client.call(
        "POST",
        "/v1/admin/deadletter/crm/replay",
        "/v1/admin/deadletter/{subscriber}/replay",
        token="admin",
        json_body={},
    )
    assert status == 200
    status, _ = await client.call(
        "GET", "/v1/admin/deadletter/nobody", "/v1/admin/deadletter/{subscriber}", token="admin"
    )
    assert status == 404
    status, _ = await client.call("GET", "/v1/openapi.json", "/v1/openapi.json", token=None)
    assert status == 200
    exercised = {(template, method) for template, method, _ in client.calls}
    documented = {
        (template, method) for template, item in OPENAPI["paths"].items() for method in item
    }
    assert exercised == documented
