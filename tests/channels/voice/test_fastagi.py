"""FastAGI: a fake Asterisk plays recorded header blocks over TCP into a running gateway."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.channels.voice.intake import mset_argument
from gateway.contact.clock import FixedClock
from gateway.records import Contact
from gateway.server.runtime import Gateway
from gateway.testing import eventually
from tests.channels.voice.fakes import agi_fixture, asterisk_reply, fake_call

T0 = 1_795_594_483_000_000


async def start_voice(
    start_gateway: Any, clock: FixedClock | None = None, **config: Any
) -> Gateway:
    table = {
        "type": "asterisk",
        "agi_listen": "127.0.0.1:0",
        "languages": {"12345": "zh", "12346": "en"},
        "queues": {"en": "hotline-en", "12399": "special"},
        "settle": "0s",
        "linkedid_lookup": True,
        **config,
    }
    return await start_gateway(adapters={"asterisk": table}, clock=clock or FixedClock(T0))  # type: ignore[no-any-return]


def agi_port(gw: Gateway) -> int:
    return gw.adapters["asterisk"].port  # type: ignore[attr-defined,no-any-return]


async def one_contact(gw: Gateway) -> Contact:
    contacts = await gw.read_contacts()
    assert len(contacts) == 1
    return contacts[0]


@dataclass
class HeaderCase:
    label: str
    fixture: str
    address: str
    name: str | None
    recipient: str
    language: str | None
    queue: str
    external_id: str


CASES = [
    HeaderCase("SIP call", "sip_call.agi", "+8613800138000", "Test Caller", "12345", "zh",
               "hotline", "1795594483.1"),
    HeaderCase("Local channel, query string and arguments", "local_query_args.agi", "+865551234",
               "Test Caller", "12345", "zh", "hotline", "1795594483.2"),
    HeaderCase("caller id unknown", "unknown_caller.agi", "", None, "12345", "zh", "hotline",
               "1795594483.3"),
    HeaderCase("caller id empty, English seat", "empty_caller.agi", "", None, "12346", "en",
               "hotline-en", "1795594483.4"),
    HeaderCase("non-ASCII caller name", "non_ascii_name.agi", "+8613912345678", "张三 (市民)",
               "12345", "zh", "hotline", "1795594483.5"),
    HeaderCase("caller name not UTF-8", "latin1_name.agi", "+8675523456789", "Jos\ufffd",
               "12345", "zh", "hotline", "1795594483.6"),
    HeaderCase("fields missing", "missing_fields.agi", "", None, "12345", "zh", "hotline",
               "1795594483.7"),
]


async def test_calls_are_not_kept_in_memory_when_no_ami_follows_them(start_gateway: Any) -> None:
    """Without ``[ami]`` nothing ever ends a call the tracker is given (no Hangup event, no
    sweep: both belong to the AMI follower), and every FastAGI call was kept in its memory for
    good: the gateway's RSS grew about 1 KB a call in the mixed soak (bench/soak_mixed.py)."""
    gw = await start_voice(start_gateway)
    for n in range(20):
        header = agi_fixture("sip_call.agi").replace(b"1795594483.1", f"9{n}.1".encode())
        call = await fake_call(agi_port(gw), header)
        assert call.variables["GATEWAY_STATUS"] == "OK"
    assert len(await gw.read_contacts()) == 20
    assert gw.adapters["asterisk"].tracker.calls == {}  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
