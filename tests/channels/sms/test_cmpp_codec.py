"""CMPP 2.0/3.0 byte layouts checked against the test vectors of an independent implementation:
github.com/bigwhite/gocmpp (Go, Apache-2.0), connect_test.go, deliver_test.go, submit_test.go.
The vectors are written out here as hex; no code of theirs is used."""

from __future__ import annotations

import pytest

from gateway.channels.sms import cmpp_pdu as C

# gocmpp connect_test.go: Source_Addr 900001, secret 888888, Timestamp 1021080510, Version 0x21,
# Sequence_Id 0x17
CONNECT = bytes.fromhex(
    "000000270000000100000017393030303031"
    "90d00c1d517abd0b4f65f6bcf8535d16" "21" "3cdc73be"
)
# gocmpp deliver_test.go: CMPP 3.0 MO, Msg_Id 13025908756704198656, Sequence_Id 1
DELIVER_V3 = bytes.fromhex(
    "0000007f0000000500000001b4c5530000010000" "393030303031" + "00" * 15 + "00" * 10
    + "000000" + "3133343132333430303030" + "00" * 21 + "00" "00" "12"
    + "5468697320697320612074657374204d4f2e".replace(" ", "") + "00" * 20
)
# gocmpp deliver_test.go: CMPP 2.0 MO, Msg_Id 13052947396898652160, Sequence_Id 5
DELIVER_V2 = bytes.fromhex(
    "000000670000000500000005b525628000010000" "393030303031" + "00" * 15 + "00" * 10
    + "000000" + "3133343132333430303030" + "00" * 10 + "00" "12"
    + "5468697320697320612074657374204d4f2e" + "00" * 8
)
DELIVER_RESP_V3 = bytes.fromhex("000000188000000500000001b4c553000001000000000000")
DELIVER_RESP_V2 = bytes.fromhex("000000158000000500000005b52562800001000000")
# gocmpp submit_test.go: UCS-2 "测试gocmpp submit" to 13500002696, Sequence_Id 0x17
_SUBMIT_HEAD = "0000000000000000" "01010101" "74657374000000000000" "02" "3133353030303032363936"
_SUBMIT_TAIL = (
    "000008" "393030303031" "3032" "313000000000" "3135313130353133313535353130312b00"
    + "00" * 17 + "393030303031" + "00" * 15 + "01" + "3133353030303032363936"
)
SUBMIT_V2 = bytes.fromhex(
    "000000bd0000000400000017" + _SUBMIT_HEAD + "00" * 10 + _SUBMIT_TAIL + "00" * 10
    + "1e6d4b8bd50067006f0063006d00700070002000730075006200" "6d00690074" + "00" * 8
)
SUBMIT_V3 = bytes.fromhex(
    "000000e10000000400000017" + _SUBMIT_HEAD + "00" * 21 + "00" + _SUBMIT_TAIL + "00" * 21
    + "00" + "1e6d4b8bd50067006f0063006d00700070002000730075006200" "6d00690074" + "00" * 20
)


def test_connect_authenticator_and_layout() -> None:
    body = C.connect_body("900001", "888888", 0x21, "1021080510")
    assert C.Packet(C.CONNECT, 0x17, body).encode() == CONNECT


@pytest.mark.parametrize(("version", "raw", "msg_id", "seq"), [
    (C.V30, DELIVER_V3, 13025908756704198656, 1),
    (C.V20, DELIVER_V2, 13052947396898652160, 5),
])
def test_deliver_both_versions(version: int, raw: bytes, msg_id: int, seq: int) -> None:
    deliver = C.Deliver.parse(raw[12:], version)
    assert (deliver.msg_id, deliver.dest_id, deliver.src_terminal_id) == (
        msg_id, "900001", "13412340000")
    assert deliver.msg_content == b"This is a test MO." and deliver.msg_fmt == 0
    assert C.Packet(C.DELIVER, seq, deliver.encode(version)).encode() == raw


def test_deliver_resp_both_versions() -> None:
    assert C.Packet(C.DELIVER | C.RESP, 1, C.msg_id_resp(13025908756704198656, 0, C.V30)
                    ).encode() == DELIVER_RESP_V3
    assert C.Packet(C.DELIVER | C.RESP, 5, C.msg_id_resp(13052947396898652160, 0, C.V20)
                    ).encode() == DELIVER_RESP_V2


@pytest.mark.parametrize(("version", "raw"), [(C.V20, SUBMIT_V2), (C.V30, SUBMIT_V3)])
def test_submit_both_versions(version: int, raw: bytes) -> None:
    submit = C.Submit(
        src_id="900001", dest_terminal_ids=("13500002696",),
        msg_content="测试gocmpp submit".encode("utf-16-be"), msg_fmt=8, msg_src="900001",
        service_id="test", registered_delivery=1, msg_level=1, fee_user_type=2,
        fee_terminal_id="13500002696", fee_type="02", fee_code="10",
        valid_time="151105131555101+",
    )
    assert C.Packet(C.SUBMIT, 0x17, submit.encode(version)).encode() == raw
    assert C.Submit.parse(raw[12:], version) == submit


def test_status_report_round_trip_and_truncation() -> None:
    for version in (C.V20, C.V30):
        report = C.Report(42, "DELIVRD", "2612010000", "2612010001", "8613800138000", 7)
        data = report.encode(version)
        assert len(data) == (60 if version == C.V20 else 71)
        assert C.Report.parse(data, version) == report
        with pytest.raises(C.Malformed):
            C.Report.parse(data[:-1], version)
