"""App intake: per-app keys, location, confidential flag, multipart attachments."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.channels.web.app import form_to_body, parse_location
from gateway.queueing.held import STORE_ID
from gateway.server.intake_api import BadRequest

IOS_KEY = "ios-key-0123456789"
WEB_KEY = "web-key-9876543210"


async def _gateway(start_gateway: Any, **extra: Any) -> Any:
    table = {
        "type": "app",
        "apps": {
            "citizen-ios": {"key": IOS_KEY, "name": "12345 iOS"},
            "citizen-web": {"key": WEB_KEY},
        },
        "recipient": "12345",
        **extra,
    }
    return await start_gateway(adapters={"apps": table}, intake={"max_attachment": 100_000})


async def _post(
    gw: Any, app: str, key: str | None, headers_extra: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    headers.update(headers_extra or {})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"http://127.0.0.1:{gw.http_port}/v1/apps/{app}/contacts", headers=headers, **kw
        ) as resp:
            return resp.status, await resp.json(content_type=None)


async def test_json_contact_with_location_and_confidential(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    body = {
        "text": "楼下餐馆油烟扰民，希望保密处理",
        "sender": {"address": "+8613800138000", "name": "张三"},
        "external_id": "ios-0001",
        "confidential": True,
        "location": {
            "lat": 31.2304,
            "lon": 121.4737,
            "accuracy_m": 12,
            "address": "上海市黄浦区人民大道200号",
        },
        "meta": {"app_version": "3.2.1"},
    }
    status, answer = await _post(gw, "citizen-ios", IOS_KEY, json=body)
    assert status == 202
    [contact] = await gw.read_contacts()
    assert answer["id"] == contact.id
    assert answer["deadline"]["kind"] == "response"
    assert contact.channel == "web"
    assert contact.adapter == "apps"
    assert contact.confidential is True
    assert contact.external_id == "citizen-ios:ios-0001"
    assert contact.recipient == "12345"
    assert contact.language == "zh"
    assert contact.sender.name == "张三"
    assert contact.meta == {
        "app_version": "3.2.1",
        "app": "citizen-ios",
        "location": {
            "lat": 31.2304,
            "lon": 121.4737,
            "accuracy_m": 12.0,
            "address": "上海市黄浦区人民大道200号",
        },
    }
    status, again = await _post(gw, "citizen-ios", IOS_KEY, json=body)
    assert (status, again["id"], again["status"]) == (202, contact.id, "duplicate")


@pytest.mark.parametrize(
    ("app", "key"),
    [
        ("citizen-ios", None),
        ("citizen-ios", "wrong"),
        ("citizen-ios", WEB_KEY),
        ("nope", IOS_KEY),
        ("citizen-web", ""),
    ],
)
async def test_each_app_needs_its_own_key(start_gateway: Any, app: str, key: str | None) -> None:
    gw = await _gateway(start_gateway)
    status, _ = await _post(gw, app, key, json={"text": "x"})
    assert status == 403
    assert await gw.read_contacts() == []


async def test_multipart_with_json_part_and_files(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    form.add_field(
        "contact",
        json.dumps({"text": "photo of the pothole", "location": {"lat": 1.0, "lon": 2.0}}),
        content_type="application/json",
    )
    photo = b"\x89PNG\r\n" + b"p" * 4000
    audio = b"RIFF" + b"a" * 3000
    form.add_field("photo", photo, filename="pothole.png", content_type="image/png")
    form.add_field("voice", audio, filename="note.wav", content_type="audio/wav")
    status, answer = await _post(gw, "citizen-web", WEB_KEY, data=form)
    assert status == 202
    [contact] = await gw.read_contacts()
    assert [(a.name, a.content_type, a.size) for a in contact.attachments] == [
        ("pothole.png", "image/png", len(photo)),
        ("note.wav", "audio/wav", len(audio)),
    ]
    assert gw.attachments.read(contact.attachments[0].sha256) == photo
    assert [a["sha256"] for a in answer["attachments"]] == [a.sha256 for a in contact.attachments]
    assert contact.meta["location"] == {"lat": 1.0, "lon": 2.0}


async def test_multipart_plain_fields(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    for k, v in {
        "text": "Broken bench",
        "confidential": "true",
        "lat": "48.85",
        "lon": "2.35",
        "sender": "a@example.org",
    }.items():
        form.add_field(k, v)
    form.add_field("file", b"data", filename="a.txt", content_type="text/plain")
    status, _ = await _post(gw, "citizen-web", WEB_KEY, data=form)
    assert status == 202
    [contact] = await gw.read_contacts()
    assert (contact.confidential, contact.sender.address, contact.meta["location"]) == (
        True,
        "a@example.org",
        {"lat": 48.85, "lon": 2.35},
    )
    assert contact.external_id == ""


async def test_oversize_file_is_413(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    form.add_field("text", "big")
    form.add_field("file", b"x" * 150_000, filename="big.bin")
    status, _ = await _post(gw, "citizen-web", WEB_KEY, data=form)
    assert status == 413
    assert await gw.read_contacts() == []


@pytest.mark.parametrize(
    "body",
    [
        {"text": "x", "location": {"lat": 91, "lon": 0}},
        {"text": "x", "location": {"lat": 1}},
        {"text": "x", "location": "here"},
        {"text": "x", "location": {"lat": "nan", "lon": 1}},
        {"text": "x", "confidential": "yes"},
        {"text": "x", "channel": "voice"},
        {"text": "x", "unknown": 1},
        {},
        [],
    ],
)
async def test_bad_bodies_are_400(start_gateway: Any, body: Any) -> None:
    gw = await _gateway(start_gateway)
    status, answer = await _post(gw, "citizen-web", WEB_KEY, json=body)
    assert status == 400
    assert answer["status"] == 400
    assert await gw.read_contacts() == []


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["lat", "lon", "accuracy_m", "address", "x"]),
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
        max_size=5,
    )
)
def test_parse_location_fuzz(value: dict[str, Any]) -> None:
    try:
        loc = parse_location(value)
    except BadRequest:
        return
    assert loc
    assert ("lat" in loc) == ("lon" in loc)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["text", "confidential", "lat", "lon", "sender", "sender_name", "zzz"]),
        st.text(max_size=10),
        max_size=6,
    )
)
def test_form_to_body_fuzz(fields: dict[str, str]) -> None:
    try:
        body = form_to_body(fields)
    except BadRequest:
        return
    assert isinstance(body, dict)


async def test_a_body_arriving_in_pieces_is_read_whole(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    body = json.dumps({"text": "路灯" * 5000, "external_id": "slow-1"}).encode()

    async def trickle() -> Any:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]
            await asyncio.sleep(0.001)

    status, answer = await _post(
        gw,
        "citizen-web",
        WEB_KEY,
        data=trickle(),
        headers_extra={"Content-Type": "application/json"},
    )
    assert status == 202, answer
    [contact] = await gw.read_contacts()
    assert len(contact.text) == 10000


async def test_an_app_reads_the_status_of_its_own_contacts_only(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    status, answer = await _post(gw, "citizen-ios", IOS_KEY, json={"text": "积水"})
    assert status == 202
    url = f"http://127.0.0.1:{gw.http_port}/v1/apps/citizen-ios/contacts/{answer['id']}"
    other = f"http://127.0.0.1:{gw.http_port}/v1/apps/citizen-web/contacts/{answer['id']}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Authorization": f"Bearer {IOS_KEY}"}) as resp:
            got = await resp.json()
            assert resp.status == 200
        async with http.get(url, headers={"Authorization": f"Bearer {WEB_KEY}"}) as resp:
            assert resp.status == 403
        async with http.get(other, headers={"Authorization": f"Bearer {WEB_KEY}"}) as resp:
            assert resp.status == 404
        async with http.get(
            url.rsplit("/", 1)[0] + "/not-an-id", headers={"Authorization": f"Bearer {IOS_KEY}"}
        ) as resp:
            assert resp.status == 404
    assert got["id"] == answer["id"]
    assert got["status"] == "open"
    assert got["deadline"] == answer["deadline"]


@pytest.mark.parametrize(
    "filename",
    [b"photo\xed\xa0\x80.png", b"\xff\xfe.png", b"\xc3.png"],
)
async def test_a_file_name_that_is_not_utf8_is_repaired_never_500(
    start_gateway: Any, filename: bytes
) -> None:
    gw = await _gateway(start_gateway)
    disposition = b'form-data; name="photo"; filename="' + filename + b'"'
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nbroken bench\r\n"
        b"--XyZ\r\nContent-Disposition: " + disposition + b"\r\n"
        b"Content-Type: image/png\r\n\r\nPNGDATA\r\n--XyZ--\r\n"
    )
    status, answer = await _post(
        gw,
        "citizen-web",
        WEB_KEY,
        headers_extra={"Content-Type": "multipart/form-data; boundary=XyZ"},
        data=body,
    )
    assert status == 202, answer
    [contact] = await gw.read_contacts()
    [attachment] = contact.attachments
    attachment.name.encode("utf-8")  # valid text whatever arrived
    assert gw.attachments.read(attachment.sha256) == b"PNGDATA"


async def test_a_malformed_part_header_is_400_never_500(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    body = (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nbench\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"p\"; filename=\"a\x00b.png\"\r\n\r\n"
        b"PNG\r\n--XyZ--\r\n"
    )
    status, answer = await _post(
        gw, "citizen-web", WEB_KEY,
        headers_extra={"Content-Type": "multipart/form-data; boundary=XyZ"}, data=body,
    )
    assert status == 400 and answer["status"] == 400
    assert await gw.read_contacts() == []


async def test_a_refused_upload_leaves_no_file_behind(start_gateway: Any) -> None:
    gw = await _gateway(start_gateway)
    form = aiohttp.FormData()
    form.add_field("contact", json.dumps({"text": "x", "channel": "sms"}),
                   content_type="application/json")
    form.add_field("photo", b"\x89PNG" + b"p" * 50_000, filename="a.png", content_type="image/png")
    status, answer = await _post(gw, "citizen-web", WEB_KEY, data=form)
    assert status == 400, answer
    assert [p for p in gw.attachments.root.rglob("*") if p.is_file() and p.name != STORE_ID] == []
