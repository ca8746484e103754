"""CMPP 2.0 and 3.0 against a local ISMG built from the specification
(tests/channels/sms/ismg.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.channels.sms import cmpp_pdu as C
from gateway.records import Reply
from gateway.testing import break_spool, eventually
from tests.channels.sms.ismg import Ismg

PHONE = "13800138000"


@pytest.fixture(params=[C.V20, C.V30], ids=["2.0", "3.0"])
async def ismg(request: pytest.FixtureRequest) -> AsyncIterator[Ismg]:
    server = await Ismg(request.param).start()
    yield server
    await server.close()


def config(ismg: Ismg, **extra: Any) -> dict[str, Any]:
    return {"type": "cmpp", "host": "127.0.0.1", "port": ismg.port, "source_addr": "901234",
            "shared_secret": "s3cret", "version": "3.0" if ismg.version == C.V30 else "2.0",
            "src_id": "106512345", "service_id": "HOTLINE", **extra}


async def connected(gw: Any) -> Any:
    adapter = gw.adapters["cmpp"]
    await asyncio.wait_for(adapter.bound.wait(), 20)
    return adapter


def mo(content: bytes, fmt: int, msg_id: int = 0x5A5A0001, **extra: Any) -> dict[str, Any]:
    return {"msg_id": msg_id, "dest_id": "106512345", "src_terminal_id": PHONE,
            "msg_content": content, "msg_fmt": fmt, **extra}


async def test_connect_and_mo_in_ucs2_gbk_and_ascii(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    await connected(gw)
    ((source, version, stamp),) = ismg.connects  # the ISMG checked the MD5 authenticator
    assert (source, version, len(stamp)) == ("901234", ismg.version, 10)
    assert await ismg.deliver(**mo("路灯坏了🙂".encode("utf-16-be"), 8, 1)) == (1, 0)
    assert await ismg.deliver(**mo("噪音扰民".encode("gbk"), 15, 2)) == (2, 0)
    assert await ismg.deliver(**mo(b"HELP", 0, 3)) == (3, 0)
    contacts = await gw.read_contacts()  # durable before the answer
    assert [c.text for c in contacts] == ["路灯坏了🙂", "噪音扰民", "HELP"]
    assert {c.sender.address for c in contacts} == {"+86" + PHONE}
    assert contacts[0].recipient == "106512345"


async def test_wrong_secret_is_refused_and_retried(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg, shared_secret="wrong")})
    await eventually(lambda: ismg.refused >= 2)
    assert ismg.refused >= 2 and not ismg.connects  # refused, connected again with back-off
    assert not gw.adapters["cmpp"].bound.is_set()


async def test_long_mo_by_tp_udhi_out_of_order(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    await connected(gw)
    raw = "第一段，第二段🙂结束".encode("utf-16-be")
    chunks = [raw[:10], raw[10:16], raw[16:]]  # the surrogate pair is cut between parts 2 and 3
    for n in (2, 3, 1):
        udh = bytes([5, 0, 3, 9, 3, n])
        assert (await ismg.deliver(**mo(udh + chunks[n - 1], 8, 100 + n, tp_udhi=1)))[1] == 0
    contacts = await eventually(gw.read_contacts)
    assert [c.text for c in contacts] == ["第一段，第二段🙂结束"]
    # one part of another long message held, a single one taken: no key names the number
    udh = bytes([5, 0, 3, 10, 2, 1])
    assert (await ismg.deliver(**mo(udh + raw[:10], 8, 200, tp_udhi=1)))[1] == 0
    assert (await ismg.deliver(**mo(b"single", 0, 201)))[1] == 0
    tag = gw.keys.tag.encode()  # (the test's prefix holds "[": no MATCH pattern)
    names = [n async for n in gw.redis.scan_iter(count=1000) if n.startswith(tag)]
    assert [n for n in names if b":dedupe:" in n]  # CMPP's id is cmpp:<msg_id>:<number>
    assert [n for n in names if PHONE[-8:].encode() in n] == []


async def test_reply_and_status_reports(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    adapter = await connected(gw)
    await ismg.deliver(**mo("你好".encode("utf-16-be"), 8))
    (contact,) = await gw.read_contacts()
    long = "您的诉求已受理，编号一二三四。" * 6  # 90 characters: two UCS-2 parts of 134 octets
    receipt = await adapter.send(contact, Reply(contact.id, long, id="r-1"))
    first, second = ismg.submits
    assert first.dest_terminal_ids == (PHONE,) and first.src_id == "106512345"
    assert (first.pk_total, first.pk_number, second.pk_number) == (2, 1, 2)
    assert first.tp_udhi == 1 and first.msg_fmt == 8 and first.registered_delivery == 1
    assert first.msg_src == "901234" and first.service_id == "HOTLINE"
    joined = (first.msg_content[6:] + second.msg_content[6:]).decode("utf-16-be")
    assert joined == long
    msg_id = int(receipt.detail["message_ids"][0])
    report = C.Report(msg_id, "DELIVRD", "2612010000", "2612010001", PHONE, 1)
    for _ in range(2):  # the ISMG repeats it: one event
        answer = await ismg.deliver(**mo(report.encode(ismg.version), 0, 77,
                                         registered_delivery=1))
        assert answer == (77, 0)
    short = await adapter.send(contact, Reply(contact.id, "OK", id="r-2"))
    assert ismg.submits[-1].msg_fmt == 0 and ismg.submits[-1].msg_content == b"OK"
    failed = C.Report(int(short.detail["message_ids"][0]), "UNDELIV", "2612010000",
                      "2612010001", PHONE, 2)
    assert (await ismg.deliver(**mo(failed.encode(ismg.version), 0, 78,
                                    registered_delivery=1)))[1] == 0
    events = [(e.type, e.detail.get("reply_id")) for e in await gw.read_events()
              if e.type in ("responded", "delivered", "failed")]
    assert events == [("responded", "r-1"), ("delivered", "r-1"), ("failed", "r-2")]
    assert await gw.read_contacts() == [contact]


async def test_nothing_stored_answers_non_zero_and_the_redelivery_is_taken_once(
    ismg: Ismg, start_gateway: Any, own_redis: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "cmpp-down"
    gw = await start_gateway(adapters={"cmpp": config(ismg)}, url=own_redis.url,
                             data_dir=data_dir, fleet={"lease_ttl": "300s"})
    await connected(gw)
    own_redis.stop_sync()
    break_spool(data_dir)
    pdu = mo("停水了".encode("utf-16-be"), 8, 555)
    assert await ismg.deliver(**pdu) == (555, C.DELIVER_FLOW_CONTROL)
    own_redis.start_sync()
    async def taken() -> bool:  # the ISMG's redeliveries, until Intake takes it
        return (await ismg.deliver(**pdu))[1] == 0

    assert await eventually(taken, step_s=0.2)
    assert await ismg.deliver(**pdu) == (555, 0)
    assert [c.text for c in await gw.read_contacts()] == ["停水了"]


async def test_link_lost_reconnects_and_a_malformed_deliver_keeps_it(
    ismg: Ismg, start_gateway: Any
) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    adapter = await connected(gw)
    ismg.drop()
    await eventually(lambda: adapter.binds == 2 and ismg.connected.is_set())
    assert adapter.binds == 2 and len(ismg.connects) == 2
    assert await ismg.deliver(**mo(b"again", 0, 9)) == (9, 0)


async def test_active_test_malformed_deliver_and_terminate(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    adapter = await connected(gw)
    assert await ismg.raw(C.ACTIVE_TEST) == (C.ACTIVE_TEST | C.RESP, b"\0")
    # a CMPP_DELIVER whose body ends inside Src_terminal_Id: Result 1, the link stays
    cut = C.Deliver(**mo(b"x", 0, 4242)).encode(ismg.version)[:50]
    command_id, body = await ismg.raw(C.DELIVER, cut)
    assert command_id == C.DELIVER | C.RESP
    assert C.parse_msg_id_resp(body, ismg.version) == (4242, 1)
    assert await ismg.deliver(**mo(b"still here", 0, 4243)) == (4243, 0)
    assert adapter.binds == 1
    assert await ismg.raw(C.TERMINATE) == (C.TERMINATE | C.RESP, b"")
    await eventually(lambda: adapter.binds == 2 and ismg.connected.is_set())
    assert adapter.binds == 2
    assert [c.text for c in await gw.read_contacts()] == ["still here"]


async def test_a_deliver_that_can_never_be_taken_is_refused_for_good_and_a_limited_one_for_now(
    ismg: Ismg, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # found by tools/fuzz_campaign.py: an empty Src_terminal_Id raised inside the take and was
    # answered Result 8 (flow control) with a logged traceback: the ISMG redelivered it for ever
    gw = await start_gateway(adapters={"cmpp": config(ismg)}, limits={"sender_contacts": 1})
    await connected(gw)
    assert await ismg.deliver(**mo(b"no sender", 0, 11, src_terminal_id="")) == (
        11, C.DELIVER_STRUCTURE)
    assert await ismg.deliver(**mo(b"first", 0, 12)) == (12, 0)
    assert await ismg.deliver(**mo(b"second", 0, 13)) == (13, C.DELIVER_FLOW_CONTROL)
    assert [c.text for c in await gw.read_contacts()] == ["first"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_flood_beyond_the_in_flight_bound_is_answered_flow_control(
    ismg: Ismg, start_gateway: Any
) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    adapter = await connected(gw)
    adapter.MAX_INFLIGHT = 0
    assert await ismg.deliver(**mo(b"flood", 0, 31)) == (31, C.DELIVER_FLOW_CONTROL)
    adapter.MAX_INFLIGHT = 512
    assert await ismg.deliver(**mo(b"flood", 0, 31)) == (31, 0)
    assert [c.text for c in await gw.read_contacts()] == ["flood"]


async def test_two_instances_hold_one_link(ismg: Ismg, start_gateway: Any) -> None:
    first = await start_gateway(adapters={"cmpp": config(ismg)}, fleet={"lease_ttl": "5s"})
    second = await start_gateway(adapters={"cmpp": config(ismg)}, fleet={"lease_ttl": "5s"})
    done, _ = await asyncio.wait(
        [asyncio.ensure_future(gw.adapters["cmpp"].bound.wait()) for gw in (first, second)],
        return_when=asyncio.FIRST_COMPLETED, timeout=20)
    assert done
    holder, other = ((first, second) if first.adapters["cmpp"].bound.is_set()
                     else (second, first))
    assert await ismg.deliver(**mo(b"one link", 0, 61)) == (61, 0)
    assert len(ismg.connects) == 1 and not other.adapters["cmpp"].bound.is_set()
    await holder.stop()
    await connected(other)
    assert len(ismg.connects) == 2
    assert await ismg.deliver(**mo(b"taken over", 0, 62)) == (62, 0)


async def test_logs_never_carry_numbers_or_the_secret(
    ismg: Ismg, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    gw = await start_gateway(adapters={"cmpp": config(ismg)})
    adapter = await connected(gw)
    await ismg.deliver(**mo("你好".encode("utf-16-be"), 8))
    (contact,) = await gw.read_contacts()
    await adapter.send(contact, Reply(contact.id, "收到", id="r-log"))
    assert "accepted by the ISMG" in caplog.text
    assert PHONE not in caplog.text and "s3cret" not in caplog.text


async def test_gbk_replies_are_cut_between_characters(ismg: Ismg, start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"cmpp": config(ismg, msg_fmt=15)})
    adapter = await connected(gw)
    await ismg.deliver(**mo("你好".encode("utf-16-be"), 8))
    (contact,) = await gw.read_contacts()
    text = "a" + "您的诉求已受理" * 12  # 169 GBK octets, the first character a single octet
    await adapter.send(contact, Reply(contact.id, text, id="r-gbk"))
    parts = ismg.submits
    assert [p.msg_fmt for p in parts] == [15, 15] and all(p.tp_udhi == 1 for p in parts)
    bodies = [p.msg_content[6:] for p in parts]
    assert all(len(b) <= 134 for b in bodies)
    assert "".join(b.decode("gbk") for b in bodies) == text  # each part decodes on its own
