"""The AGI protocol layer: header block, quoting, replies (table cases and fuzzing)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.channels.voice.agi import (
    AgiClosed,
    AgiError,
    AgiReply,
    ReplyAssembler,
    format_command,
    parse_header_block,
    parse_reply,
    parse_reply_line,
    query_params,
    quote,
    read_header_block,
    script_args,
    script_name,
    split_command,
)
from gateway.channels.voice.ami import AmiError, FrameReader
from gateway.contact.clock import FixedClock
from tests.channels.voice.fakes import agi_fixture, fake_call

REPLIES = [
    ("200 result=0", AgiReply(200, "0")),
    ("200 result=1 (ok from python)", AgiReply(200, "1", "ok from python")),
    ("200 result=1 (a (nested) value)", AgiReply(200, "1", "a (nested) value")),
    ("200 result=0 endpos=12345", AgiReply(200, "0", None, 12345)),
    ("200 result=49 (dtmf) endpos=8000", AgiReply(200, "49", "dtmf", 8000)),
    ("200 result=1234 (timeout)", AgiReply(200, "1234", "timeout")),
    ("200 result=-1", AgiReply(200, "-1")),
    ("200 result=1 ()", AgiReply(200, "1", "")),
    ("200 result=", AgiReply(200, "")),
    ("200 result=1 (speech) endpos=1600 results=2 ", AgiReply(200, "1", "speech", 1600)),
    ("200 result=1 (a) endpos=b (c) endpos=7", AgiReply(200, "1", "a) endpos=b (c", 7)),
    ("200 result=0 (timeout) endpos=-1", AgiReply(200, "0", "timeout", -1)),
    ("503 result=-2 Memory allocation failure", AgiReply(503)),
    ("510 Invalid or unknown command", AgiReply(510)),
    ("511 Command Not Permitted on a dead channel or intercept routine", AgiReply(511)),
    ("520 Invalid command syntax.  Proper usage not available.", AgiReply(520)),
]


@pytest.mark.parametrize(("line", "expected"), REPLIES, ids=[r[0] for r in REPLIES])
def test_reply_lines(line: str, expected: AgiReply) -> None:
    reply = parse_reply_line(line + "\n")
    assert (reply.code, reply.result, reply.data, reply.endpos) == (
        expected.code,
        expected.result,
        expected.data,
        expected.endpos,
    )
    assert reply.ok == (expected.code == 200)


def test_speech_reply_keeps_what_follows_endpos() -> None:
    reply = parse_reply_line("200 result=1 (speech) endpos=1600 results=2 one two\n")
    assert (reply.data, reply.endpos, reply.extra) == ("speech", 1600, "results=2 one two")


def test_result_int() -> None:
    assert parse_reply_line("200 result=-1").result_int == -1
    assert parse_reply_line("200 result=1234 (timeout)").result_int == 1234
    assert parse_reply_line("200 result=abc").result_int is None
    assert parse_reply_line("510 Invalid or unknown command").result_int is None


def test_multi_line_520_block() -> None:
    assembler = ReplyAssembler()
    lines = [
        "520-Invalid command syntax.  Proper usage follows:",
        "Usage: DATABASE GET <family> <key>",
        "Example return code: 200 result=1 (testvariable)",
        "520 End of proper usage.",
    ]
    out = [assembler.feed(line) for line in lines]
    assert out[:3] == [None, None, None]
    reply = out[3]
    assert reply is not None and reply.code == 520
    assert "Usage: DATABASE GET" in reply.text
    assert reply.lines == tuple(lines)
    assert parse_reply(lines) == reply


def test_hangup_lines_are_skipped_and_counted() -> None:
    assembler = ReplyAssembler()
    assert assembler.feed("HANGUP\n") is None
    assert assembler.feed("HANGUP") is None
    reply = assembler.feed("200 result=1\n")
    assert reply is not None and reply.result == "1"
    assert assembler.hangups == 2


@pytest.mark.parametrize("line", ["", "hello", "20 result=1", "520-dangling", "abc 200"])
def test_non_replies_raise_the_protocol_error(line: str) -> None:
    with pytest.raises(AgiError):
        parse_reply_line(line)


QUOTING = [
    ("plain", '"plain"'),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("line\nbreak\r", '"line break "'),
    ("nul\x00byte", '"nulbyte"'),
    ("", '""'),
    ("张三", '"张三"'),
]


@pytest.mark.parametrize(("value", "quoted"), QUOTING)
def test_quoting(value: str, quoted: str) -> None:
    assert quote(value) == quoted


def test_command_formatting_and_bounds() -> None:
    assert format_command("SET VARIABLE", "GATEWAY_STATUS", "OK") == (
        b'SET VARIABLE "GATEWAY_STATUS" "OK"\n'
    )
    assert format_command("VERBOSE", "hi", 1) == b'VERBOSE "hi" 1\n'
    with pytest.raises(ValueError):
        format_command("SET VARIABLE", "X", "y" * 9000)
    with pytest.raises(ValueError):
        format_command("EXEC", *(["a"] * 130))
    with pytest.raises(ValueError):
        format_command("SET VARIABLE\n", "X", "y")
    with pytest.raises(ValueError):
        format_command('EXEC "x', "y")


@given(st.text())
def test_quoted_values_round_trip_through_asterisks_parser(value: str) -> None:
    line = format_command("SET VARIABLE", "NAME", value).decode()
    expected = value.replace("\x00", "").replace("\r", " ").replace("\n", " ")
    assert split_command(line) == ["SET", "VARIABLE", "NAME", expected]


def test_split_command_matches_parse_args() -> None:
    assert split_command('SET VARIABLE "a b" c\\ d ""\n') == ["SET", "VARIABLE", "a b", "c d", ""]
    assert split_command('EXEC Dial "PJSIP/1"x') == ["EXEC", "Dial", "PJSIP/1x"]


def test_header_block_helpers() -> None:
    env = parse_header_block(agi_fixture("local_query_args.agi"))
    assert env["agi_uniqueid"] == "1795594483.2"
    assert env["agi_accountcode"] == ""
    assert script_name(env["agi_network_script"]) == "intake"
    assert query_params(env["agi_network_script"]) == {"source": "test"}
    assert script_args(env) == ["first arg", "second"]
    assert script_name("/intake/?a=1") == "intake"
    assert script_name("") == ""
    assert query_params("intake") == {}


async def read_from(data: bytes, eof: bool = True, limit: int = 64 * 1024) -> dict[str, str]:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await read_header_block(reader)


async def test_header_reader_cases() -> None:
    env = await read_from(agi_fixture("sip_call.agi"))
    assert env["agi_callerid"] == "13800138000"
    with pytest.raises(AgiClosed):
        await read_from(b"")
    with pytest.raises(AgiClosed):
        await read_from(agi_fixture("no_empty_line.agi"))
    with pytest.raises(AgiError):
        await read_from(agi_fixture("garbage.agi"))
    with pytest.raises(AgiError):
        await read_from(agi_fixture("overlong_line.agi"), limit=16 * 1024)
    with pytest.raises(AgiError):
        await read_from(b"agi_x: y\n" * 300 + b"\n")
    latin = await read_from(agi_fixture("latin1_name.agi"))
    assert latin["agi_calleridname"] == "Jos\ufffd"


# ------------------------------------------------------------------ fuzzing

lines = st.one_of(
    st.text(max_size=200),
    st.builds(
        lambda code, rest: f"{code} {rest}",
        st.sampled_from(["200", "510", "511", "520", "520-", "HANGUP"]),
        st.text(max_size=80),
    ),
    st.builds(
        lambda r, d, e: f"200 result={r}{d}{e}",
        st.text(max_size=10),
        st.one_of(st.just(""), st.text(max_size=30).map(lambda t: f" ({t})")),
        st.one_of(st.just(""), st.integers().map(lambda n: f" endpos={n}")),
    ),
)


@given(lines)
def test_reply_parser_never_raises_anything_else(line: str) -> None:
    try:
        reply = parse_reply_line(line)
    except AgiError:
        return
    assert 0 <= reply.code <= 999


@given(st.lists(lines, max_size=20))
def test_assembler_never_raises_anything_else(feed: list[str]) -> None:
    assembler = ReplyAssembler()
    try:
        for line in feed:
            assembler.feed(line)
    except AgiError:
        pass


@given(st.binary(max_size=2000))
def test_header_block_parser_never_raises_anything_else(data: bytes) -> None:
    try:
        env = parse_header_block(data)
    except AgiError:
        return
    assert all(k.startswith("agi_") for k in env)


def line_by_line(data: bytes, max_lines: int = 200) -> dict[str, str] | None:
    """The header block parser as it was (a partition, a match and a strip per line), for
    comparison; None where it raised."""
    import re

    text = data.decode("utf-8", errors="replace").replace("\x00", "")
    lines = text.split("\n")
    if len(lines) > max_lines:
        return None
    env: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep or not re.match(r"agi_[A-Za-z0-9_]+\Z", key):
            if not line.strip("\r"):
                continue
            return None
        if key not in env:
            env[key] = value.strip()
    return env


header_bytes = st.lists(
    st.one_of(
        st.builds(lambda k, v, sep: f"agi_{k}:{sep}{v}".encode(),
                  st.from_regex(r"[a-zA-Z0-9_]{0,6}", fullmatch=True),
                  st.text(max_size=12), st.sampled_from(["", " ", "\t", "  "])),
        st.sampled_from([b"", b"\r", b"\r\r", b"agi_x", b"agi-x: 1", b" agi_x: 1", b"agi_x :1",
                         b"agi_\xc3: 1", b"agi_x: \xff\x00 v\x0b\x1c", b"x: agi_y: 1"]),
        st.binary(max_size=10),
    ),
    max_size=12,
).map(b"\n".join)


@given(header_bytes, st.integers(1, 14))
def test_header_block_parser_answers_as_the_line_by_line_parser(
    data: bytes, max_lines: int
) -> None:
    try:
        env: dict[str, str] | None = parse_header_block(data, max_lines=max_lines)
    except AgiError:
        env = None
    assert env == line_by_line(data, max_lines)


@given(st.binary(max_size=3000))
async def test_header_reader_never_raises_anything_else(data: bytes) -> None:
    try:
        await read_from(data, limit=1024)
    except AgiError:
        return
    assert data.count(b"\n") >= 1


@given(st.lists(st.binary(max_size=300), max_size=10))
def test_ami_frame_reader_never_raises_anything_else(chunks: list[bytes]) -> None:
    reader = FrameReader(max_frame=2000)
    try:
        for chunk in chunks:
            for frame in reader.feed(chunk):
                assert isinstance(frame, dict)
    except AmiError:
        pass


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.binary(max_size=4000))
async def test_hostile_bytes_never_crash_the_listener(start_gateway: Any, data: bytes) -> None:
    gateway = await _shared_gateway(start_gateway)
    port = gateway.adapters["asterisk"].port
    call = await asyncio.wait_for(fake_call(port, data, send_eof_after_header=True), 10)
    assert call.closed_by_server
    ok = await fake_call(port, agi_fixture("sip_call.agi"))
    assert ok.variables["GATEWAY_STATUS"] == "OK"


_shared: dict[str, Any] = {"start": None, "gateway": None}


async def _shared_gateway(start_gateway: Any) -> Any:
    """One gateway for all examples of a test (the fixture object itself is the key, so a
    later test's fixture is never mistaken for this one)."""
    if _shared["start"] is not start_gateway:
        _shared["start"] = start_gateway
        _shared["gateway"] = await start_gateway(
            adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                                   "session_timeout": "1s"}},
            clock=FixedClock(),
        )
    return _shared["gateway"]


