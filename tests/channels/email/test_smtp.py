"""The SMTP listener end to end: real clients (smtplib, aiosmtplib) over sockets, real Redis."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import smtplib
import socket
import ssl
import threading
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.config import ConfigError
from gateway.testing import eventually
from tests.channels.email.conftest import FIXTURES, MAILBOX
from tests.channels.email.test_normalize import CASES

QUEUED = re.compile(rb"^2\.0\.0 OK queued as ([0-9a-f-]{36})$")


def send(port: int, raw: bytes, *, mail_from: str = "citizen@example.org",
         rcpt: tuple[str, ...] = (MAILBOX,)) -> str:
    """Send one message with smtplib; return the contact id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.example.org")
        client.mail(mail_from)
        for r in rcpt:
            code, _ = client.rcpt(r)
            assert code == 250
        code, reply = client.data(raw)
    assert code == 250, reply
    match = QUEUED.match(reply)
    assert match, reply
    return match.group(1).decode()


async def test_whole_corpus_over_one_connection(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port

    def send_all() -> dict[str, str]:
        ids = {}
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            for case in CASES:
                raw = (FIXTURES / case.file).read_bytes()
                client.mail("citizen@example.org")
                client.rcpt(MAILBOX)
                code, reply = client.data(raw)
                assert code == 250, (case.file, reply)
                ids[case.file] = QUEUED.match(reply).group(1).decode()
        return ids

    ids = await asyncio.to_thread(send_all)
    hostname = gw.adapters["mail"].listener.hostname
    contacts = {c.id: c for c in await gw.read_contacts()}
    assert len(contacts) == len(CASES)
    for case in CASES:
        contact = contacts[ids[case.file]]
        assert contact.channel == "email" and contact.adapter == "mail"
        assert contact.subject == case.subject
        assert contact.text == case.text
        assert contact.sender.address == case.sender
        assert contact.recipient == MAILBOX
        assert contact.deadline.policy == "email_response"
        assert contact.deadline.due_at - contact.received_at == 24 * 3600 * 1_000_000
        assert [a.name for a in contact.attachments] == [name for name, _ in case.files]
        for a in contact.attachments:
            assert hashlib.sha256(await gw.attachments.load(a.sha256)).hexdigest() == a.sha256
        raw = await gw.attachments.load(contact.meta["raw"]["sha256"])
        trace, _, received = raw.partition(b"Return-Path: <citizen@example.org>\r\nReceived")
        assert trace == b"" and received.startswith(b": from client.example.org ([127.0.0.1])")
        assert f"by {hostname} with ESMTP; ".encode() in received.split(b"\r\n", 2)[1]
        assert raw.rstrip(b"\r\n").endswith((FIXTURES / case.file).read_bytes().rstrip(b"\r\n"))
        assert contact.meta["smtp"]["rcpt_to"] == [MAILBOX]
        assert contact.meta["smtp"]["helo"]


async def test_only_configured_mailboxes_and_domains_never_a_relay(start_mailbox):
    gw = await start_mailbox(domains=["mayor.example.gov.cn"])
    port = gw.adapters["mail"].port

    def session() -> list[int]:
        codes = []
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("spammer@example.net")
            for rcpt in ("victim@example.net", "12345@hotline.example.gov.cn.evil.example",
                         "12345@other.example.gov.cn", "someone@mayor.example.gov.cn",
                         "12345+anything@hotline.example.gov.cn", "<12345@HOTLINE.example.gov.cn>"):
                codes.append(client.rcpt(rcpt)[0])
            client.rset()
            client.mail("spammer@example.net")
            codes.append(client.rcpt("victim@example.net")[0])
            codes.append(client.docmd("DATA")[0])
        return codes

    assert await asyncio.to_thread(session) == [550, 550, 550, 250, 250, 250, 550, 503]
    assert await gw.read_contacts() == []


async def test_size_advertised_and_enforced(start_mailbox):
    gw = await start_mailbox(max_message_size=100_000)
    port = gw.adapters["mail"].port
    big = b"From: citizen@example.org\r\nSubject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 2000

    def session() -> tuple[str, int, int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            size = client.esmtp_features["size"]
            declared = client.mail("citizen@example.org", ["SIZE=200000"])[0]
            client.rset()
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            too_much = client.data(big)[0]
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            fine = client.data((FIXTURES / "plain.eml").read_bytes())[0]
        return size, declared, too_much, fine

    assert await asyncio.to_thread(session) == ("100000", 552, 552, 250)
    assert len(await gw.read_contacts()) == 1


async def test_recipient_bound(start_mailbox):
    gw = await start_mailbox(max_recipients=2, domains=["hotline.example.gov.cn"])
    port = gw.adapters["mail"].port

    def session() -> list[int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("citizen@example.org")
            return [client.rcpt(f"box{i}@hotline.example.gov.cn")[0] for i in range(3)]

    assert await asyncio.to_thread(session) == [250, 250, 452]


async def test_line_length_bound_and_the_session_goes_on(start_mailbox):
    gw = await start_mailbox(max_line_length=1000)
    port = gw.adapters["mail"].port
    long_line = b"From: citizen@example.org\r\nSubject: long\r\n\r\n" + b"y" * 5000 + b"\r\n"

    def session() -> tuple[int, int]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            refused = client.data(long_line)[0]
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            return refused, client.data((FIXTURES / "plain.eml").read_bytes())[0]

    assert await asyncio.to_thread(session) == (500, 250)


async def test_twenty_megabyte_attachment_with_aiosmtplib(start_mailbox):
    gw = await start_mailbox(
        max_message_size=32 * 1024 * 1024,
        sections={"intake": {"max_attachment": 40 * 1024 * 1024}},
    )
    data = hashlib.sha512(b"20MB").digest() * (20 * 1024 * 1024 // 64)
    msg = EmailMessage()
    msg["From"] = "citizen@example.org"
    msg["To"] = MAILBOX
    msg["Subject"] = "现场视频"
    msg["Message-ID"] = "<video-1@example.org>"
    msg.set_content("视频见附件。")
    msg.add_attachment(data, maintype="video", subtype="mp4", filename="现场.mp4")
    errors, reply = await aiosmtplib.send(
        msg, hostname="127.0.0.1", port=gw.adapters["mail"].port, start_tls=False, timeout=120
    )
    assert errors == {}
    (contact,) = await gw.read_contacts()
    assert reply.endswith(contact.id)
    assert contact.subject == "现场视频" and contact.text == "视频见附件。"
    (video,) = contact.attachments
    assert (video.name, video.content_type, video.size) == ("现场.mp4", "video/mp4", len(data))
    assert video.sha256 == hashlib.sha256(data).hexdigest()
    assert gw.attachments.path_for(video.sha256).stat().st_size == len(data)
    assert contact.meta["raw"]["size"] > len(data) * 4 // 3


def test_message_size_beyond_the_attachment_store_is_a_config_error(tmp_path):
    """The rule needs [intake]: it is the channel type's check, run by the one validation."""
    from gateway.channels.email.common import EmailConfig
    from gateway.server.config import load_table
    from tests.harness import settings_for

    with pytest.raises(ConfigError, match="max_attachment") as info:
        settings_for(
            tmp_path, "unix:///nowhere", "p",
            adapters={"mail": {"type": "smtp", "mailboxes": [MAILBOX],
                               "max_message_size": 50_000_000}},
        )
    assert info.value.errors[0][0] == "adapters.mail.max_message_size"
    with pytest.raises(ConfigError, match="never an open relay"):
        load_table(EmailConfig, {}).check("adapters.mail")


async def test_resending_the_same_message_makes_one_contact(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port
    plain = (FIXTURES / "plain.eml").read_bytes()
    no_id = (FIXTURES / "no_message_id.eml").read_bytes()
    via_other_relay = b"Received: from backup-mx by gw; Thu, 26 Nov 2026 00:00:00 +0000\r\n" + no_id
    first = await asyncio.to_thread(send, port, plain)
    again = await asyncio.to_thread(send, port, plain)
    third = await asyncio.to_thread(send, port, no_id)
    fourth = await asyncio.to_thread(send, port, via_other_relay)
    assert first == again and third == fourth and first != third
    contacts = await gw.read_contacts()
    assert sorted(c.id for c in contacts) == sorted({first, third})


async def test_unparseable_message_is_kept_flagged_and_the_next_one_flows(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port
    nest = b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n'
    hostile = b"From: citizen@example.org\r\n" + b"".join(nest % (i, i) for i in range(3000))

    def session() -> list[bytes]:
        replies = []
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as client:
            client.ehlo("client.example.org")
            for raw in (hostile, (FIXTURES / "plain.eml").read_bytes(), hostile):
                client.mail("citizen@example.org")
                client.rcpt(MAILBOX)
                code, reply = client.data(raw)
                assert code == 250
                replies.append(reply)
        return replies

    first, _, resent = await asyncio.to_thread(session)
    assert first == resent  # the resend of an unparseable message is the same contact
    flagged, good = await gw.read_contacts()
    assert flagged.meta["parse_error"].startswith("RecursionError")
    assert [a.name for a in flagged.attachments] == ["message.eml"]
    assert hostile[:200] in await gw.attachments.load(flagged.attachments[0].sha256)
    assert flagged.sender.address == "citizen@example.org"
    assert good.subject == "Streetlight broken on Renmin Road"


async def test_redis_stopped_mail_is_spooled_then_replayed(start_mailbox, own_redis_server):
    gw = await start_mailbox(
        sections={"url": own_redis_server.url, "redis": {"write_timeout": "300ms"}}
    )
    port = gw.adapters["mail"].port
    own_redis_server.stop_sync()
    raw = (FIXTURES / "gbk_as_gb2312.eml").read_bytes()
    contact_id = await asyncio.to_thread(send, port, raw)
    assert gw.spool.depth == 1
    # Redis away: nothing can be held there, so the raw file was written before the 250
    files = [p for p in gw.attachments.root.glob("??/*") if len(p.name) == 64]
    assert any(p.read_bytes().endswith(raw) for p in files)
    again = await asyncio.to_thread(send, port, (FIXTURES / "gbk_as_gb2312.eml").read_bytes())
    assert again == contact_id
    own_redis_server.start_sync()

    async def replayed() -> bool:
        return gw.spool.depth == 0 and gw.intake.redis_up

    assert await eventually(replayed)
    (contact,) = await gw.read_contacts()
    assert contact.id == contact_id and contact.subject == "关于镕园路积水"
    assert contact.enqueued_at > contact.received_at


async def test_neither_redis_nor_spool_answers_451(start_mailbox, own_redis_server):
    gw = await start_mailbox(
        sections={"url": own_redis_server.url, "redis": {"write_timeout": "200ms"}}
    )
    port = gw.adapters["mail"].port
    own_redis_server.stop_sync()
    gw.spool.dir.rename(gw.spool.dir.with_name("gone"))
    gw.spool.dir.write_text("a file where the spool folder was")
    await gw.spool.rotate()

    def session() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            return client.data((FIXTURES / "plain.eml").read_bytes())

    code, reply = await asyncio.to_thread(session)
    assert code == 451 and b"try again later" in reply


async def test_starttls_required_when_configured(start_mailbox, certificate):
    cert, key = certificate
    gw = await start_mailbox(tls_cert=str(cert), tls_key=str(key), require_tls=True)
    port = gw.adapters["mail"].port
    context = ssl.create_default_context(cafile=str(cert))

    def session() -> tuple[bool, int, str]:
        with smtplib.SMTP("localhost", port, timeout=30) as client:
            client.ehlo("client.example.org")
            offered = client.has_extn("starttls")
            refused = client.mail("citizen@example.org")[0]
            client.starttls(context=context)
            client.ehlo("client.example.org")
            cipher = client.sock.cipher()[1]  # type: ignore[union-attr]
            client.mail("citizen@example.org")
            client.rcpt(MAILBOX)
            code, _ = client.data((FIXTURES / "plain.eml").read_bytes())
            assert code == 250
            return offered, refused, cipher

    offered, refused, cipher = await asyncio.to_thread(session)
    assert offered and refused == 530 and cipher.startswith("TLS")
    (contact,) = await gw.read_contacts()
    assert b" with ESMTPS; " in (await gw.attachments.load(contact.meta["raw"]["sha256"]))[:300]


async def test_pipelined_commands_are_answered_in_order(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port
    body = (FIXTURES / "plain.eml").read_bytes()

    def session() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"EHLO client.example.org\r\n")
            ehlo = [f.readline()]
            while ehlo[-1][3:4] == b"-":
                ehlo.append(f.readline())
            sock.sendall(
                b"MAIL FROM:<citizen@example.org>\r\nRCPT TO:<nobody@example.net>\r\n"
                b"RCPT TO:<" + MAILBOX.encode() + b">\r\nDATA\r\n"
            )
            replies = [f.readline() for _ in range(4)]
            sock.sendall(body + b".\r\nQUIT\r\n")
            replies += [f.readline(), f.readline()]
            return [b"".join(ehlo), *replies]

    ehlo, mail, bad, good, data, queued, bye = await asyncio.to_thread(session)
    assert b"PIPELINING" in ehlo and b"8BITMIME" in ehlo and b"SMTPUTF8" in ehlo
    assert [r[:3] for r in (mail, bad, good, data, queued, bye)] == [
        b"250", b"550", b"250", b"354", b"250", b"221"
    ]
    assert len(await gw.read_contacts()) == 1


async def test_smtputf8_envelope(start_mailbox):
    gw = await start_mailbox(domains=["邮箱.example.cn"])
    msg = EmailMessage()
    msg["From"] = "市民 <市民@例子.cn>"
    msg["To"] = "市长@邮箱.example.cn"
    msg["Subject"] = "UTF-8 地址"
    msg.set_content("正文")
    errors, _ = await aiosmtplib.send(
        msg, hostname="127.0.0.1", port=gw.adapters["mail"].port, start_tls=False
    )
    assert errors == {}
    (contact,) = await gw.read_contacts()
    assert contact.sender.address == "市民@例子.cn" and contact.recipient == "市长@邮箱.example.cn"
    assert contact.subject == "UTF-8 地址" and contact.text == "正文"


def test_recipient_policy_compares_domains_in_one_form():
    from gateway.channels.email.smtp import Policy

    policy = Policy(("12345@hotline.example.gov.cn", "市长@邮箱.example.cn"), ("例子.cn",))
    assert policy.accepts("12345@HOTLINE.Example.gov.cn.")
    assert policy.accepts("12345+0196c8a4@hotline.example.gov.cn")
    assert policy.accepts("市长@xn--c0zu34b.example.cn")  # the same domain, as IDNA
    assert policy.accepts("anyone@xn--fsqu00a.cn") and policy.accepts("anyone@例子.cn")
    for other in ("12345@hotline.example.gov.cn.evil.example", "12345@example.gov.cn",
                  "other@hotline.example.gov.cn", "no-at-sign", "x@sub.例子.cn"):
        assert not policy.accepts(other), other
    # answers are remembered (the same recipients come again), within a bound
    from gateway.channels.email import smtp

    for n in range(2 * smtp._REMEMBERED):
        assert policy.accepts(f"{n}@例子.cn") and not policy.accepts(f"{n}@example.cn")
    assert len(policy._answers) <= smtp._REMEMBERED
    assert policy.accepts("12345@HOTLINE.Example.gov.cn.") and not policy.accepts("no-at-sign")


async def test_idle_and_session_time_bounds(start_mailbox):
    gw = await start_mailbox(idle_timeout="1s", max_session_time="2s")
    port = gw.adapters["mail"].port

    def idle() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            return f.read()  # until the server closes

    def busy() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            lines = []
            while True:
                sock.sendall(b"NOOP\r\n")
                line = f.readline()
                lines.append(line)
                if not line or line.startswith(b"421"):
                    return lines

    assert await asyncio.to_thread(idle) == b""
    lines = await asyncio.to_thread(busy)
    assert lines[-1].startswith(b"421 4.4.2") and all(x.startswith(b"250") for x in lines[:-1])


async def test_a_slow_message_is_not_idle(start_mailbox):
    gw = await start_mailbox(idle_timeout="2s")
    port = gw.adapters["mail"].port
    lines = (FIXTURES / "plain.eml").read_bytes().split(b"\r\n")

    def session() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            f = sock.makefile("rb")
            f.readline()
            sock.sendall(b"HELO client.example.org\r\nMAIL FROM:<citizen@example.org>\r\n"
                         b"RCPT TO:<" + MAILBOX.encode() + b">\r\nDATA\r\n")
            for _ in range(4):
                f.readline()
            for line in lines:  # one line every 0.3 s: 4 s in all, twice the idle timeout
                sock.sendall(line + b"\r\n")
                time.sleep(4 / len(lines))
            sock.sendall(b".\r\n")
            return f.readline()

    assert (await asyncio.to_thread(session)).startswith(b"250 2.0.0 OK queued as ")


async def test_listener_survives_garbage(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port
    reply_line = re.compile(rb"^[2-5]\d\d[ -]")
    commands = st.sampled_from([b"EHLO x", b"HELO", b"MAIL FROM:<a@b.c>", b"MAIL FROM:<>",
                                b"RCPT TO:<" + MAILBOX.encode() + b">", b"DATA", b"RSET",
                                b"STARTTLS", b"AUTH PLAIN AAAA", b"BDAT 10", b"VRFY x"])
    lines = st.lists(st.one_of(commands, st.binary(max_size=200)), max_size=10)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(lines)
    def garbage(sent: list[bytes]) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"".join(line + b"\r\n" for line in sent) + b"\r\n.\r\nQUIT\r\n")
            sock.shutdown(socket.SHUT_WR)
            received = sock.makefile("rb").read()
        for line in received.splitlines():
            assert reply_line.match(line), line

    await asyncio.to_thread(garbage)
    contact_id = await asyncio.to_thread(send, port, (FIXTURES / "plain.eml").read_bytes())
    assert contact_id in {c.id for c in await gw.read_contacts()}


async def test_arguments_the_parsers_trip_over_are_syntax_errors_not_451(start_mailbox):
    # found by tools/fuzz_campaign.py: the standard library's address parser raises IndexError
    # (not its HeaderParseError) on these, and aiosmtpd answered its catch-all 451 4.3.0, which
    # a client retries for ever
    gw = await start_mailbox()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.adapters["mail"].port)
    assert (await reader.readline()).startswith(b"220")

    async def command(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        while True:
            reply = await reader.readline()
            if reply[3:4] != b"-":
                return reply

    await command(b"EHLO client.example.org")
    # an unknown command holding a bare CR was echoed with it: one reply on two lines
    # (test_listener_survives_garbage, now and then)
    assert await command(b"x\r\x00") == b'500 Error: command "X?\x00" not recognized\r\n'
    # an echoed argument that is not UTF-8 failed to encode (campaign, 2 in 470,000 inputs)
    assert (await command(b"VRFY a\xff@")).startswith(b"502")
    assert (await command(b"MAIL FROM:<a@")).startswith(b"5")
    assert (await command(b"MAIL FROM:<citizen@example.org>")).startswith(b"250")
    assert (await command(b"RCPT TO:<")).startswith(b"5")
    assert (await command(b"RCPT TO:<12345@")).startswith(b"5")
    assert (await command(b"RCPT TO:<12345@[")).startswith(b"5")  # AttributeError, 5 in 1M
    assert (await command(b"RCPT TO:<" + MAILBOX.encode() + b">")).startswith(b"250")
    assert (await command(b"DATA")).startswith(b"354")
    assert (await command(b"Subject: x\r\n\r\nstill served\r\n.")).startswith(b"250")
    writer.close()
    assert [c.text for c in await gw.read_contacts()] == ["still served"]


def test_base64_fixture_really_is_base64():
    raw = (FIXTURES / "gbk_as_gb2312.eml").read_bytes()
    body = raw.split(b"\r\n\r\n", 1)[1]
    assert base64.b64decode(body).decode("gbk") == "朱镕基同志：小区堃园路积水严重。"


def test_deploy_sample_config_is_valid(monkeypatch):
    import tomllib

    from gateway.server.config import parse_settings

    monkeypatch.setenv("GATEWAY_SMTP_PASSWORD", "from-the-environment")
    path = Path(__file__).parents[3] / "deploy" / "email" / "gateway.toml"
    _, configs = parse_settings(tomllib.loads(path.read_text()), str(path))
    mailbox = configs["mailbox"]
    assert mailbox.mailboxes == ("12345@hotline.example.gov.cn",)
    assert mailbox.relay.password.reveal() == "from-the-environment"
    assert mailbox.ack.enabled


async def test_headers_with_bytes_that_are_not_utf8_are_taken_repaired(start_mailbox):
    gw = await start_mailbox()
    port = gw.adapters["mail"].port
    raw = (
        b"From: Zhang \xff San <citizen@example.org>\r\n"
        b"To: " + MAILBOX.encode() + b"\r\n"
        b"Subject: street light \xed\xa0\x80 broken\r\n"
        b"Message-ID: <bad\xff\xfe-id@example.org>\r\n"
        b"In-Reply-To: <older\xc3@example.org>\r\n"
        b"References: <first\xff@example.org> <older\xc3@example.org>\r\n"
        b"X-Odd: \x80\x81\r\n"
        b"\r\n"
        b"The light at gate 3 is out.\r\n"
    )
    first = await asyncio.to_thread(send, port, raw)
    again = await asyncio.to_thread(send, port, raw)  # an MTA's retry: the same contact
    assert again == first
    [contact] = await gw.read_contacts()
    assert contact.id == first and contact.text.startswith("The light at gate 3")
    assert contact.external_id.startswith("<bad") and contact.external_id.endswith("@example.org>")
    assert gw.intake.redis_up and gw.spool.depth == 0


async def test_250_waits_for_redis_not_for_the_disk(start_mailbox, aiohttp_client_session):
    """A small mail's 250 waits for one durable write, its raw message in Redis: with the
    attachment store's disk writes stalled the 250 still arrives, the consumer API serves the
    raw message from Redis, and once the disk answers the file is written and Redis let go."""
    from gateway.queueing.held import store_name

    gw = await start_mailbox()
    store = gw.attachments
    disk = threading.Event()
    write = store.put_many_sync

    def stalled(items: list[tuple[bytes, str, str]], **kw: bool) -> list[object]:  # disk stuck
        disk.wait()
        return write(items, **kw)

    store.put_many_sync = stalled  # type: ignore[method-assign]
    raw = (FIXTURES / CASES[0].file).read_bytes()
    try:
        contact_id = await asyncio.to_thread(send, gw.adapters["mail"].port, raw)
        (contact,) = [c for c in await gw.read_contacts() if c.id == contact_id]
        digest = contact.meta["raw"]["sha256"]
        assert not store.path_for(digest).exists()
        held = gw.keys.held_files(store_name(store.root))
        assert (await gw.redis.hget(held, digest)).endswith(raw)
        url = f"http://127.0.0.1:{gw.http_port}/v1/attachments/{digest}"
        async with aiohttp_client_session.get(url) as resp:
            assert resp.status == 200
            assert resp.content_type == "message/rfc822"
            served = await resp.read()
        assert hashlib.sha256(served).hexdigest() == digest and served.endswith(raw)
    finally:
        disk.set()

    async def written() -> bool:
        return store.path_for(digest).is_file() and not await gw.redis.hexists(held, digest)

    await eventually(written)
    assert store.read(digest) == served
    assert store.content_type(store.path_for(digest)) == "message/rfc822"


_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_PATH_PIECES = st.sampled_from(
    ["<", ">", "@", ".", " ", "\t", "(c)", '"', "\\", "\r", "\n", "ä", "[", "]", ":", ",",
     " SIZE=1000", " BODY=8BITMIME", "example.org", "ex-ample.ORG", "-x"]
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(
    local=st.text(alphabet=_ATEXT + ".", min_size=1, max_size=12),
    domain=st.text(alphabet="abc019-.", min_size=1, max_size=12),
    before=st.lists(_PATH_PIECES, max_size=2),
    after=st.lists(_PATH_PIECES, max_size=4),
    limit=st.sampled_from([0, 4]),
)
def test_plain_paths_are_read_as_the_standard_parser_reads_them(local, domain, before, after,
                                                                 limit):
    """The listener reads a plain ``<local@domain> PARAMS`` without the standard library's
    address parser (a third of a transaction's CPU): every path, plain or not, gives what
    aiosmtpd's own ``_getaddr`` gives (address, rest), or (None, None) where it raises."""
    from aiosmtpd.smtp import SMTP

    from gateway.channels.email.smtp import GatewaySMTP

    ours, theirs = object.__new__(GatewaySMTP), object.__new__(SMTP)
    ours.local_part_limit = theirs.local_part_limit = limit
    arg = "".join(before) + f"<{local}@{domain}>" + "".join(after)
    try:
        address, rest = SMTP._getaddr(theirs, arg)
        expected = (address, None if rest is None else str(rest))
    except Exception:
        expected = (None, None)
    assert ours._getaddr(arg) == expected