async def test_header_blocks_become_voice_contacts(start_gateway: Any, case: HeaderCase) -> None:
    gw = await start_voice(start_gateway)
    call = await fake_call(agi_port(gw), agi_fixture(case.fixture))

    assert call.closed_by_server
    assert not call.stalled
    contact = await one_contact(gw)
    assert contact.channel == "voice"
    assert contact.adapter == "asterisk"
    assert contact.external_id == case.external_id
    assert contact.sender.address == case.address
    assert contact.sender.name == case.name
    assert contact.recipient == case.recipient
    assert contact.language == case.language
    assert contact.received_at == T0
    assert contact.deadline.kind == "answer"
    assert contact.deadline.due_at == T0 + 15_000_000
    assert contact.meta["uniqueid"] == case.external_id
    assert contact.meta["linkedid"] == "1795594483.0"
    assert call.variables == {
        "GATEWAY_CONTACT_ID": contact.id,
        "GATEWAY_ANSWER_BY": str(T0 // 1_000_000 + 15),
        "GATEWAY_QUEUE": case.queue,
        "GATEWAY_PRIORITY": "0",
        "GATEWAY_STATUS": "OK",
    }


async def test_query_and_arguments_reach_the_script(start_gateway: Any) -> None:
    gw = await start_voice(start_gateway)
    await fake_call(agi_port(gw), agi_fixture("local_query_args.agi"))
    contact = await one_contact(gw)
    assert contact.meta["args"] == ["first arg", "second"]
    assert contact.meta["query"] == {"source": "test"}
    assert contact.meta["channel"] == "Local/12345@intake-00000000;2"
    assert contact.meta["context"] == "intake"


async def test_rerun_of_the_same_call_is_one_contact_and_a_repeat_caller_is_raised(
    start_gateway: Any,
) -> None:
    clock = FixedClock(T0)
    gw = await start_voice(start_gateway, clock)
    first = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert first.variables["GATEWAY_PRIORITY"] == "0"
    clock.advance(60)
    again = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert again.variables["GATEWAY_CONTACT_ID"] == first.variables["GATEWAY_CONTACT_ID"]
    assert again.variables["GATEWAY_STATUS"] == "OK"
    assert len(await gw.read_contacts()) == 1

    later = agi_fixture("sip_call.agi").replace(b"1795594483.1\n", b"1795594999.1\n")
    repeat = await fake_call(agi_port(gw), later)
    assert repeat.variables["GATEWAY_PRIORITY"] == "5"
    assert repeat.variables["GATEWAY_CONTACT_ID"] != first.variables["GATEWAY_CONTACT_ID"]


async def test_hangup_while_a_reply_is_awaited_is_not_taken_as_the_reply(
    start_gateway: Any,
) -> None:
    gw = await start_voice(start_gateway)

    def script(index: int, argv: list[str]) -> bytes:
        if index == 0:  # the caller hangs up while GET VARIABLE is on its way
            return b"HANGUP\n" + asterisk_reply(argv, "1795594483.77")
        return asterisk_reply(argv)

    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"), script)
    contact = await one_contact(gw)
    assert contact.meta["linkedid"] == "1795594483.77"
    assert call.variables["GATEWAY_STATUS"] == "OK"
    assert call.variables["GATEWAY_CONTACT_ID"] == contact.id
    assert call.closed_by_server


async def test_two_hangups_then_eof_still_records_the_call(start_gateway: Any) -> None:
    gw = await start_voice(start_gateway)

    def script(index: int, argv: list[str]) -> bytes | None:
        return b"HANGUP\nHANGUP\n" if index == 0 else None

    reader, writer = await asyncio.open_connection("127.0.0.1", agi_port(gw))
    writer.write(agi_fixture("sip_call.agi"))
    await reader.readline()  # GET VARIABLE
    writer.write(script(0, []) or b"")
    writer.close()  # AGIEXITONHANGUP: Asterisk leaves the AGI and closes
    await writer.wait_closed()

    found = await eventually(gw.read_contacts)
    assert [c.external_id for c in found] == ["1795594483.1"]


async def test_multi_line_520_and_510_replies_keep_the_dialogue_in_step(
    start_gateway: Any,
) -> None:
    gw = await start_voice(start_gateway, set_with="set_variable")

    def script(index: int, argv: list[str]) -> bytes:
        if index == 0:
            return b"510 Invalid or unknown command\n"
        if index == 1:
            return (
                b"520-Invalid command syntax.  Proper usage follows:\n"
                b"Usage: SET VARIABLE <variablename> <value>\n"
                b" Sets a variable to the current channel.\n"
                b"520 End of proper usage.\n"
            )
        return asterisk_reply(argv)

    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"), script)
    assert len(call.commands) == 6
    assert call.commands[0] == ["GET", "VARIABLE", "CHANNEL(linkedid)"]
    assert call.variables["GATEWAY_STATUS"] == "OK"
    assert "linkedid" not in (await one_contact(gw)).meta


@pytest.mark.parametrize(
    "fixture", ["garbage.agi", "overlong_line.agi", "unknown_script.agi", "no_uniqueid.agi"]
)
async def test_unusable_sessions_are_closed_without_a_contact(
    start_gateway: Any, fixture: str
) -> None:
    gw = await start_voice(start_gateway)
    call = await fake_call(agi_port(gw), agi_fixture(fixture))
    assert call.closed_by_server
    if fixture == "no_uniqueid.agi":  # a call all the same: it still goes to the queue
        assert call.variables["GATEWAY_STATUS"] == "FAILED"
        assert call.variables["GATEWAY_QUEUE"] == "hotline"
    else:
        assert call.commands == []
    assert await gw.read_contacts() == []
    # and the listener still serves the next call
    ok = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert ok.variables["GATEWAY_STATUS"] == "OK"


async def test_a_peer_that_connects_and_closes(start_gateway: Any) -> None:
    gw = await start_voice(start_gateway)
    call = await fake_call(agi_port(gw), b"", send_eof_after_header=True)
    assert call.closed_by_server and call.commands == []
    call = await fake_call(
        agi_port(gw), agi_fixture("no_empty_line.agi"), send_eof_after_header=True
    )
    assert call.closed_by_server and call.commands == []
    assert await gw.read_contacts() == []


async def test_a_peer_that_never_sends_the_empty_line_is_cut_off(start_gateway: Any) -> None:
    gw = await start_voice(start_gateway, session_timeout="300ms")
    stalled = asyncio.create_task(fake_call(agi_port(gw), agi_fixture("no_empty_line.agi")))
    # other calls are served meanwhile
    ok = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert ok.variables["GATEWAY_STATUS"] == "OK"
    call = await asyncio.wait_for(stalled, 10)
    assert call.closed_by_server and call.commands == []
    assert len(await gw.read_contacts()) == 1


async def test_redis_down_spools_and_says_so(start_gateway: Any) -> None:
    gw = await start_gateway(
        adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0"}},
        url="redis://127.0.0.1:1",
        clock=FixedClock(T0),
    )
    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert call.variables["GATEWAY_STATUS"] == "SPOOLED"
    assert call.variables["GATEWAY_CONTACT_ID"]
    assert call.variables["GATEWAY_ANSWER_BY"] == str(T0 // 1_000_000 + 15)
    assert call.closed_by_server


async def test_with_set_variable_the_session_is_five_set_variables_one_at_a_time(
    start_gateway: Any,
) -> None:
    gw = await start_voice(start_gateway, linkedid_lookup=False, set_with="set_variable")
    seen: list[int] = []

    def script(index: int, argv: list[str]) -> bytes:
        seen.append(index)
        return b"HANGUP\n" + asterisk_reply(argv) if index == 0 else asterisk_reply(argv)

    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"), script)
    assert not call.stalled
    assert [c[:2] for c in call.commands] == [["SET", "VARIABLE"]] * 5
    assert call.variables["GATEWAY_STATUS"] == "OK"
    contact = await one_contact(gw)
    assert "linkedid" not in contact.meta
    query = agi_fixture("sip_call.agi").replace(
        b"agi_network_script: intake\n",
        b"agi_network_script: intake?linkedid=1795594483.42\n",
    ).replace(b"1795594483.1\n", b"1795594483.43\n")
    await fake_call(agi_port(gw), query)
    second = (await gw.read_contacts())[1]
    assert second.meta["linkedid"] == "1795594483.42"


async def test_neither_redis_nor_spool_still_sends_the_call_to_the_queue(
    start_gateway: Any, tmp_path: Any
) -> None:
    data_dir = tmp_path / "down"
    gw = await start_gateway(
        adapters={"asterisk": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                               "queues": {"12345": "hotline-zh"}}},
        data_dir=data_dir,
        url=f"unix://{tmp_path}/no-redis.sock",
        clock=FixedClock(T0),
    )
    spool = data_dir / "spool"
    for child in sorted(spool.rglob("*"), reverse=True):
        child.unlink() if child.is_file() else child.rmdir()
    spool.rmdir()
    spool.write_bytes(b"not a folder")  # the spool cannot take anything now
    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert call.closed_by_server
    assert call.variables == {
        "GATEWAY_CONTACT_ID": "",
        "GATEWAY_ANSWER_BY": "",
        "GATEWAY_QUEUE": "hotline-zh",
        "GATEWAY_PRIORITY": "0",
        "GATEWAY_STATUS": "FAILED",
    }


async def test_the_fake_asterisk_stalls_on_pipelined_commands_as_asterisk_does() -> None:
    """Guards the fake itself: two commands in one write are never both answered."""

    async def pipelining(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (await reader.readline()) not in (b"\n", b""):
            pass
        writer.write(b'SET VARIABLE "A" "1"\nSET VARIABLE "B" "2"\n')
        await writer.drain()
        await asyncio.sleep(0.2)  # Asterisk would wait forever; the server gives up
        writer.close()

    server = await asyncio.start_server(pipelining, "127.0.0.1", 0)
    try:
        call = await fake_call(server.sockets[0].getsockname()[1], agi_fixture("sip_call.agi"))
    finally:
        server.close()
    assert call.stalled
    assert call.variables == {"A": "1"}


async def test_mset_sets_all_five_in_one_command(start_gateway: Any) -> None:
    gw = await start_voice(start_gateway, set_with="mset", linkedid_lookup=False)
    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    contact = await one_contact(gw)
    assert len(call.commands) == 1
    assert call.commands[0][:2] == ["EXEC", "MSet"]
    assert call.variables == {
        "GATEWAY_CONTACT_ID": contact.id,
        "GATEWAY_ANSWER_BY": str(T0 // 1_000_000 + 15),
        "GATEWAY_QUEUE": "hotline",
        "GATEWAY_PRIORITY": "0",
        "GATEWAY_STATUS": "OK",
    }


async def test_mset_falls_back_to_set_variable(start_gateway: Any) -> None:
    gw = await start_voice(
        start_gateway, set_with="mset", linkedid_lookup=False, queues={"12346": "hot $line"}
    )

    def no_mset(index: int, argv: list[str]) -> bytes:
        return b"200 result=-2\n" if argv[0] == "EXEC" else asterisk_reply(argv)

    refused = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"), no_mset)
    assert [c[0] for c in refused.commands] == ["EXEC"] + ["SET"] * 5
    assert refused.variables["GATEWAY_STATUS"] == "OK"
    # a value with "$" never goes through MSet (AGIEXECFULL would expand it)
    unsafe = await fake_call(agi_port(gw), agi_fixture("empty_caller.agi"))
    assert [c[0] for c in unsafe.commands] == ["SET"] * 5
    assert unsafe.variables["GATEWAY_QUEUE"] == "hot $line"


async def test_values_too_long_for_one_mset_line_are_set_one_by_one(start_gateway: Any) -> None:
    """Defect: the MSet line over res_agi's 8192 bytes raised in the session, which closed
    with no variable set (the call took the fail path although its contact was stored)."""
    long_name = "q" * 8100  # fits a SET VARIABLE line, not the MSet line
    gw = await start_voice(start_gateway, linkedid_lookup=False, queues={"12346": long_name})
    call = await fake_call(agi_port(gw), agi_fixture("empty_caller.agi"))
    assert [c[:2] for c in call.commands] == [["SET", "VARIABLE"]] * 5
    assert call.variables["GATEWAY_QUEUE"] == long_name
    assert call.variables["GATEWAY_STATUS"] == "OK"
    assert mset_argument([(f"V{i}", "") for i in range(98)]) is not None
    assert mset_argument([(f"V{i}", "") for i in range(99)]) is None  # the 99th unparsed


async def test_mset_is_the_default_and_carries_any_queue_name(start_gateway: Any) -> None:
    """Commas, quotes, backslashes, brackets and blanks in a value go through the one MSet,
    escaped as MSet's argument parser reads them (the fake splits as main/app.c does; the
    live check is test_live_captures.py)."""
    name = 'hot,line "2" (a)[b]\\c 热线'
    gw = await start_voice(start_gateway, linkedid_lookup=False, queues={"12346": name})
    call = await fake_call(agi_port(gw), agi_fixture("empty_caller.agi"))
    assert [c[:2] for c in call.commands] == [["EXEC", "MSet"]]
    assert call.variables["GATEWAY_QUEUE"] == name
    assert call.variables["GATEWAY_STATUS"] == "OK"


async def test_logs_carry_no_full_phone_number(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG, logger="gateway")
    gw = await start_voice(start_gateway)
    await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    await fake_call(agi_port(gw), agi_fixture("no_uniqueid.agi"))
    await fake_call(agi_port(gw), agi_fixture("garbage.agi"))
    assert "1795594483.1" in caplog.text  # the call was logged ...
    assert "13800138000" not in caplog.text  # ... without the caller's number
    assert "Test Caller" not in caplog.text


@pytest.mark.parametrize(("allow", "served"), [(["10.0.0.0/8"], False), (["127.0.0.1"], True)])
async def test_agi_allow_list(start_gateway: Any, allow: list[str], served: bool) -> None:
    gw = await start_voice(start_gateway, agi_allow=allow)
    call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    assert call.closed_by_server
    assert bool(call.variables) is served
    assert len(await gw.read_contacts()) == (1 if served else 0)


async def test_agi_allow_list_is_checked_at_start(start_gateway: Any) -> None:
    from gateway.server.config import ConfigError

    with pytest.raises(ConfigError, match=r"adapters.asterisk.agi_allow\[1\]"):
        await start_voice(start_gateway, agi_allow=["10.0.0.0/8", "not-a-network"])


async def test_an_intake_slower_than_intake_timeout_gives_failed_in_time(
    start_gateway: Any,
) -> None:
    """Redis holds the write (``CLIENT PAUSE WRITE``) longer than ``intake_timeout``: the call
    is answered ``FAILED`` (queued all the same) once the bound has passed, kept by the
    server's sweep (``AgiSession.within``), not after the write's own, longer, deadline (the
    harness's 5 s ``write_timeout``, which would give ``SPOOLED``)."""
    gw = await start_voice(start_gateway, intake_timeout="300ms", linkedid_lookup=False)
    await gw.redis.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
    try:
        call = await fake_call(agi_port(gw), agi_fixture("sip_call.agi"))
    finally:
        await gw.redis.execute_command("CLIENT", "UNPAUSE")
    assert call.closed_by_server
    assert call.variables["GATEWAY_STATUS"] == "FAILED"
    assert call.variables["GATEWAY_QUEUE"] == "hotline"
    # the write the caller gave up on still lands: the call has its contact all the same
    async def written() -> bool:
        return len(await gw.read_contacts()) == 1

    await eventually(written)


async def test_a_peer_that_floods_while_its_script_runs_is_not_read_on() -> None:
    """Bytes a peer sends while the script is busy (here: waiting on an event, as on Intake)
    wait unread, and the connection stops reading from the socket once 128 KiB are unread:
    a peer cannot make the server hold its flood. The session then goes on as usual."""
    from gateway.channels.voice.server import _HIGH_WATER, AgiSession, FastAgiServer
    from gateway.contact.clock import SYSTEM_CLOCK

    busy = asyncio.Event()
    go_on = asyncio.Event()
    seen: list[str] = []

    async def handler(session: AgiSession) -> None:
        busy.set()
        await go_on.wait()
        seen.append(session.env["agi_uniqueid"])

    server = FastAgiServer({"intake": handler}, "127.0.0.1", 0, SYSTEM_CLOCK)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(agi_fixture("sip_call.agi"))
        await busy.wait()
        chunk = b"x" * 65536
        sent = 0
        while sent < 64 * 1024 * 1024:  # until the socket buffers are full: drain blocks
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break
            sent += len(chunk)
        assert sent < 64 * 1024 * 1024  # the server stopped reading
        (conn,) = server._sessions.values()
        assert len(conn.buffer) <= _HIGH_WATER + 65536
        go_on.set()
        try:  # the handler returned: closed (reset, with our flood unread)
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
        writer.close()
    finally:
        await server.stop()
    assert seen == ["1795594483.1"]