async def test_listener_serves_after_fuzzing(start_gateway: Any) -> None:
    gw = await start_gateway(
        adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0"}},
        clock=FixedClock(),
    )
    port = gw.adapters["asterisk"].port
    for junk in (b"\xff\xfe\x00" * 100, b"agi_network: yes\n" * 500, b"\n\n\n", b"HANGUP\n"):
        await fake_call(port, junk, send_eof_after_header=True)
    call = await fake_call(port, agi_fixture("sip_call.agi"))
    assert call.variables["GATEWAY_STATUS"] == "OK"


def _routing() -> Any:
    from gateway.channels.voice.adapter import AsteriskConfig

    return AsteriskConfig(languages={"12345": "zh"}, queues={"zh": "hotline-zh"})


header_values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40
) | st.sampled_from(["unknown", "", "<unknown>", "+8613800138000", "0755 2345 6789", "12345"])


@given(
    st.dictionaries(
        st.sampled_from(
            ["agi_uniqueid", "agi_callerid", "agi_calleridname", "agi_dnid", "agi_extension",
             "agi_rdnis", "agi_channel", "agi_context", "agi_accountcode"]
        ),
        header_values,
    )
)
def test_build_inbound_never_raises_anything_else(env: dict[str, str]) -> None:
    from gateway.channels.voice.intake import build_inbound, channel_variables, known

    try:
        inbound = build_inbound(env, adapter="asterisk", received_at=1, config=_routing())
    except ValueError:
        assert known(env.get("agi_uniqueid")) is None
        return
    assert inbound.channel == "voice"
    assert inbound.sender.address == "" or inbound.sender.address.lstrip("+").isdigit()
    names = [n for n, _ in channel_variables(None, recipient=inbound.recipient,
                                             language=inbound.language, config=_routing())]
    assert names == ["GATEWAY_CONTACT_ID", "GATEWAY_ANSWER_BY", "GATEWAY_QUEUE",
                     "GATEWAY_PRIORITY", "GATEWAY_STATUS"]


