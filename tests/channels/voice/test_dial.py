"""Dialled callbacks (回访): a case system's reply on a voice contact makes the gateway call the
citizen through AMI ``Originate``; ``responded``/``delivered`` or ``failed`` come from the real
call outcome (``OriginateResponse``), bounded per number and over the fleet."""

from __future__ import annotations

from typing import Any

import aiohttp

from gateway.channels.voice.adapter import dial_number
from gateway.records import Event
from gateway.testing import eventually
from tests.channels.voice.fakes import FakeAmi
from tests.channels.voice.test_ami import intake_call, voice_with_ami

DIAL = {"channel": "PJSIP/{number}@trunk", "context": "callbacks", "caller_id": "12345 <12345>",
        "per_number": 2, "per_number_window": "1h"}


def test_dial_number_formats() -> None:
    assert dial_number("+8613800138000", "national") == "13800138000"
    assert dial_number("+8613800138000", "e164") == "+8613800138000"
    assert dial_number("+8613800138000", "digits") == "8613800138000"
    assert dial_number("95598", "national") == "95598"
    assert dial_number("", "national") == ""


async def reply(gw: Any, contact_id: str, text: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(
        f"http://127.0.0.1:{gw.http_port}/v1/contacts/{contact_id}/replies", json={"text": text}
    ) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["id"])


async def outcome(gw: Any, reply_id: str, kind: str) -> Event:
    async def probe() -> Event | None:
        for e in await gw.read_events():
            if e.type == kind and e.detail.get("reply_id") == reply_id:
                return e  # type: ignore[no-any-return]
        return None

    return await eventually(probe, 20)  # type: ignore[no-any-return]


async def test_reply_on_a_call_dials_the_citizen_and_stamps_the_real_outcome(
    start_gateway: Any,
) -> None:
    ami = FakeAmi([])
    ami.originate_outcomes = [("Success", "4"), ("Failure", "5")]
    gw = await voice_with_ami(start_gateway, ami, dial=DIAL)
    contact_id = await intake_call(gw)

    first = await reply(gw, contact_id, "回访: 路灯已修好")
    delivered = await outcome(gw, first, "delivered")
    assert delivered.contact_id == contact_id
    assert delivered.detail["reason"] == "answered"
    assert delivered.detail["uniqueid"] == "1795594600.1"
    responded = await outcome(gw, first, "responded")
    assert responded.contact_id == contact_id
    (originate,) = [a for a in ami.actions if a.get("Action") == "Originate"]
    assert originate["Channel"] == "PJSIP/13800138000@trunk"
    assert originate["Context"] == "callbacks" and originate["Exten"] == "s"
    assert originate["Async"] == "true" and originate["ActionID"].startswith("gateway-originate-")
    assert originate["Timeout"] == "30000"
    assert originate["CallerID"] == "12345 <12345>"
    assert f"GATEWAY_CALLBACK_OF={contact_id}" in originate["Variable"]

    second = await reply(gw, contact_id, "再次回访")
    failed = await outcome(gw, second, "failed")
    assert "busy" in str(failed.detail)

    third = await reply(gw, contact_id, "第三次")  # over the per-number bound (2 per hour)
    refused = await outcome(gw, third, "failed")
    assert "at most 2 callbacks" in str(refused.detail)
    assert ami.originated == 2
    # the per-number count is kept under the number's pseudonym: no number in a key name
    names = [k.decode() for k in await gw.redis.keys(f"{gw.keys.tag}:*")]
    assert any(":dial:p" in k for k in names)
    assert [k for k in names if "13800138000" in k] == []


async def test_without_dial_a_reply_on_a_call_fails_permanently(start_gateway: Any) -> None:
    gw = await voice_with_ami(start_gateway, FakeAmi([]))
    contact_id = await intake_call(gw)
    reply_id = await reply(gw, contact_id, "hello")
    failed = await outcome(gw, reply_id, "failed")
    assert "configure dial" in str(failed.detail)


async def test_a_dialled_callback_in_the_queue_is_not_taken_for_a_new_call(
    start_gateway: Any,
) -> None:
    """The answered callback joins a queue from the ``callbacks`` context: no contact of its own."""
    joined = (
        b"Event: QueueCallerJoin\r\nPrivilege: agent,all\r\nTimestamp: 1795594602.000100\r\n"
        b"Channel: PJSIP/trunk-00000009\r\nChannelState: 6\r\nChannelStateDesc: Up\r\n"
        b"CallerIDNum: 13800138000\r\nCallerIDName: <unknown>\r\nConnectedLineNum: <unknown>\r\n"
        b"ConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\nContext: callbacks\r\n"
        b"Exten: s\r\nPriority: 3\r\nUniqueid: 1795594600.1\r\nLinkedid: 1795594600.1\r\n"
        b"Queue: hotline\r\nPosition: 1\r\nCount: 1\r\n\r\n"
    )
    other = joined.replace(b"Context: callbacks", b"Context: from-citizens").replace(
        b"1795594600.1", b"1795594600.2")
    ami = FakeAmi([(joined + other, False)])
    gw = await voice_with_ami(start_gateway, ami, dial=DIAL)

    async def made() -> list[str] | None:
        found = [c.external_id for c in await gw.read_contacts()]
        return found or None

    assert await eventually(made) == ["1795594600.2"]  # only the citizen's own call
