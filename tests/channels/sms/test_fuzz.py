"""Hypothesis: every SMS parser takes arbitrary input without raising anything but its own
error type, and hostile requests into the running listeners get a 4xx, never a 5xx."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.channels.sms import common, generic, smsbox, twilio
from gateway.channels.sms.concat import Part, parse_udh

FUZZ = settings(max_examples=200, deadline=None)


@FUZZ
@given(st.text(max_size=400), st.binary(max_size=400), st.sampled_from(["GET", "POST"]),
       st.dictionaries(st.sampled_from(["x-kannel-from", "x-kannel-to", "x-kannel-udh",
                                        "x-kannel-coding", "content-type"]),
                       st.text(max_size=40)))
def test_kannel_parser(query: str, body: bytes, method: str, headers: dict[str, str]) -> None:
    try:
        msg = smsbox.parse_request(method, query, headers, body)
    except common.BadRequest:
        return
    text, used = smsbox.decode_text(msg.data, msg.coding, msg.charset, ("gb18030",))
    assert "\x00" not in text
    text.encode("utf-8")
    assert used


@FUZZ
@given(st.binary(max_size=300), st.integers(-5, 5), st.text(max_size=20),
       st.lists(st.sampled_from(["gb18030", "gbk", "big5", "utf-8", "shift_jis"]), max_size=3))
def test_kannel_decoder(data: bytes, coding: int, charset: str, chain: list[str]) -> None:
    text, _ = smsbox.decode_text(data, coding, charset, tuple(chain))
    text.encode("utf-8")  # always valid UTF-8


def test_a_charset_python_knows_but_cannot_decode_with_falls_back() -> None:
    """Found by the fuzz pass: ``charset=UNDEFINED`` named Python's ``undefined`` codec, which
    raises UnicodeError (not UnicodeDecodeError) for any bytes: the decode raised."""
    for charset in ("UNDEFINED", "base64", "rot13", "hex"):
        assert smsbox.decode_text(b"caf\xe9", 0, charset, ()) == ("café", "iso8859-1")
        assert common.known_charset(charset) is None


@FUZZ
@given(st.binary(max_size=40))
def test_udh_parser(udh: bytes) -> None:
    concat = parse_udh(udh)
    if concat is not None:
        assert 1 <= concat.seq <= concat.total


@FUZZ
@given(st.binary(max_size=600))
def test_twilio_form_parser(body: bytes) -> None:
    try:
        params = twilio.parse_form(body)
        msg = twilio.parse_message(params)
    except common.BadRequest:
        return
    assert msg.sid and msg.sender
    assert twilio.verify("https://x.example/sms", params, "token", "sig") is False


@FUZZ
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=40)), max_size=20))
def test_twilio_message_fields(params: list[tuple[str, str]]) -> None:
    try:
        twilio.parse_message(params)
    except common.BadRequest:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["from", "to", "text", "id", "timestamp", "ref",
                                        "total", "part", "x"]), json_values))
def test_generic_message(data: dict[str, Any]) -> None:
    names = generic.FieldNames(concat_ref="ref", concat_total="total", concat_part="part")
    try:
        msg = generic.parse_message(data, names, "12345")
    except common.BadRequest:
        return
    assert msg.sender and msg.id


@FUZZ
@given(st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain",
                        ""]), st.binary(max_size=400), st.text(max_size=200))
def test_generic_body(content_type: str, body: bytes, query: str) -> None:
    try:
        generic.parse_fields(content_type, body, query)
    except common.BadRequest:
        pass


@FUZZ
@given(st.binary(max_size=200), st.text(max_size=100))
def test_generic_hmac(body: bytes, given_sig: str) -> None:
    assert generic.verify_hmac("secret", body, given_sig) in (True, False)


@FUZZ
@given(st.text(max_size=80))
def test_basic_auth_header(header: str) -> None:
    common.basic_password(header)
    common.retry_after_seconds(header)


def test_part_round_trip() -> None:
    part = Part("g", 1, 2, "id", b"\x00\xff", "2:UTF-16BE", 1, None, "+86", "12345",
                {"ref": 3})
    assert Part.from_json(part.to_json()) == part


# ---------------------------------------------------------------------------- listeners

AUTH = {"Authorization": "Basic " + base64.b64encode(b"kannel:s").decode()}


async def test_hostile_requests_never_crash_the_listeners(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={
        "kannel": {"type": "kannel", "secret": "s", "path": "/k"},
        "twilio": {"type": "twilio", "account_sid": "AC1", "auth_token": "t", "path": "/t",
                   "verify_signature": False, "public_url": "https://x.example"},
        "agg": {"type": "sms-webhook", "auth": "none", "path": "/g"},
    })
    loop = asyncio.get_running_loop()
    base = f"http://127.0.0.1:{gw.http_port}"
    statuses: list[int] = []

    async def hit(method: str, path: str, query: bytes, body: bytes, ctype: str) -> int:
        url = base + path + "?" + query.decode("latin-1").replace("#", "%23").replace(" ", "+")
        async with aiohttp.ClientSession() as http, http.request(
            method, aiohttp.client.URL(url, encoded=True), data=body,
            headers={**AUTH, "Content-Type": ctype},
        ) as resp:
            await resp.read()
            return resp.status

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["GET", "POST"]), st.sampled_from(["/k", "/t", "/g", "/k/dlr",
                                                              "/t/status", "/g/status"]),
           st.binary(max_size=200).map(lambda b: bytes(c for c in b if 0x21 <= c < 0x7f)),
           st.binary(max_size=300),
           st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                            "text/plain; charset=UTF-16BE", "application/octet-stream"]))
    def explore(method: str, path: str, query: bytes, body: bytes, ctype: str) -> None:
        if path.startswith("/t") and method == "GET":
            method = "POST"
        status = asyncio.run_coroutine_threadsafe(hit(method, path, query, body, ctype),
                                                  loop).result(30)
        statuses.append(status)
        assert status < 500, status

    await asyncio.to_thread(explore)
    assert statuses
