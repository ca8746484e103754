"""A client that hangs up while its message is being made durable cuts nothing in half.

The message is read to its lone dot, its contact's write is held in flight by a real Valkey
whose writes are paused (``CLIENT PAUSE WRITE``), and the client closes the connection then
(aiosmtpd cancels the session). No 250 was sent; the contact still lands (in Redis, or in the
spool when the write times out) and its raw message is kept: on disk, and let go from Redis.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.held import store_name
from gateway.testing import eventually
from tests.channels.email.conftest import MAILBOX

RAW = (
    b"From: citizen@example.org\r\nTo: " + MAILBOX.encode() + b"\r\n"
    b"Subject: hang-up\r\nMessage-ID: <hangup-@@@example.org>\r\n\r\n"
    b"\xe8\xb7\xaf\xe7\x81\xaf\xe5\x9d\x8f\xe4\xba\x86\r\n"
)


async def _send_and_hang_up(port: int, raw: bytes, gw: Any) -> None:
    """The whole message up to its dot, then close once its contact is in flight."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        for line in (b"EHLO mta.example.org", b"MAIL FROM:<citizen@example.org>",
                     f"RCPT TO:<{MAILBOX}>".encode(), b"DATA"):
            writer.write(line + b"\r\n")
            while (reply := await reader.readline())[3:4] == b"-":
                pass
        assert reply[:3] == b"354"
        writer.write(raw + b".\r\n")
        await writer.drain()
        await eventually(lambda: gw.admission.open == 1)  # its write is under way
    finally:
        writer.close()


async def _raw_kept(gw: Any, external_id: str) -> Path:
    """The contact's raw message on disk and no longer held in Redis; its path."""
    (contact,) = [c for c in await gw.read_contacts() if c.external_id == external_id]
    digest = contact.meta["raw"]["sha256"]
    store = gw.attachments
    held = gw.keys.held_files(store_name(store.root))
    await eventually(lambda: store.path_for(digest).is_file())
    await eventually(lambda: _not_held(gw, held, digest))
    return store.path_for(digest)


async def _not_held(gw: Any, held: str, digest: str) -> bool:
    return not await gw.redis.hexists(held, digest)


async def test_hang_up_during_the_write_the_contact_lands_with_its_raw_message(
    start_mailbox: Any, own_redis_server: EmbeddedRedis
) -> None:
    gw = await start_mailbox(sections={"url": own_redis_server.url,
                                       "redis": {"write_timeout": "60s"}})
    admin = aioredis.from_url(own_redis_server.url)
    raw = RAW.replace(b"@@", b"1")
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        await _send_and_hang_up(gw.adapters["mail"].port, raw, gw)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    await eventually(lambda: gw.admission.open == 0)
    path = await _raw_kept(gw, "<hangup-1@example.org>")
    assert path.read_bytes().endswith(raw)


async def test_hang_up_during_a_write_that_ends_in_the_spool_the_raw_message_is_on_disk(
    start_mailbox: Any, own_redis_server: EmbeddedRedis
) -> None:
    """The write misses ``write_timeout`` (Valkey paused): the contact goes to the spool, and
    its raw message, which Redis may not have, is written to disk before Redis answers again."""
    gw = await start_mailbox(sections={"url": own_redis_server.url,
                                       "redis": {"write_timeout": "300ms"}})
    admin = aioredis.from_url(own_redis_server.url)
    raw = RAW.replace(b"@@", b"2")
    store = gw.attachments
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        await _send_and_hang_up(gw.adapters["mail"].port, raw, gw)
        await eventually(lambda: gw.spool.depth == 1)
        # on disk while Redis is still paused: the spooled contact does not need it
        await eventually(lambda: any(p.read_bytes().endswith(raw)
                                     for p in store.root.glob("??/*") if "." not in p.name))
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    await eventually(lambda: gw.spool.depth == 0)
    path = await _raw_kept(gw, "<hangup-2@example.org>")
    assert path.read_bytes().endswith(raw)


async def test_a_listener_stopping_waits_for_the_message_being_made_durable(
    start_mailbox: Any, own_redis_server: EmbeddedRedis
) -> None:
    """``Listener.stop`` lets a message whose write is under way finish: its 250 is sent,
    then the 421 of the listener stopping."""
    gw = await start_mailbox(sections={"url": own_redis_server.url,
                                       "redis": {"write_timeout": "60s"}})
    admin = aioredis.from_url(own_redis_server.url)
    listener = gw.adapters["mail"].listener
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.adapters["mail"].port)
    try:
        await reader.readline()
        for line in (b"EHLO mta.example.org", b"MAIL FROM:<citizen@example.org>",
                     f"RCPT TO:<{MAILBOX}>".encode(), b"DATA"):
            writer.write(line + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        writer.write(RAW.replace(b"@@", b"3") + b".\r\n")
        await eventually(lambda: gw.admission.open == 1)
        stopping = asyncio.create_task(listener.stop())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not stopping.done()
        await admin.execute_command("CLIENT", "UNPAUSE")
        await stopping
        assert (await reader.readline()).startswith(b"250 2.0.0 OK queued as ")
        assert (await reader.readline()).startswith(b"421 ")
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
        writer.close()


async def test_hang_up_during_the_write_the_citizen_is_still_acknowledged_once(
    start_mailbox: Any, own_redis_server: EmbeddedRedis, start_recorder: Any
) -> None:
    """The message lands though its client hung up before the 250, and the client's retry is
    a duplicate (no acknowledgement for a duplicate): the acknowledgement of the contact that
    landed is the citizen's only one, so it is still sent."""
    from tests.channels.email.test_relay import relay_table
    from tests.channels.email.test_smtp import send

    recorder = await start_recorder()
    gw = await start_mailbox(
        sections={"url": own_redis_server.url, "redis": {"write_timeout": "60s"}},
        relay=relay_table(recorder),
        ack={"enabled": True, "timezone": "Asia/Shanghai"},
    )
    admin = aioredis.from_url(own_redis_server.url)
    raw = RAW.replace(b"@@", b"4")
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        await _send_and_hang_up(gw.adapters["mail"].port, raw, gw)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()
    await eventually(lambda: gw.admission.open == 0)
    (contact,) = await gw.read_contacts()
    again = await asyncio.to_thread(send, gw.adapters["mail"].port, raw)  # the MTA's retry
    assert again == contact.id
    await gw.adapters["mail"].stop()  # drains acknowledgements in flight
    assert [m.rcpt_tos for m in recorder.messages] == [["citizen@example.org"]]
