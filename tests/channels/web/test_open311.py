"""Open311 GeoReport v2 as its spec shows the requests, on a real gateway."""

from __future__ import annotations

from typing import Any
from xml.etree import ElementTree

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.channels.web.georeport import Open311Error, Open311Service, parse_request, to_xml
from gateway.queueing.held import STORE_ID
from gateway.records import Event
from tests.harness import answer_before_body

API_KEY = "xyz-311-app-key"

SERVICES = {
    "001": {
        "name": "Cans left out 24x7",
        "description": "Garbage or recycling cans that have been left out for more than 24 hours"
        " after collection.",
        "group": "sanitation",
        "keywords": ["lorem", "ipsum", "dolor"],
    },
    "033": {
        "name": "Pothole",
        "group": "street",
        "attributes": [
            {
                "code": "WHISPAWN",
                "description": "What is the ticket/tag/DL number?",
                "datatype": "string",
                "required": True,
                "order": 1,
            },
            {
                "code": "ROADSIZE",
                "description": "How wide is the road?",
                "datatype": "singlevaluelist",
                "values": {"123": "Small", "124": "Large"},
            },
            {
                "code": "CAUSES",
                "datatype": "multivaluelist",
                "values": {"rain": "Rain", "truck": "Truck"},
            },
        ],
    },
}


async def _gateway(start_gateway: Any, **extra: Any) -> Any:
    table = {
        "type": "open311",
        "services": SERVICES,
        "api_keys": [{"key": API_KEY, "name": "311-app"}],
        "jurisdiction_id": "city.example.gov",
        **extra,
    }
    return await start_gateway(
        adapters={"o311": table}, http={"public_url": "https://hotline.example.gov"}
    )


def _url(gw: Any, path: str) -> str:
    return f"http://127.0.0.1:{gw.http_port}/open311/v2/{path}"


async def _get(gw: Any, path: str) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(_url(gw, path)) as resp:
            return resp.status, resp.content_type, await resp.read()


