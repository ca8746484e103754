"""The normalizer on the .eml corpus (a table of labelled cases) and on its building blocks."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.channels.email.headers import decode_bytes, decode_header, header_params
from gateway.channels.email.htmltext import html_to_text
from gateway.channels.email.normalize import (
    Envelope,
    Options,
    content_hash,
    normalize,
    split_mailbox,
)
from gateway.contact.clock import parse_time
from gateway.contact.language import guess_language

FIXTURES = Path(__file__).parent / "fixtures"
ENVELOPE = Envelope("citizen@example.org", ("12345@hotline.example.gov.cn",))
CONTACT_ID = "0196c8a4-1f2e-7a3b-8c4d-5e6f708192a3"


@dataclass(frozen=True)
class Case:
    file: str
    subject: str | None
    text: str
    sender: str = "citizen@example.org"
    name: str | None = None
    language: str | None = None
    external_id: str | None = None
    origin: str | None = "keep"
    thread: str | None = None
    auto: str | None = None
    files: tuple[tuple[str, str], ...] = ()
    inline: tuple[str, ...] = ()
    meta: dict[str, object] = field(default_factory=dict)


CASES = [
    Case("plain.eml", "Streetlight broken on Renmin Road",
         "The streetlight at Renmin Road 12 has been out for a week.", name="Zhang San",
         external_id="<plain-1@example.org>", origin="2026-11-25T00:00:00Z", language="en"),
    Case("alternative.eml", "噪音投诉", "工地夜间施工噪音太大。\n请尽快处理。",
         sender="lisi@example.org", name="李四", language="zh", meta={"body": "plain"}),
    Case("nested.eml", "Nested", "Photo of the pothole below.",
         files=(("part-1.png", "image/png"), ("report.pdf", "application/pdf")),
         inline=("<img1@example.org>",), language="en"),
    Case("attachments.eml", "Attachments with CJK names", "见附件。", language="zh",
         files=(("投诉材料.pdf", "application/pdf"), ("现场照片.png", "image/png"))),
    Case("inline_image.eml", "Inline image, HTML only", "See the photo:\n[photo]\nThanks & regards",
         files=(("part-1.png", "image/png"),), inline=("<photo@x>",), meta={"body": "html"},
         language="en"),
    Case("gbk_as_gb2312.eml", "关于镕园路积水", "朱镕基同志：小区堃园路积水严重。",
         sender="wangwu@example.cn", name="王五", language="zh-Hans"),
    Case("gb18030.eml", "生僻字𠀀投诉", "姓名含生僻字𠀀，户籍系统无法录入。",
         sender="citizen@example.cn", language="zh-Hans"),
    Case("big5.eml", "交通燈故障", "彌敦道交通燈壞咗㗎，請盡快維修。",
         sender="citizen@example.hk", language="zh-Hant"),
    Case("iso2022jp.eml", "道路の陥没について", "駅前の道路が陥没しています。",
         sender="yamada@example.jp", name="山田太郎", language="ja"),
    Case("shift_jis.eml", "①番出口", "①番出口のエスカレーターが停止中。",
         sender="citizen@example.jp", language="ja"),
    Case("euc_kr.eml", "똠방각하 민원", "똠방각하 민원입니다.", sender="citizen@example.kr",
         language="ko"),
    Case("broken_rfc2047.eml", "市长信箱", "正文", sender="zhao@example.cn", name="赵六",
         language="zh"),
    Case("no_date.eml", "No date", "No Date header here.", origin=None, language="en"),
    Case("no_message_id.eml", "No message id", "No Message-ID header here.",
         external_id="sha256:", language="en"),
    Case("undeclared_utf8.eml", "未声明编码的主题", "正文没有声明字符集。",
         sender="chen@example.cn", name="陈七", language="zh"),
    Case("undeclared_gbk.eml", "未声明编码的主题", "正文没有声明字符集，是GBK。",
         sender="citizen@example.cn", language="zh"),
    Case("bare_lf.eml", "Bare LF", "line one\nline two", files=(("a.txt", "text/plain"),),
         language="en"),
    Case("no_boundary.eml", "Multipart without boundary", "边界参数丢失了。", language="zh",
         files=(("p.png", "image/png"),), meta={"notes": ["multipart boundary recovered"]}),
    Case("html_only.eml", "HTML only",
         "您好，\n\n路灯不亮。\n地址：地图 <https://map.example/1>\n\n- 一\n\n- 二",
         language="zh-Hans", meta={"body": "html"}),
    Case("auto_replied.eml", "Out of office", "I am away.",
         auto="auto-submitted: auto-replied", language="en"),
    Case("bulk.eml", "Newsletter", "News.", sender="news@example.org", auto="precedence: bulk",
         language="en"),
    Case("reply.eml", "Re: Streetlight broken on Renmin Road", "Still broken.",
         thread=CONTACT_ID, language="en",
         meta={"reply_to": "other@example.org", "reply_to_contact": CONTACT_ID,
               "in_reply_to": f"<reply.{CONTACT_ID}.k3j@hotline.example.gov.cn>"}),
]


def test_every_fixture_has_a_case():
    assert sorted(c.file for c in CASES) == sorted(
        p.name for p in FIXTURES.glob("*.eml")
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.file)
def test_corpus(case: Case):
    raw = (FIXTURES / case.file).read_bytes()
    n = normalize(raw, ENVELOPE)
    assert n.parse_error is None
    assert n.subject == case.subject
    assert n.text == case.text
    assert n.sender.address == case.sender
    assert n.sender.name == case.name
    assert n.recipient == "12345@hotline.example.gov.cn"
    assert n.language == case.language
    if case.external_id is None:
        domain = case.sender.split("@")[1]
        assert n.external_id.startswith("<") and n.external_id.endswith(f"@{domain}>")
    elif case.external_id == "sha256:":
        assert n.external_id == content_hash(raw)
    else:
        assert n.external_id == case.external_id
    if case.origin is None:
        assert n.origin_at is None
    elif case.origin != "keep":
        assert n.origin_at == parse_time(case.origin)
    else:
        assert n.origin_at is not None
    assert n.thread == case.thread
    assert n.auto_generated == case.auto
    assert tuple((p.name, p.content_type) for p in n.parts) == case.files
    assert tuple(p.content_id for p in n.parts if p.inline) == case.inline
    for key, value in case.meta.items():
        assert n.meta[key] == value
    assert "\x00" not in n.text and "\ufffd" not in n.text + (n.subject or "")


def test_attachment_bytes_are_decoded():
    n = normalize((FIXTURES / "nested.eml").read_bytes(), ENVELOPE)
    png, pdf = n.parts
    assert png.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert pdf.data.startswith(b"%PDF-1.4") and pdf.data.endswith(b"%%EOF\n")


def test_message_without_header_separator_is_still_a_contact():
    n = normalize(b"just some words, no headers at all\r\n", ENVELOPE)
    assert n.parse_error is None
    assert n.sender.address == "citizen@example.org"
    assert n.external_id.startswith("sha256:")


def test_null_sender_is_auto_generated():
    bounce = Envelope("", ("12345@hotline.example.gov.cn",))
    n = normalize((FIXTURES / "plain.eml").read_bytes(), bounce)
    assert n.auto_generated == "null sender"


def test_plus_address_carries_the_contact_id():
    env = Envelope("citizen@example.org", (f"12345+{CONTACT_ID}@hotline.example.gov.cn",))
    n = normalize((FIXTURES / "plain.eml").read_bytes(), env)
    assert n.thread == CONTACT_ID
    assert n.recipient == "12345@hotline.example.gov.cn"


def test_references_root_is_the_thread_without_a_contact_id():
    raw = (FIXTURES / "plain.eml").read_bytes().replace(
        b"Message-ID: <plain-1@example.org>",
        b"Message-ID: <p2@example.org>\r\nReferences: <root@example.org> <mid@example.org>\r\n"
        b"In-Reply-To: <mid@example.org>",
    )
    assert normalize(raw, ENVELOPE).thread == "<root@example.org>"
    only_irt = raw.replace(b"References: <root@example.org> <mid@example.org>\r\n", b"")
    assert normalize(only_irt, ENVELOPE).thread == "<mid@example.org>"


def test_content_hash_ignores_trace_headers_and_line_ends():
    raw = (FIXTURES / "no_message_id.eml").read_bytes()
    other_path = b"Received: from elsewhere by relay2; Thu, 26 Nov 2026 00:00:00 +0000\r\n" + raw
    assert content_hash(other_path) == content_hash(raw)
    assert content_hash(raw.replace(b"\r\n", b"\n")) == content_hash(raw)
    assert content_hash(raw.replace(b"No Message-ID", b"No Message-Id")) != content_hash(raw)


def test_text_is_bounded():
    raw = b"From: a@b.c\r\nSubject: long\r\n\r\n" + b"x" * 5000
    n = normalize(raw, ENVELOPE, Options(max_text_chars=1000))
    assert len(n.text) == 1000 and n.meta["text_truncated"] is True


# ---------------------------------------------------------------- building blocks


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("=?utf-8?B?" + base64.b64encode("你好".encode()).decode() + "?=", "你好"),
        ("=?UTF-8?Q?caf=C3=A9?= au lait", "café au lait"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # whitespace between encoded words goes
        ("=?utf-8?q?a?=\r\n\t=?utf-8?q?b?=", "ab"),
        ("x =?utf-8?q?a?= y", "x a y"),
        ("=?utf-8?Q?caf=C3=A9", "café"),  # no closing ?=
        ("=?utf-8?Q?two words?=", "two words"),  # a raw space inside
        ("=?utf-8?B?5L2g?==?utf-8?B?5aW9?=", "你好"),  # no space between words
        ("=?utf-8?B?5L0=?= =?utf-8?B?oOWlvQ==?=", "你好"),  # a character split across words
        ("=?gb2312?B?" + base64.b64encode("镕".encode("gbk")).decode() + "?=", "镕"),
        ("=?x-unknown?Q?plain?=", "plain"),
        ("=?utf-8*en?Q?lang?=", "lang"),  # RFC 2231 language suffix
        ("=?utf-8?B?!!!?=", ""),
        ("no words here", "no words here"),
        ("=?utf-8?X?bad?=", "=?utf-8?X?bad?="),
    ],
)
def test_decode_header(raw: str, expected: str):
    assert decode_header(raw) == expected


def test_decode_header_raw_8bit():
    utf8 = "市长".encode().decode("ascii", "surrogateescape")
    gbk = "市长".encode("gbk").decode("ascii", "surrogateescape")
    assert decode_header(utf8) == "市长"
    assert decode_header(gbk, "gb18030") == "市长"
    assert decode_header("caf\udce9", "cp1252") == "café"


@pytest.mark.parametrize(
    ("text", "label", "codec"),
    [
        ("朱镕基", "gb2312", "gbk"),
        ("朱镕基", "GB_2312-80", "gbk"),
        ("𠀀€", "gbk", "gb18030"),
        ("㗎", "big5", "big5hkscs"),
        ("碁銹", "big5", "cp950"),
        ("①㈱", "shift_jis", "cp932"),
        ("똠", "ks_c_5601-1987", "cp949"),
        ("日本", "iso-2022-jp", "iso2022_jp"),
        ("café", "iso-8859-1", "cp1252"),
        ("“quotes”", "iso-8859-1", "cp1252"),
        ("中文", None, "utf-8"),
        ("中文", "us-ascii", "utf-8"),
        ("中文", "utf-8", "gb18030"),  # mislabelled: falls back
    ],
)
def test_decode_bytes_uses_supersets(text: str, label: str | None, codec: str):
    assert decode_bytes(text.encode(codec), label, "gb18030") == text


def test_decode_bytes_never_fails():
    assert decode_bytes(b"\xff\xfe\x00abc", "utf-8", "ascii") == "\ufffd\ufffd\x00abc"
    assert decode_bytes(b"abc", "no-such-charset", "gb18030") == "abc"


def test_header_params_rfc2231_and_quoting():
    value, params = header_params(
        "attachment;\r\n filename*0*=utf-8''%E6%8A%95;\r\n filename*1*=%E8%AF%89.txt; size=12"
    )
    assert value == "attachment" and params == {"filename": "投诉.txt", "size": "12"}
    value, params = header_params('Text/Plain; charset="gb2312"; name="a \\"b\\".txt"')
    assert value == "text/plain" and params == {"charset": "gb2312", "name": 'a "b".txt'}
    _, params = header_params("application/pdf; name*=gb2312''%D5%C5.pdf")
    assert params["name"] == "张.pdf"


def test_split_mailbox():
    assert split_mailbox("12345+abc@Hotline.Example.GOV.cn") == (
        "12345@hotline.example.gov.cn",
        "abc",
    )
    assert split_mailbox("<a@b.c>") == ("a@b.c", None)


def test_html_to_text():
    html = (
        "<html><head><title>t</title><style>p{}</style></head><body>"
        "<h1>Title</h1><p>One&nbsp;two &lt;three&gt;</p><table><tr><td>a</td><td>b</td></tr>"
        "</table><pre>  keep\n  this</pre><a href='https://x.example/'>link</a>"
        "<a href='mailto:m@x.example'>m@x.example</a><script>var x</script></body></html>"
    )
    text = html_to_text(html)
    assert text.splitlines() == [
        "Title",
        "",
        "One two <three>",
        "",
        "a\tb",
        "",
        "keep",
        "this",
        "link <https://x.example/>m@x.example",
    ]


def test_twenty_megabyte_attachment():
    data = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    raw = (
        b"From: citizen@example.org\r\nSubject: big\r\nMessage-ID: <big@example.org>\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        b"Content-Type: text/plain\r\n\r\nsee file\r\n--b\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=big.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(data).replace(b"\n", b"\r\n")
        + b"--b--\r\n"
    )
    n = normalize(raw, ENVELOPE)
    (part,) = n.parts
    assert part.name == "big.bin" and len(part.data) == len(data)
    assert hashlib.sha256(part.data).digest() == hashlib.sha256(data).digest()


def test_forwarded_message_is_one_eml_file():
    inner = (FIXTURES / "plain.eml").read_bytes()
    raw = (
        b"From: citizen@example.org\r\nSubject: Fwd: streetlight\r\n"
        b"Message-ID: <fwd@example.org>\r\n"
        b'Content-Type: multipart/mixed; boundary="f"\r\n\r\n--f\r\n'
        b"Content-Type: text/plain\r\n\r\nSee the message below.\r\n--f\r\n"
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n"
        + inner + b"\r\n--f--\r\n"
    )
    n = normalize(raw, ENVELOPE)
    assert n.text == "See the message below."
    (forwarded,) = n.parts
    assert (forwarded.name, forwarded.content_type) == ("message-1.eml", "message/rfc822")
    assert b"Subject: Streetlight broken on Renmin Road" in forwarded.data
    assert b"The streetlight at Renmin Road 12" in forwarded.data


def test_format_flowed_is_unwrapped():
    raw = (
        b"From: citizen@example.org\r\nSubject: flowed\r\n"
        b"Content-Type: text/plain; charset=utf-8; format=flowed; delsp=yes\r\n\r\n"
        + "路灯已经坏了一个 \r\n星期。\r\n> 引用的 \r\n> 原文\r\n-- \r\n张三\r\n".encode()
    )
    assert normalize(raw, ENVELOPE).text == "路灯已经坏了一个星期。\n> 引用的原文\n-- \n张三"
    fixed = raw.replace(b"; format=flowed; delsp=yes", b"")
    assert normalize(fixed, ENVELOPE).text.splitlines()[0] == "路灯已经坏了一个 "


@pytest.mark.parametrize(
    ("text", "language"),
    [("路灯坏了", "zh"), ("道路の陥没", "ja"), ("민원입니다", "ko"),
     ("Streetlight is broken", "en"), ("Streetlight at 人民路 12, broken for a week", "en"),
     ("", None)],
)
def test_without_a_declared_language_the_text_is_guessed_by_the_gateways_guesser(
    text: str, language: str | None
):
    # Normalization had a second guesser of its own (by script only: Latin text got no hint
    # here, and another one at intake); now the hint is the one of every channel.
    raw = b"From: a@example.org\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + text.encode()
    assert normalize(raw, ENVELOPE).language == language == guess_language(text)


def test_an_encoded_word_inside_an_rfc2231_file_name_does_not_sink_the_message():
    """A file name given by RFC 2231 (percent-encoded UTF-8) that decodes to an RFC 2047 word
    holding a non-ASCII character: the word's Q decoding took only ASCII and raised, and the
    whole message was stored unparsed (no text, no parts). The name is read; the rest stays."""
    raw = (
        b"From: a@example.org\r\nSubject: x\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: application/pdf\r\n"
        b"Content-Disposition: attachment; filename*=utf-8''%3D%3Futf-8%3Fq%3F%C3%A4%3F%3D\r\n"
        b"\r\nPDF\r\n--b--\r\n"
    )
    result = normalize(raw, ENVELOPE)
    assert result.parse_error is None
    assert result.text == "hello"
    assert [(p.name, p.data) for p in result.parts] == [("ä", b"PDF")]
    assert decode_header("=?utf-8?q?caf\udcc3\udca9?=") == "café"  # raw 8-bit bytes as before
