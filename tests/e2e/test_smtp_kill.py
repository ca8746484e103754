"""A 250 means the raw message is durable: a real ``gateway serve`` killed with SIGKILL right
after many concurrent sessions got their 250 (their raw messages held in Redis, their files
written after the answer, or written first as one group commit) serves, once restarted, every
acknowledged message's raw message complete through the consumer API, and has written every
raw file in place under its own sha256."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import aiosmtplib
import pytest

from gateway.testing import eventually
from tests.e2e.test_serve import start_serve, wait_healthy, write_config
from tests.harness import free_ports

MAILBOX = "12345@hotline.example.gov.cn"
SESSIONS = 24


def message(n: int) -> bytes:
    body = f"路灯坏了 {n}\r\n".encode() * 40
    return (
        f"From: citizen{n}@example.org\r\nTo: {MAILBOX}\r\nSubject: lamp {n}\r\n"
        f"Message-ID: <kill-{n}@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body


@pytest.mark.parametrize("disk", ["writes", "refuses"])
async def test_raw_messages_are_served_complete_after_kill_9_right_after_250(tmp_path, disk):
    """``refuses``: every folder of the attachment store is a file, so no raw message can be
    written after its 250 and all of them are only in Redis when the gateway is killed; the
    restarted gateway writes them (``AttachmentStore.write_held``)."""
    port, smtp_port = free_ports(2)
    folder = tmp_path / "var" / "attachments"
    blockers = [folder / f"{n:02x}" for n in range(256)]
    if disk == "refuses":
        folder.mkdir(parents=True)
        for blocker in blockers:
            blocker.write_bytes(b"")
    extra = f"""
[limits]
sender_contacts = 0

[adapters.mail]
type = "smtp"
listen = "127.0.0.1:{smtp_port}"
mailboxes = ["{MAILBOX}"]
"""
    cfg = write_config(tmp_path, port, extra=extra)
    proc = start_serve(cfg)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_healthy(session, port, proc)
        acked: dict[int, str] = {}

        async def send(n: int) -> None:
            reply = await aiosmtplib.send(
                message(n), sender=f"citizen{n}@example.org", recipients=[MAILBOX],
                hostname="127.0.0.1", port=smtp_port, timeout=30,
            )
            if reply[1].startswith("2.0.0 OK queued as "):
                acked[n] = reply[1].rsplit(" ", 1)[1]

        await asyncio.gather(*(send(n) for n in range(SESSIONS)))
        proc.kill()  # at once: no drain, no close
        proc.wait()
        assert len(acked) == SESSIONS
        if disk == "refuses":
            assert not [p for p in folder.glob("??/*") if len(p.name) == 64]
            for blocker in blockers:
                blocker.unlink()
        proc = start_serve(cfg)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            await wait_healthy(session, port, proc)
            base = f"http://127.0.0.1:{port}/v1"
            digests: dict[int, str] = {}
            for n, contact_id in acked.items():
                async with session.get(f"{base}/contacts/{contact_id}") as resp:
                    assert resp.status == 200, await resp.text()
                    raw_ref = (await resp.json())["contact"]["meta"]["raw"]
                async with session.get(f"{base}/attachments/{raw_ref['sha256']}") as resp:
                    assert resp.status == 200, f"message {n} acknowledged, raw message missing"
                    assert resp.content_type == "message/rfc822"
                    data = await resp.read()
                assert hashlib.sha256(data).hexdigest() == raw_ref["sha256"]
                assert data.endswith(message(n)), f"message {n} raw message truncated"
                digests[n] = raw_ref["sha256"]
        def written() -> bool:  # at the restart, or when first read
            return all((folder / d[:2] / d).is_file() for d in digests.values())

        def tidy() -> bool:  # at the restart: the killed process's temporary files removed
            return not list(folder.rglob(".tmp-*"))

        await eventually(written, timeout_s=30)
        await eventually(tidy, timeout_s=30)
        for n, digest in digests.items():
            data = (folder / digest[:2] / digest).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"message {n} file incomplete"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # what the killed process was writing after its 250s is removed by the next start
    assert not list(Path(tmp_path / "var" / "attachments").rglob(".tmp-*"))