async def feed_in_chunks(data: bytes, cuts: list[int]) -> dict[str, str]:
    """Feed ``data`` split at ``cuts`` while the reader runs, as TCP may deliver it."""
    reader = asyncio.StreamReader(limit=64 * 1024)

    async def feed() -> None:
        last = 0
        for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
            reader.feed_data(data[last:cut])
            last = cut
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        return await read_header_block(reader)
    finally:
        await feeder


header_line = st.builds(
    lambda key, value: f"agi_{key}: {value}\n".encode(),
    st.from_regex(r"[a-z0-9_]{1,12}", fullmatch=True),
    st.text(alphabet=st.characters(blacklist_characters="\n\r\x00",
                                   blacklist_categories=("Cs",)), max_size=30),
)


@given(st.lists(header_line, max_size=30), st.lists(st.integers(0, 5000), max_size=8))
async def test_header_block_split_anywhere_reads_the_same(
    lines: list[bytes], cuts: list[int]
) -> None:
    block = b"".join(lines) + b"\n"
    expected = parse_header_block(block[:-1])
    assert await feed_in_chunks(block + b"200 result=1\n", cuts) == expected


@given(st.lists(header_line, max_size=10), st.lists(st.integers(0, 2000), max_size=8))
async def test_garbage_line_is_refused_wherever_the_split(
    lines: list[bytes], cuts: list[int]
) -> None:
    block = b"".join(lines) + b"GET / HTTP/1.1\n" + b"".join(lines) + b"\n"
    with pytest.raises(AgiError):
        await feed_in_chunks(block, cuts)


