"""Replies and acknowledgements out through a relay (a local aiosmtpd that records and scripts)."""

from __future__ import annotations

import asyncio
import email
import logging
import smtplib
from email import policy
from email.message import EmailMessage

from gateway.queueing.consumer import post_reply
from gateway.records import Attachment, Reply
from gateway.testing import eventually
from tests.channels.email.conftest import FIXTURES, MAILBOX
from tests.channels.email.test_smtp import send


def relay_table(recorder, **overrides) -> dict[str, object]:
    return {"host": "127.0.0.1", "port": recorder.port, "tls": "none", "backoff": "10ms",
            **overrides}


def parse(data: bytes) -> EmailMessage:
    return email.message_from_bytes(data, policy=policy.default)  # type: ignore[return-value]


async def test_reply_threads_under_the_citizens_message_and_stamps_responded(
    start_mailbox, start_recorder, redis_client, prefix
):
    recorder = await start_recorder()
    gw = await start_mailbox(relay=relay_table(recorder), reply_from="市长信箱 <" + MAILBOX + ">")
    port = gw.adapters["mail"].port
    contact_id = await asyncio.to_thread(send, port, (FIXTURES / "plain.eml").read_bytes())
    await post_reply(redis_client, Reply(contact_id, "您好，已派单处理。", id="r-1"), prefix=prefix)

    async def delivered() -> bool:
        return any(e.type == "responded" for e in await gw.read_events())

    assert await eventually(delivered)
    (sent,) = recorder.messages
    assert sent.mail_from == MAILBOX and sent.rcpt_tos == ["citizen@example.org"]
    msg = parse(sent.data)
    assert msg["To"] == "citizen@example.org"
    assert msg["From"].addresses[0].display_name == "市长信箱"
    assert msg["Subject"] == "Re: Streetlight broken on Renmin Road"
    assert msg["In-Reply-To"] == "<plain-1@example.org>"
    assert msg["References"] == "<plain-1@example.org>"
    assert msg["Reply-To"] == f"12345+{contact_id}@hotline.example.gov.cn"
    assert msg["Message-ID"].startswith(f"<reply.{contact_id}.")
    assert "Auto-Submitted" not in msg
    assert msg.get_content().strip() == "您好，已派单处理。"
    (responded,) = [e for e in await gw.read_events() if e.type == "responded"]
    assert responded.contact_id == contact_id and responded.met is True
    assert responded.detail["external_id"] == msg["Message-ID"]

    # The citizen answers: to the tagged Reply-To, In-Reply-To our Message-ID.
    answer = (
        b"From: citizen@example.org\r\nTo: " + msg["Reply-To"].encode() + b"\r\n"
        b"Subject: Re: Streetlight broken on Renmin Road\r\nMessage-ID: <answer-1@example.org>\r\n"
        b"In-Reply-To: " + msg["Message-ID"].encode() + b"\r\n\r\nThanks, still dark.\r\n"
    )
    answer_id = await asyncio.to_thread(send, port, answer, rcpt=(msg["Reply-To"],))
    answer_contact = next(c for c in await gw.read_contacts() if c.id == answer_id)
    assert answer_contact.thread == contact_id
    assert answer_contact.recipient == MAILBOX


async def test_reply_goes_to_reply_to_with_files(start_mailbox, start_recorder, redis_client,
                                                 prefix):
    recorder = await start_recorder()
    gw = await start_mailbox(relay=relay_table(recorder))
    port = gw.adapters["mail"].port
    contact_id = await asyncio.to_thread(send, port, (FIXTURES / "reply.eml").read_bytes())
    stored = await gw.attachments.put(b"%PDF-1.4 answer", "答复.pdf", "application/pdf")
    await post_reply(redis_client, Reply(contact_id, "见附件", (stored,)), prefix=prefix)

    async def delivered() -> bool:
        return bool(recorder.messages)

    assert await eventually(delivered)
    msg = parse(recorder.messages[0].data)
    assert recorder.messages[0].rcpt_tos == ["other@example.org"]
    assert msg["References"].split() == [
        "<plain-1@example.org>",
        "<reply.0196c8a4-1f2e-7a3b-8c4d-5e6f708192a3.k3j@hotline.example.gov.cn>",
        "<reply-1@example.org>",
    ]
    (attachment,) = list(msg.iter_attachments())
    assert attachment.get_filename() == "答复.pdf"
    assert attachment.get_content() == b"%PDF-1.4 answer"