async def _post(gw: Any, data: Any, fmt: str = "json", **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.post(_url(gw, f"requests.{fmt}"), data=data, **kw) as resp:
            body = await resp.read()
            return resp.status, (
                await resp.json() if fmt == "json" else ElementTree.fromstring(body)
            )


async def test_discovery(start_gateway: Any) -> None:
    gw = await _gateway(
        start_gateway,
        contact="12345 hotline, ops@example.gov",
        key_service="https://example.gov/keys",
    )
    status, ctype, body = await _get(gw, "discovery.json")
    assert (status, ctype) == (200, "application/json")
    import orjson

    doc = orjson.loads(body)
    [endpoint] = doc["endpoints"]
    assert endpoint["url"] == "https://hotline.example.gov/open311/v2"
    assert endpoint["specification"] == "http://wiki.open311.org/GeoReport_v2"
    assert endpoint["formats"] == ["application/json", "text/xml"]
    assert doc["key_service"] == "https://example.gov/keys"
    status, ctype, body = await _get(gw, "discovery.xml")
    root = ElementTree.fromstring(body)
    assert (status, ctype, root.tag) == (200, "text/xml", "discovery")
    assert [f.text for f in root.iter("format")] == ["application/json", "text/xml"]


async def test_service_list_and_definition_json_and_xml(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    import orjson

    status, _, body = await _get(gw, "services.json")
    services = orjson.loads(body)
    assert status == 200
    assert services[0] == {
        "service_code": "001",
        "service_name": "Cans left out 24x7",
        "description": SERVICES["001"]["description"],
        "metadata": False,
        "type": "realtime",
        "keywords": "lorem,ipsum,dolor",
        "group": "sanitation",
    }
    assert services[1]["metadata"] is True
    _, _, body = await _get(gw, "services.xml")
    root = ElementTree.fromstring(body)
    assert root.tag == "services"
    assert [s.findtext("service_code") for s in root.findall("service")] == ["001", "033"]
    _, _, body = await _get(gw, "services/033.json")
    definition = orjson.loads(body)
    assert definition["service_code"] == "033"
    first = definition["attributes"][0]
    assert (first["code"], first["required"], first["variable"], first["order"]) == (
        "WHISPAWN",
        True,
        True,
        1,
    )
    assert definition["attributes"][1]["values"] == [
        {"key": "123", "name": "Small"},
        {"key": "124", "name": "Large"},
    ]
    _, _, body = await _get(gw, "services/033.xml")
    root = ElementTree.fromstring(body)
    assert root.tag == "service_definition"
    assert [v.findtext("key") for v in root.iter("value")] == ["123", "124", "rain", "truck"]
    status, _, body = await _get(gw, "services/999.json")
    assert status == 404
    assert orjson.loads(body) == [{"code": 404, "description": "service_code not found"}]


async def test_post_request_form_encoded_then_get_it(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = {
        "api_key": API_KEY,
        "jurisdiction_id": "city.example.gov",
        "service_code": "033",
        "lat": "37.76524078",
        "long": "-122.4212043",
        "address_string": "1234 5th street",
        "email": "smit222@sfgov.edu",
        "device_id": "tt222111",
        "account_id": "123456",
        "first_name": "john",
        "last_name": "smith",
        "phone": "111111111",
        "description": "A large sinkhole is destroying the street",
        "media_url": "http://farm3.static.flickr.com/2002/2212426634_5ed477a060.jpg",
        "attribute[WHISPAWN]": "123456",
        "attribute[ROADSIZE]": "124",
    }
    status, rows = await _post(gw, form)
    assert status == 201
    [row] = rows
    [contact] = await gw.read_contacts()
    assert row["service_request_id"] == contact.id
    assert row["account_id"] == "123456"
    assert contact.channel == "web"
    assert contact.adapter == "o311"
    assert contact.subject == "Pothole"
    assert contact.text == "A large sinkhole is destroying the street"
    assert contact.language == "en"
    assert contact.sender.address == "smit222@sfgov.edu"
    assert contact.sender.name == "john smith"
    assert contact.meta["location"] == {
        "lat": 37.76524078,
        "lon": -122.4212043,
        "address": "1234 5th street",
    }
    details = contact.meta["open311"]
    assert details["attributes"] == {"WHISPAWN": "123456", "ROADSIZE": "124"}
    assert details["media_url"].endswith(".jpg")
    assert details["client"] == "311-app"
    assert contact.deadline.kind == "response"

    import orjson

    status, _, body = await _get(gw, f"requests/{contact.id}.json")
    [got] = orjson.loads(body)
    assert status == 200
    assert got["service_request_id"] == contact.id
    assert got["status"] == "open"
    assert (got["service_code"], got["service_name"]) == ("033", "Pothole")
    assert (got["lat"], got["long"], got["address"]) == (
        37.76524078,
        -122.4212043,
        "1234 5th street",
    )
    assert got["requested_datetime"].endswith("Z")
    status, _, body = await _get(gw, f"requests/{contact.id}.xml")
    root = ElementTree.fromstring(body)
    assert (root.tag, root.find("request").findtext("status")) == ("service_requests", "open")  # type: ignore[union-attr]
    status, _, body = await _get(gw, f"requests.json?service_request_id={contact.id},nope")
    assert [r["service_request_id"] for r in orjson.loads(body)] == [contact.id]


async def test_closed_status_comes_from_the_contacts_events(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    status, rows = await _post(
        gw, {"api_key": API_KEY, "service_code": "001", "address_string": "Main St 1"}
    )
    assert status == 201
    contact_id = rows[0]["service_request_id"]
    await gw.queue.emit(
        Event(contact_id=contact_id, type="closed", at=gw.clock.now_us(), source="case-system")
    )
    import orjson

    _, _, body = await _get(gw, f"requests/{contact_id}.json")
    [got] = orjson.loads(body)
    assert got["status"] == "closed"


async def test_xml_answer_and_multivalue_attributes(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    data = [
        ("api_key", API_KEY),
        ("service_code", "033"),
        ("lat", "1.5"),
        ("long", "2.5"),
        ("attribute[WHISPAWN]", "x"),
        ("attribute[CAUSES][]", "rain"),
        ("attribute[CAUSES][]", "truck"),
    ]
    status, root = await _post(gw, data, fmt="xml")
    assert status == 201
    [contact] = await gw.read_contacts()
    assert root.find("request").findtext("service_request_id") == contact.id  # type: ignore[union-attr]
    assert contact.meta["open311"]["attributes"]["CAUSES"] == ["rain", "truck"]


async def test_multipart_media_upload(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    for k, v in {
        "api_key": API_KEY,
        "service_code": "001",
        "address_string": "2 Elm",
        "description": "垃圾桶满了",
    }.items():
        form.add_field(k, v)
    jpeg = b"\xff\xd8\xff" + b"j" * 5000
    form.add_field("media", jpeg, filename="cans.jpg", content_type="image/jpeg")
    status, _ = await _post(gw, form)
    assert status == 201
    [contact] = await gw.read_contacts()
    [att] = contact.attachments
    assert (att.name, att.content_type, att.size) == ("cans.jpg", "image/jpeg", len(jpeg))
    assert gw.attachments.read(att.sha256) == jpeg
    assert contact.language == "zh"
    # the uploaded photo is the request's media_url (it was left empty)
    media_url = f"https://hotline.example.gov/v1/attachments/{att.sha256}"
    assert contact.meta["open311"]["media_url"] == media_url
    status, _, body = await _get(gw, f"requests/{contact.id}.json")
    assert status == 200 and orjson.loads(body)[0]["media_url"] == media_url


@pytest.mark.parametrize(
    ("form", "status", "fragment"),
    [
        ({"service_code": "001", "address_string": "x"}, 403, "api_key"),
        ({"api_key": "wrong", "service_code": "001", "address_string": "x"}, 403, "api_key"),
        ({"api_key": API_KEY, "address_string": "x"}, 400, "service_code is required"),
        (
            {"api_key": API_KEY, "service_code": "404", "address_string": "x"},
            404,
            "service_code not found",
        ),
        ({"api_key": API_KEY, "service_code": "001"}, 400, "location is required"),
        (
            {"api_key": API_KEY, "service_code": "001", "lat": "91", "long": "0"},
            400,
            "out of range",
        ),
        ({"api_key": API_KEY, "service_code": "001", "lat": "1"}, 400, "go together"),
        (
            {"api_key": API_KEY, "service_code": "001", "lat": "nan", "long": "1"},
            400,
            "out of range",
        ),
        (
            {"api_key": API_KEY, "service_code": "033", "lat": "1", "long": "1"},
            400,
            "WHISPAWN] is required",
        ),
        (
            {
                "api_key": API_KEY,
                "service_code": "033",
                "lat": "1",
                "long": "1",
                "attribute[WHISPAWN]": "1",
                "attribute[ROADSIZE]": "999",
            },
            400,
            "not a choice",
        ),
        (
            {
                "api_key": API_KEY,
                "service_code": "001",
                "address_string": "x",
                "attribute[NOPE]": "1",
            },
            400,
            "not defined",
        ),
        (
            {
                "api_key": API_KEY,
                "service_code": "001",
                "address_string": "x",
                "jurisdiction_id": "other.gov",
            },
            404,
            "jurisdiction",
        ),
        (
            {"api_key": API_KEY, "service_code": "001", "address_string": "x", "surprise": "1"},
            400,
            "unknown parameter",
        ),
    ],
)
async def test_errors_are_the_specs_error_list(
    start_gateway: Any, form: dict[str, str], status: int, fragment: str
) -> None:
    gw = await _gateway(start_gateway)
    got_status, rows = await _post(gw, form)
    assert got_status == status
    [error] = rows
    assert error["code"] == status
    assert fragment in error["description"]
    assert await gw.read_contacts() == []


async def test_error_in_xml(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    status, root = await _post(gw, {"service_code": "001"}, fmt="xml")
    assert (status, root.tag, root.find("error").findtext("code")) == (403, "errors", "403")  # type: ignore[union-attr]


async def test_oversize_and_malformed_bodies(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    status, _ = await _post(
        gw,
        b"api_key=" + b"x" * 70_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 413
    status, _ = await _post(gw, b"{not json", headers={"Content-Type": "application/json"})
    assert status == 400
    status, _ = await _post(
        gw, b"\xff\xfe", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 400
    assert await gw.read_contacts() == []


async def test_unknown_request_and_other_adapters_contacts_are_404(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{gw.http_port}/v1/intake", json={"text": "via core api"}
        ) as resp:
            other = (await resp.json())["id"]
    for rid in (other, "0190f000-0000-7000-8000-000000000000", "../../etc"):
        status, _, _ = await _get(gw, f"requests/{rid}.json")
        assert status == 404


@pytest.mark.parametrize(
    "path",
    [
        "discovery.json",
        "services.json",
        "services/001.json",
        "requests.json?service_request_id=x",
        "requests/{id}.json",
        "tokens/{id}.json",
    ],
)
async def test_gets_for_another_jurisdiction_are_404(start_gateway: Any, path: str) -> None:
    """Every method takes jurisdiction_id; only POST used to refuse another one."""
    gw = await _gateway(start_gateway)
    status, rows = await _post(gw, {"api_key": API_KEY, "service_code": "001",
                                    "address_string": "x"})
    path = path.replace("{id}", rows[0]["service_request_id"])
    sep = "&" if "?" in path else "?"
    status, _, _ = await _get(gw, f"{path}{sep}jurisdiction_id=city.example.gov")
    assert status == 200
    status, ctype, body = await _get(gw, f"{path}{sep}jurisdiction_id=elsewhere.gov")
    assert (status, ctype) == (404, "application/json")
    assert orjson.loads(body) == [{"code": 404, "description": "jurisdiction_id not found"}]


async def test_tokens_answer_the_request_id_or_the_specs_error_list(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    _, rows = await _post(gw, {"api_key": API_KEY, "service_code": "001", "address_string": "x"})
    rid = rows[0]["service_request_id"]
    status, _, body = await _get(gw, f"tokens/{rid}.json")
    assert status == 200
    assert orjson.loads(body) == [{"service_request_id": rid, "token": rid}]
    status, ctype, body = await _get(gw, "tokens/no-such-token.json")  # was plain text
    assert (status, ctype) == (404, "application/json")
    assert orjson.loads(body) == [{"code": 404, "description": "token not found"}]
    status, ctype, body = await _get(gw, "tokens/no-such-token.xml")
    assert (status, ctype) == (404, "text/xml")
    assert ElementTree.fromstring(body).find("error").findtext("code") == "404"  # type: ignore[union-attr]


async def test_idempotency_key_dedupes_retries(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = {"api_key": API_KEY, "service_code": "001", "address_string": "x"}
    first = await _post(gw, form, headers={"Idempotency-Key": "k-1"})
    again = await _post(gw, form, headers={"Idempotency-Key": "k-1"})
    assert (first[0], again[0]) == (201, 200)
    assert first[1][0]["service_request_id"] == again[1][0]["service_request_id"]
    assert len(await gw.read_contacts()) == 1


def test_to_xml_escapes() -> None:
    xml = to_xml("service_requests", "request", [{"description": "<b>&"}])
    assert ElementTree.fromstring(xml).find("request").findtext("description") == "<b>&"  # type: ignore[union-attr]


_SERVICES = {"033": Open311Service(name="Pothole")}


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(
            st.sampled_from(
                [
                    "service_code",
                    "lat",
                    "long",
                    "address_string",
                    "description",
                    "attribute[X]",
                    "attribute[X][]",
                    "email",
                    "phone",
                ]
            ),
            st.text(max_size=20),
        ),
        st.one_of(st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3)),
        max_size=8,
    )
)
def test_parse_request_fuzz(form: dict[str, Any]) -> None:
    try:
        req = parse_request(form, _SERVICES)
    except Open311Error as exc:
        assert exc.status in (400, 404)
        return
    assert req.service_code == "033"
    assert req.lat is not None or req.address_string or req.address_id


async def test_media_of_a_request_with_a_bad_key_is_never_stored(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    form.add_field("api_key", "not-the-key")
    form.add_field("service_code", "001")
    form.add_field("address_string", "Main St 1")
    form.add_field("media", b"\xff\xd8 a photo", filename="p.jpg", content_type="image/jpeg")
    status, _ = await _post(gw, form)
    assert status == 403
    assert not [p for p in gw.attachments.root.rglob("*") if p.is_file() and p.name != STORE_ID]
    assert await gw.read_contacts() == []


def _stored_files(gw: Any) -> list[Any]:
    return [p for p in gw.attachments.root.rglob("*") if p.is_file() and p.name != STORE_ID]


@pytest.mark.parametrize("key_part", [b"", b"wrong"])
async def test_a_wrong_key_is_refused_before_the_media_is_read(
    start_gateway: Any, key_part: bytes
) -> None:
    gw = await _gateway(start_gateway)
    fields = b""
    if key_part:
        fields = b'--B\r\nContent-Disposition: form-data; name="api_key"\r\n\r\n%b\r\n' % key_part
    first = fields + (
        b'--B\r\nContent-Disposition: form-data; name="media"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + b"j" * 65536
    )
    head = (
        b"POST /open311/v2/requests.json HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=B\r\n"
        b"Content-Length: 20000000\r\n\r\n"
    )
    status, _ = await answer_before_body(gw.http_port, head, first)
    assert status == 403
    assert _stored_files(gw) == [] and await gw.read_contacts() == []


async def test_a_wrong_key_in_the_query_is_refused_before_any_body(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    head = (
        b"POST /open311/v2/requests.json?api_key=wrong HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\n"
    )
    status, _ = await answer_before_body(gw.http_port, head)
    assert status == 403


async def test_a_refused_request_stores_no_media(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    form.add_field("api_key", API_KEY)
    form.add_field("service_code", "nope")  # unknown: 404
    form.add_field("media", b"\xff\xd8" + b"j" * 5000, filename="a.jpg", content_type="image/jpeg")
    status, _ = await _post(gw, form)
    assert status == 404
    assert _stored_files(gw) == []
