"""A 250 means the raw message is on disk: a real ``gateway serve`` killed with SIGKILL right
after many concurrent sessions got their 250 (their raw files written as one group commit) has
every acknowledged message's raw file in place, complete, under its own sha256."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import aiosmtplib

from tests.e2e.test_serve import free_port, start_serve, wait_healthy, write_config

MAILBOX = "12345@hotline.example.gov.cn"
SESSIONS = 24


def message(n: int) -> bytes:
    body = f"路灯坏了 {n}\r\n".encode() * 40
    return (
        f"From: citizen{n}@example.org\r\nTo: {MAILBOX}\r\nSubject: lamp {n}\r\n"
        f"Message-ID: <kill-{n}@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body


async def test_raw_files_of_a_group_are_complete_after_kill_9_right_after_250(tmp_path):
    port, smtp_port = free_port(), free_port()
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
        acked: list[int] = []

        async def send(n: int) -> None:
            reply = await aiosmtplib.send(
                message(n), sender=f"citizen{n}@example.org", recipients=[MAILBOX],
                hostname="127.0.0.1", port=smtp_port, timeout=30,
            )
            if reply[1].startswith("2.0.0 OK queued"):
                acked.append(n)

        await asyncio.gather(*(send(n) for n in range(SESSIONS)))
        proc.kill()  # at once: no drain, no close
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(acked) == SESSIONS
    stored: dict[int, bytes] = {}
    for path in (tmp_path / "var" / "attachments").glob("??/*"):
        if len(path.name) != 64:
            continue  # content types beside the files
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == path.name, f"{path} incomplete"
        for n in acked:
            if f"<kill-{n}@example.org>".encode() in data:
                stored[n] = data
    for n in acked:
        assert n in stored, f"message {n} acknowledged, raw file missing"
        assert stored[n].endswith(message(n)), f"message {n} raw file truncated"
    assert not list(Path(tmp_path / "var" / "attachments").rglob(".tmp-*"))