async def test_relay_4xx_is_retried_with_backoff(start_mailbox, start_recorder, redis_client,
                                                 prefix):
    recorder = await start_recorder()
    recorder.script = ["451 4.3.0 Try again later", "421 4.3.2 Busy"]
    gw = await start_mailbox(relay=relay_table(recorder, attempts=3))
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    await post_reply(redis_client, Reply(contact_id, "ok"), prefix=prefix)

    async def delivered() -> bool:
        return any(e.type == "responded" for e in await gw.read_events())

    assert await eventually(delivered)
    assert recorder.attempts == 3 and len(recorder.messages) == 1
    assert not [e for e in await gw.read_events() if e.type == "failed"]


async def test_relay_5xx_is_a_failed_event(start_mailbox, start_recorder, redis_client, prefix):
    recorder = await start_recorder()
    recorder.script = ["554 5.7.1 Message rejected"]
    gw = await start_mailbox(relay=relay_table(recorder))
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    await post_reply(redis_client, Reply(contact_id, "ok", id="r-5"), prefix=prefix)

    async def failed() -> bool:
        return any(e.type == "failed" for e in await gw.read_events())

    assert await eventually(failed)
    (event,) = [e for e in await gw.read_events() if e.type == "failed"]
    assert event.contact_id == contact_id and "554" in event.detail["reason"]
    assert event.detail["reply_id"] == "r-5"
    assert recorder.attempts == 1 and recorder.messages == []
    assert not [e for e in await gw.read_events() if e.type == "responded"]


async def test_unreachable_relay_is_retryable_then_failed(start_mailbox, redis_client, prefix):
    gw = await start_mailbox(
        relay={"host": "127.0.0.1", "port": 9, "tls": "none", "attempts": 1, "timeout": "2s"},
        sections={"replies": {"max_attempts": 2, "backoff": "10ms"}},
    )
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    await post_reply(redis_client, Reply(contact_id, "ok"), prefix=prefix)

    async def failed() -> bool:
        return any(e.type == "failed" for e in await gw.read_events())

    assert await eventually(failed)
    (event,) = [e for e in await gw.read_events() if e.type == "failed"]
    assert "relay unavailable" in event.detail["reason"]


async def test_starttls_and_auth_to_the_relay(start_mailbox, start_recorder, certificate,
                                              redis_client, prefix):
    cert, key = certificate
    recorder = await start_recorder(tls=(cert, key), auth=True)
    gw = await start_mailbox(
        relay=relay_table(recorder, host="localhost", tls="starttls", username="gw",
                          password="s3cret", ca_file=str(cert)),
    )
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    await post_reply(redis_client, Reply(contact_id, "ok"), prefix=prefix)

    async def delivered() -> bool:
        return bool(recorder.messages)

    assert await eventually(delivered)
    assert recorder.messages[0].login == b"gw"


async def test_acknowledgement_once_never_to_machines(start_mailbox, start_recorder):
    recorder = await start_recorder()
    gw = await start_mailbox(
        relay=relay_table(recorder),
        ack={"enabled": True, "timezone": "Asia/Shanghai", "per_sender_limit": 2},
    )
    port = gw.adapters["mail"].port
    for name in ("auto_replied.eml", "bulk.eml"):
        await asyncio.to_thread(send, port, (FIXTURES / name).read_bytes())
    await asyncio.to_thread(send, port, (FIXTURES / "plain.eml").read_bytes(), mail_from="")
    first = await asyncio.to_thread(send, port, (FIXTURES / "alternative.eml").read_bytes())
    again = await asyncio.to_thread(send, port, (FIXTURES / "alternative.eml").read_bytes())
    assert first == again
    ours = (FIXTURES / "no_date.eml").read_bytes().replace(b"citizen@example.org", MAILBOX.encode())
    ours = ours.replace(b"<nodate-1@", b"<ours-1@")
    await asyncio.to_thread(send, port, ours)
    for name in ("no_date.eml", "no_message_id.eml", "nested.eml"):  # limit 2 per sender
        await asyncio.to_thread(send, port, (FIXTURES / name).read_bytes())
    await gw.adapters["mail"].stop()  # drains acknowledgements in flight

    assert sorted(m.rcpt_tos[0] for m in recorder.messages) == [
        "citizen@example.org", "citizen@example.org", "lisi@example.org",
    ]
    ack = next(m for m in recorder.messages if m.rcpt_tos == ["lisi@example.org"])
    assert ack.mail_from == "<>"  # the null reverse-path, as aiosmtpd records it
    msg = parse(ack.data)
    assert msg["Auto-Submitted"] == "auto-replied"
    reference = first.replace("-", "")[-10:].upper()
    assert msg["Subject"] == f"Re: 噪音投诉 [{reference}]"
    assert msg["In-Reply-To"] == "<alt-1@example.org>"
    assert msg["Reply-To"] == f"12345+{first}@hotline.example.gov.cn"
    assert f"编号 {reference}" in msg.get_content() and "CST" in msg.get_content()
    acknowledged = [e for e in await gw.read_events() if e.type == "acknowledged"]
    assert len(acknowledged) == 3
    assert first in {e.contact_id for e in acknowledged}


