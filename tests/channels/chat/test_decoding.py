"""WeChat and Weibo decoding: signatures, safe mode, hostile XML and JSON, fuzzing."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.channels.chat.officialaccount import (
    MessageCrypto,
    PayloadError,
    SignatureError,
    check_push,
    parse_xml,
    sha1_signature,
    text_reply_xml,
    timestamp_within,
)
from gateway.channels.chat.wechat import decode_message
from gateway.channels.chat.weibo import decode_json, decode_xml
from tests.channels.chat import payloads as p

FIXTURES = Path(__file__).parent / "fixtures"
NOW_S = 1_795_594_483
NOW_US = NOW_S * 1_000_000


# ---------------------------------------------------------------- signatures and time


def test_signature_is_sha1_of_sorted_parts() -> None:
    # the worked example of WeChat's message-push guide: Token AAAAA, nonce, timestamp
    assert sha1_signature("AAAAA", "1714036504", "1514711492") == p.sign(
        "AAAAA", "1714036504", "1514711492"
    )
    assert sha1_signature("b", "a", "c") == sha1_signature("c", "b", "a")


def test_check_push_accepts_a_good_signature() -> None:
    query = {"signature": p.sign(p.TOKEN, str(NOW_S), "n1"), "timestamp": str(NOW_S), "nonce": "n1"}
    check_push(query, p.TOKEN, NOW_US, 300)


@pytest.mark.parametrize(
    "query",
    [
        {"signature": "0" * 40, "timestamp": str(NOW_S), "nonce": "n1"},
        {
            "signature": p.sign("other-token", str(NOW_S), "n1"),
            "timestamp": str(NOW_S),
            "nonce": "n1",
        },
        {
            "signature": p.sign(p.TOKEN, str(NOW_S), "n1"),
            "timestamp": str(NOW_S + 1),
            "nonce": "n1",
        },
        {"timestamp": str(NOW_S), "nonce": "n1"},
        {"signature": "", "timestamp": "", "nonce": ""},
        {"signature": "签名", "timestamp": str(NOW_S), "nonce": "n1"},
    ],
    ids=["zeros", "wrong-secret", "tampered-timestamp", "missing", "empty", "non-ascii"],
)
def test_check_push_refuses_forgeries(query: dict[str, str]) -> None:
    with pytest.raises(SignatureError):
        check_push(query, p.TOKEN, NOW_US, 300)


@pytest.mark.parametrize("offset", [-301, 301, 86400])
def test_replay_outside_window_is_refused(offset: int) -> None:
    ts = str(NOW_S + offset)
    query = {"signature": p.sign(p.TOKEN, ts, "n"), "timestamp": ts, "nonce": "n"}
    with pytest.raises(SignatureError, match="window"):
        check_push(query, p.TOKEN, NOW_US, 300)


def test_timestamp_window_takes_milliseconds_and_refuses_junk() -> None:
    assert timestamp_within(str(NOW_S * 1000 + 999), NOW_US, 5)
    assert timestamp_within(str(NOW_S - 5), NOW_US, 5)
    assert not timestamp_within(str(NOW_S - 6), NOW_US, 5)
    assert not timestamp_within("abc", NOW_US, 5)


# ---------------------------------------------------------------- XML safety


def test_flat_xml_parses_with_cdata_and_nesting() -> None:
    body = b"<xml><A><![CDATA[x]]></A><B>2</B><C><D>d</D></C></xml>"
    assert parse_xml(body) == {"A": "x", "B": "2", "C": {"D": "d"}}


@pytest.mark.parametrize("name", ["billion_laughs.xml", "external_entity.xml", "dtd_only.xml"])
def test_entities_dtds_and_external_references_are_refused(name: str) -> None:
    with pytest.raises(PayloadError):
        parse_xml((FIXTURES / name).read_bytes())


@pytest.mark.parametrize(
    "body",
    [b"", b"<xml>", b"<xml><a></b></xml>", b"not xml", b"<root><a>1</a></root>", b"\xff\xfe<xml/>"],
    ids=["empty", "unclosed", "mismatched", "text", "wrong-root", "bad-encoding"],
)
def test_malformed_xml_is_a_payload_error(body: bytes) -> None:
    with pytest.raises(PayloadError):
        parse_xml(body)


def test_oversize_xml_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadError, match="too large"):
        parse_xml(b"<xml>" + b"<a>1</a>" * 20_000 + b"</xml>", max_bytes=64 * 1024)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_parse_xml_fuzz(data: bytes) -> None:
    try:
        result = parse_xml(data)
    except PayloadError:
        return
    assert isinstance(result, dict)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "MsgType",
                "FromUserName",
                "ToUserName",
                "CreateTime",
                "MsgId",
                "Content",
                "Event",
                "Location_X",
                "Location_Y",
                "Scale",
                "Label",
            ]
        ),
        st.text(max_size=40),
    )
)
def test_wechat_decode_fuzz(fields: dict[str, str]) -> None:
    try:
        msg = decode_message(fields)
    except PayloadError:
        return
    assert msg is None or (msg.sender and msg.external_id)


# ---------------------------------------------------------------- safe mode


def test_tencent_sample_vector_decrypts_and_verifies() -> None:
    crypto = MessageCrypto(p.TOKEN, p.AES_KEY, p.APP_ID)
    assert (
        crypto.msg_signature(p.SAMPLE_TIMESTAMP, p.SAMPLE_NONCE, p.SAMPLE_ENCRYPT)
        == p.SAMPLE_MSG_SIGNATURE
    )
    fields = parse_xml(crypto.decrypt(p.SAMPLE_ENCRYPT))
    assert fields["FromUserName"] == "oyORnuP8q7ou2gfYjqLzSIWZf0rs"
    assert fields["Content"] == "abcdteT"
    assert fields["MsgId"] == "6054768590064713728"


def test_our_encryption_is_what_wechat_decrypts() -> None:
    crypto = MessageCrypto(p.TOKEN, p.AES_KEY, p.APP_ID)
    message = "回复：已收到".encode()
    plain, app_id = p.aes_decrypt(crypto.encrypt(message))
    assert (plain, app_id) == (message, p.APP_ID.encode())
    assert crypto.decrypt(p.aes_encrypt(message)) == message


def test_encrypted_reply_carries_a_valid_msg_signature() -> None:
    crypto = MessageCrypto(p.TOKEN, p.AES_KEY, p.APP_ID)
    xml = crypto.encrypted_reply(text_reply_xml("o1", "gh", NOW_S, "好"), "123", "abc")
    fields = parse_xml(xml.encode())
    assert fields["MsgSignature"] == p.sign(p.TOKEN, "123", "abc", fields["Encrypt"])
    inner, _ = p.aes_decrypt(fields["Encrypt"])
    assert parse_xml(inner)["Content"] == "好"


def test_other_app_id_is_refused() -> None:
    crypto = MessageCrypto(p.TOKEN, p.AES_KEY, p.APP_ID)
    with pytest.raises(SignatureError, match="AppID"):
        crypto.decrypt(p.aes_encrypt(b"<xml/>", app_id="wx-someone-else"))


@pytest.mark.parametrize("key", ["short", "a" * 44, "!" * 43])
def test_bad_aes_keys_are_config_errors(key: str) -> None:
    with pytest.raises(ValueError):
        MessageCrypto(p.TOKEN, key, p.APP_ID)


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200), st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode())
    )
)
def test_decrypt_fuzz(data: str) -> None:
    crypto = MessageCrypto(p.TOKEN, p.AES_KEY, p.APP_ID)
    try:
        crypto.decrypt(data)
    except PayloadError:
        pass


# ---------------------------------------------------------------- WeChat messages

WECHAT_CASES = [
    ("text", {"Content": "路灯坏了"}, 1, {"text": "路灯坏了"}),
    (
        "image",
        {"PicUrl": "http://mmbiz/1.jpg", "MediaId": "m1"},
        2,
        {"meta": {"pic_url": "http://mmbiz/1.jpg", "media_id": "m1"}},
    ),
    (
        "voice",
        {"MediaId": "m2", "Format": "amr", "Recognition": "腾讯微信团队"},
        3,
        {"text": "腾讯微信团队"},
    ),
    (
        "video",
        {"MediaId": "m3", "ThumbMediaId": "t3"},
        4,
        {"meta": {"media_id": "m3", "thumb_media_id": "t3"}},
    ),
    ("shortvideo", {"MediaId": "m4", "ThumbMediaId": "t4"}, 5, {}),
    (
        "location",
        {"Location_X": "23.134521", "Location_Y": "113.358803", "Scale": "20", "Label": "位置信息"},
        6,
        {"text": "位置信息"},
    ),
    (
        "link",
        {
            "Title": "公众平台官网链接",
            "Description": "公众平台官网链接",
            "Url": "https://mp.weixin.qq.com",
        },
        7,
        {},
    ),
]


@pytest.mark.parametrize(
    ("kind", "fields", "msg_id", "expect"), WECHAT_CASES, ids=[c[0] for c in WECHAT_CASES]
)
def test_wechat_message_types(
    kind: str, fields: dict[str, str], msg_id: int, expect: dict[str, object]
) -> None:
    msg = decode_message(
        parse_xml(p.wechat_xml(kind, dict(fields), create_time=1348831860, msg_id=msg_id))
    )
    assert msg is not None
    assert (msg.kind, msg.sender, msg.recipient) == (kind, p.OPENID, p.ACCOUNT)
    assert msg.external_id == str(msg_id)
    assert msg.created_at == 1348831860
    if "text" in expect:
        assert msg.text == expect["text"]
    for key, value in dict(expect.get("meta", {})).items():  # type: ignore[call-overload]
        assert msg.meta[key] == value


def test_wechat_location_coordinates() -> None:
    msg = decode_message(
        parse_xml(
            p.wechat_xml(
                "location",
                {
                    "Location_X": "23.134521",
                    "Location_Y": "113.358803",
                    "Scale": "20",
                    "Label": "x",
                },
                create_time=1,
                msg_id=9,
            )
        )
    )
    assert msg is not None
    assert msg.meta["location"] == {"lat": 23.134521, "lon": 113.358803, "scale": 20, "label": "x"}


def test_wechat_events_dedupe_on_sender_and_create_time() -> None:
    msg = decode_message(parse_xml(p.event("subscribe", create_time=123456789, key="qrscene_42")))
    assert msg is not None
    assert (msg.kind, msg.event, msg.external_id) == ("event", "subscribe", f"{p.OPENID}:123456789")
    assert msg.meta["event_key"] == "qrscene_42"


def test_wechat_unknown_type_is_ignored_with_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        assert (
            decode_message(
                parse_xml(p.wechat_xml("miniprogrampage", {"Title": "x"}, create_time=1, msg_id=1))
            )
            is None
        )
    assert "miniprogrampage" in caplog.text


def test_wechat_without_sender_is_a_payload_error() -> None:
    with pytest.raises(PayloadError):
        decode_message({"MsgType": "text", "Content": "x"})


# ---------------------------------------------------------------- Weibo messages


def test_weibo_text_push() -> None:
    msg = decode_json(p.weibo_push("text", "私信或留言内容"))
    assert msg is not None
    assert (msg.kind, msg.sender, msg.recipient, msg.text) == (
        "text",
        str(p.WEIBO_USER),
        str(p.WEIBO_ACCOUNT),
        "私信或留言内容",
    )
    assert msg.created_at == 1342433360  # Mon Jul 16 18:09:20 +0800 2012


def test_weibo_position_image_voice_event() -> None:
    pos = decode_json(
        p.weibo_push("position", "我在这里", {"longitude": "116.308586", "latitude": "39.982525"})
    )
    assert pos is not None and pos.meta["location"] == {"lat": 39.982525, "lon": 116.308586}
    img = decode_json(p.weibo_push("image", "", {"vfid": 821804459, "tovfid": 821804469}))
    assert img is not None and img.meta == {"vfid": "821804459", "tovfid": "821804469"}
    voice = decode_json(p.weibo_push("voice", "", {"vfid": 1, "tovfid": 2}))
    assert voice is not None and voice.kind == "voice"
    ev = decode_json(p.weibo_push("event", "", {"subtype": "follow", "key": "k"}))
    assert ev is not None and (ev.event, ev.meta["event_key"]) == ("follow", "k")


def test_weibo_retry_has_the_same_external_id_and_other_messages_do_not() -> None:
    a = decode_json(p.weibo_push("text", "one"))
    b = decode_json(p.weibo_push("text", "one"))
    c = decode_json(p.weibo_push("text", "two"))
    assert a is not None and b is not None and c is not None
    assert a.external_id == b.external_id != c.external_id


def test_weibo_unknown_type_ignored_with_log(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        assert decode_json(p.weibo_push("mention", "@someone")) is None
    assert "mention" in caplog.text


@pytest.mark.parametrize(
    "body", [b"", b"{", b"[]", b'"x"', b"{}", b'{"type": "text"}', b'{"type": 5, "sender_id": 1}']
)
def test_weibo_malformed_json(body: bytes) -> None:
    with pytest.raises(PayloadError):
        decode_json(body)


def test_weibo_xml_push() -> None:
    body = (
        b"<xml><ToUserName><![CDATA[1902538057]]></ToUserName><FromUserName><![CDATA[2489518277]]></FromUserName>"
        b"<CreateTime>1342433360</CreateTime><MsgType><![CDATA[text]]></MsgType><Content><![CDATA[hello]]></Content></xml>"
    )
    msg = decode_xml(body)
    assert msg is not None and (msg.sender, msg.text, msg.created_at) == (
        "2489518277",
        "hello",
        1342433360,
    )


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=512),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "type",
                            "sender_id",
                            "receiver_id",
                            "created_at",
                            "text",
                            "data",
                            "subtype",
                            "latitude",
                            "longitude",
                            "vfid",
                        ]
                    ),
                    children,
                    max_size=6,
                )
            ),
            max_leaves=20,
        ).map(lambda v: json.dumps(v).encode()),
    )
)
def test_weibo_decode_fuzz(body: bytes) -> None:
    for decode in (decode_json, decode_xml):
        try:
            decode(body)
        except PayloadError:
            pass


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        ("Mon Jul 16 18:09:20 +0800 2012", 1342433360),
        ("Tue Feb 23 12:28:47 -0530 2021", 1614103127),
        (1342433360, 1342433360),
        ("1342433360", 1342433360),
        ("Mon Jul 99 18:09:20 +0800 2012", None),
        ("Mon Foo 16 18:09:20 +0800 2012", None),
        ("Mon Jul 16 18:09 +0800 2012", None),
        ("", None),
    ],
)
def test_weibo_dates(created_at: object, expected: int | None) -> None:
    msg = decode_json(p.weibo_push("text", "x", created_at=created_at))  # type: ignore[arg-type]
    assert msg is not None
    assert msg.created_at == expected