def test_sample_dialplan_fallback_keeps_the_gateway_routing() -> None:
    """Defect: with the gateway unreachable the sample dialplan sent an English-line caller to
    ``hotline``. Its [globals] must hold the routing the gateway would choose for the sample
    config of docs/channels/voice.md (languages 12345 zh, 12346 en; en -> hotline-en)."""
    import re
    from pathlib import Path

    from gateway.channels.voice.adapter import AsteriskConfig
    from gateway.channels.voice.intake import fallback_globals

    root = Path(__file__).resolve().parents[3]
    text = (root / "deploy/asterisk/extensions.conf").read_text()
    block = text.split("\n[globals]\n", 1)[1].split("\n[", 1)[0]
    found = dict(re.findall(r"^(FALLBACK_QUEUE|QUEUE_\d+)=(\S+)", block, re.M))
    config = AsteriskConfig(languages={"12345": "zh", "12346": "en"},
                            queues={"en": "hotline-en"})
    assert found == fallback_globals(config) == {
        "FALLBACK_QUEUE": "hotline", "QUEUE_12346": "hotline-en"
    }
    assert "${GLOBAL(QUEUE_${EXTEN})}" in text
    queues = (root / "deploy/asterisk/queues.conf").read_text()
    assert all(f"[{q}]" in queues for q in found.values())


def test_sample_queue_login_adds_nothing_from_a_channel_that_is_no_seat() -> None:
    """Defect (found live on Asterisk 22.10.1 with a Local channel): ``*45`` from a channel
    that is not a PJSIP endpoint added the Invalid member ``PJSIP/`` and played
    ``agent-loginok``. The codes now check the endpoint name before adding or removing."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "deploy/asterisk/extensions.conf").read_text()
    agents = text.split("\n[agents]\n", 1)[1].split("\n[", 1)[0]
    steps = [line.split("=>", 1)[1].strip() for line in agents.splitlines()
             if line.lstrip().startswith(("exten", "same"))]
    for code, app in (("*45", "AddQueueMember"), ("*46", "RemoveQueueMember")):
        at = steps.index(f"{code},1,Set(SEAT=${{CHANNEL(endpoint)}})")
        assert steps[at + 1] == 'n,GotoIf($["${SEAT}" = ""]?noseat,1)'
        assert steps[at + 2].startswith(f"n,{app}(") and "PJSIP/${SEAT}" in steps[at + 2]
    assert "${CHANNEL(endpoint)}" not in "".join(s for s in steps if "QueueMember" in s)
    assert any(s.startswith("noseat,1,Log(WARNING,") for s in steps)
    assert not any(";" in s for s in steps)  # a ';' would start a comment in extensions.conf