async def test_reply_with_a_missing_file_fails_without_retry(start_mailbox, start_recorder,
                                                             redis_client, prefix):
    recorder = await start_recorder()
    gw = await start_mailbox(relay=relay_table(recorder))
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    ghost = Attachment("x.pdf", "application/pdf", 1, "0" * 64, "/v1/attachments/" + "0" * 64)
    await post_reply(redis_client, Reply(contact_id, "ok", (ghost,)), prefix=prefix)

    async def failed() -> bool:
        return any(e.type == "failed" for e in await gw.read_events())

    assert await eventually(failed)
    assert recorder.attempts == 0


async def test_no_address_or_secret_in_the_logs(start_mailbox, start_recorder, certificate,
                                               redis_client, prefix, caplog):
    caplog.set_level(logging.DEBUG)
    cert, key = certificate
    recorder = await start_recorder(tls=(cert, key), auth=True)
    recorder.script = ["550 5.1.1 <citizen@example.org>: Recipient address rejected"]
    gw = await start_mailbox(
        relay=relay_table(recorder, host="localhost", tls="starttls", username="gw",
                          password="s3cret", ca_file=str(cert)),
    )
    port = gw.adapters["mail"].port
    contact_id = await asyncio.to_thread(send, port, (FIXTURES / "plain.eml").read_bytes())

    def refused_relay_attempt() -> int:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.example.org")
            client.mail("citizen@example.org")
            return client.rcpt("citizen@example.org")[0]

    assert await asyncio.to_thread(refused_relay_attempt) == 550
    await post_reply(redis_client, Reply(contact_id, "ok"), prefix=prefix)

    async def failed() -> bool:
        events = await gw.read_events()
        return any(e.type == "failed" for e in events)

    assert await eventually(failed)
    (failed,) = [e for e in await gw.read_events() if e.type == "failed"]
    assert "c***@example.org" in failed.detail["reason"]
    assert "citizen@example.org" not in failed.detail["reason"]
    assert "citizen@example.org" not in caplog.text
    assert "s3cret" not in caplog.text
    assert contact_id in caplog.text  # the logs did capture the session


async def test_relay_without_starttls_is_refused_not_retried(start_mailbox, start_recorder,
                                                            redis_client, prefix):
    recorder = await start_recorder()  # plain text only
    gw = await start_mailbox(relay=relay_table(recorder, tls="starttls", attempts=3))
    contact_id = await asyncio.to_thread(
        send, gw.adapters["mail"].port, (FIXTURES / "plain.eml").read_bytes()
    )
    await post_reply(redis_client, Reply(contact_id, "ok"), prefix=prefix)

    async def failed() -> bool:
        return any(e.type == "failed" for e in await gw.read_events())

    assert await eventually(failed)
    (event,) = [e for e in await gw.read_events() if e.type == "failed"]
    assert "STARTTLS" in event.detail["reason"]
    assert recorder.attempts == 0 and recorder.messages == []


async def test_acknowledgement_limit_holds_across_instances_and_restarts(
    start_mailbox, start_recorder
):
    """Three per hour per address means three for the fleet: two instances (and a restart of
    one) count together, in the gateway's shared state."""
    recorder = await start_recorder()
    ack = {"enabled": True, "timezone": "Asia/Shanghai", "per_sender_limit": 3}
    one = await start_mailbox(relay=relay_table(recorder), ack=ack)
    two = await start_mailbox(relay=relay_table(recorder), ack=ack)
    plain = (FIXTURES / "plain.eml").read_bytes()

    async def mail(gw, n: int) -> None:
        body = plain.replace(b"<plain-1@", f"<fleet-{n}@".encode())
        await asyncio.to_thread(send, gw.adapters["mail"].port, body)

    for n in range(4):
        await mail(one if n % 2 else two, n)
    await one.adapters["mail"].stop()  # drains acknowledgements in flight
    await two.adapters["mail"].stop()
    assert len(recorder.messages) == 3
    await one.stop()
    again = await start_mailbox(relay=relay_table(recorder), ack=ack)  # a restarted instance
    await mail(again, 10)
    await again.adapters["mail"].stop()
    assert len(recorder.messages) == 3
    assert all(m.rcpt_tos == ["citizen@example.org"] for m in recorder.messages)
    # counted under the address's pseudonym: no address in a key name
    names = [k.decode() for k in await again.redis.keys(f"{again.keys.tag}:*")]
    assert any(":ack:p" in k for k in names)
    assert [k for k in names if "citizen@" in k] == []
