"""The attachment store: content-addressed, bounded, served to API clients."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from typing import Any

import pytest

from gateway.contact.attachments import TYPE_ATTRIBUTE, AttachmentStore, AttachmentTooLarge


async def test_same_bytes_are_stored_once_and_named_safely(tmp_path):
    store = AttachmentStore(tmp_path, max_size=1024)
    a = await store.put(b"photo", "../../etc/passwd", "image/jpeg")
    b = await store.put(b"photo", "second.jpg", "")
    assert a.sha256 == b.sha256 == hashlib.sha256(b"photo").hexdigest()
    assert a.ref == f"/v1/attachments/{a.sha256}"
    assert "/" not in a.name and a.name.endswith("passwd")
    assert b.content_type == "application/octet-stream"
    # the bytes once, and the type they first came with on them (beside them without user
    # attributes on this file system)
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    if attributes_here(tmp_path):
        assert files == [a.sha256]
        assert os.getxattr(store.path_for(a.sha256), TYPE_ATTRIBUTE) == b"image/jpeg"
    else:
        assert files == [a.sha256, a.sha256 + ".type"]
    assert store.content_type(store.path_for(a.sha256)) == "image/jpeg"
    c = await store.put(b"no type", "c", "not a type<script>")
    assert c.content_type == "not a type<script>"  # the record keeps what was said...
    served = store.content_type(store.path_for(c.sha256))
    assert served == "application/octet-stream"  # ...but it is served as bytes
    with pytest.raises(AttachmentTooLarge):
        await store.put(b"x" * 1025, "big", "application/octet-stream")
    with pytest.raises(ValueError):
        store.path_for("../secret")


def attributes_here(folder: Any) -> bool:
    """Whether the file system of ``folder`` takes user extended attributes."""
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


async def test_without_user_attributes_the_type_is_a_file_beside_and_old_ones_are_read(
    tmp_path, monkeypatch
):
    """A file system without user attributes (an old tmpfs, some network file systems) gets
    the ``.type`` file beside the bytes; files stored that way (every file before the type
    was an attribute) are served with their type, and a file already there is not given a
    second type."""
    import errno

    calls: list[int] = []

    def refused(*args: Any) -> None:
        calls.append(1)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "setxattr", refused)
    store = AttachmentStore(tmp_path, max_size=1024)
    a = await store.put(b"photo", "a.jpg", "image/jpeg")
    b = await store.put(b"scan", "b.pdf", "application/pdf")
    assert len(calls) == 1  # not asked again once refused
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([a.sha256, a.sha256 + ".type", b.sha256, b.sha256 + ".type"])
    monkeypatch.undo()
    fresh = AttachmentStore(tmp_path, max_size=1024)  # a restart, attributes working
    assert fresh.content_type(fresh.path_for(a.sha256)) == "image/jpeg"
    await fresh.put(b"photo", "again.png", "image/png")  # the first type given is kept
    assert fresh.content_type(fresh.path_for(a.sha256)) == "image/jpeg"
    assert not list(tmp_path.rglob(".tmp-*"))


async def test_attachments_are_served_over_http_with_a_key(
    start_gateway, aiohttp_client_session, monkeypatch
):
    monkeypatch.setenv("READER_KEY", "reader-key-123456")
    gw = await start_gateway(
        api={
            "open_to_loopback": False,
            "keys": [{"name": "cases", "key_env": "READER_KEY", "scopes": ["read"]}],
        }
    )
    attachment = await gw.attachments.put(b"%PDF-1.7 letter", "letter.pdf", "application/pdf")
    url = f"http://127.0.0.1:{gw.http_port}{attachment.ref}"
    async with aiohttp_client_session.get(url) as resp:
        assert resp.status == 401
    headers = {"Authorization": "Bearer reader-key-123456"}
    async with aiohttp_client_session.get(url, headers=headers) as resp:
        assert resp.status == 200 and await resp.read() == b"%PDF-1.7 letter"
        # served with the type it was stored with (was application/octet-stream for all)
        assert resp.headers["Content-Type"] == "application/pdf"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with aiohttp_client_session.get(url[:-4] + "0000", headers=headers) as resp:
        assert resp.status == 404
    async with aiohttp_client_session.get(url + "x", headers=headers) as resp:
        assert resp.status == 400
        assert resp.headers["Content-Type"] == "application/problem+json"


def test_the_digest_fed_in_pieces_is_sha256():
    from gateway.contact.attachments import HOLD_LIMIT, sha256_hex

    for size in (0, 1, 2046, 2047, 2048, 2049, 4094, 4095, 5000, HOLD_LIMIT, HOLD_LIMIT + 1):
        data = os.urandom(size)
        assert sha256_hex(data) == hashlib.sha256(data).hexdigest(), size


async def test_concurrent_puts_are_one_group_commit_durable_before_they_return(
    tmp_path, monkeypatch
):
    """Files put at the same time are written together, then fsynced together, then renamed,
    then their folders fsynced: every file's bytes and folder entry are on disk before its put
    returns, with no fsync between two renames of one group (the old store fsynced and renamed
    one file after another)."""
    store = AttachmentStore(tmp_path, max_size=1024)
    await store.put(b"warm", "w", "")  # the first group has no company
    steps: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        steps.append(("replace", f"{src} {dst}"))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    blobs = [f"message {n}".encode() * 20 for n in range(12)]
    stored = await asyncio.gather(
        *(store.put(b, f"m{n}.eml", "message/rfc822") for n, b in enumerate(blobs))
    )
    monkeypatch.undo()
    for blob, attachment in zip(blobs, stored, strict=True):
        path = store.path_for(attachment.sha256)
        assert path.read_bytes() == blob and attachment.size == len(blob)
        renamed = next(
            n for n, (op, arg) in enumerate(steps)
            if op == "replace" and arg.endswith(f" {path}")
        )
        tmp = steps[renamed][1].split(" ")[0]
        assert ("fsync", tmp) in steps[:renamed], "renamed into place before its fsync"
        assert ("fsync", str(path.parent)) in steps[renamed:], "folder entry never fsynced"
    kinds = "".join("f" if op == "fsync" else "r" for op, _ in steps)
    groups = [g for g in kinds.split("f") if g]
    # renames come in runs (one per group, at most the writer's two groups in flight), never
    # one fsync per file between them
    assert len(groups) <= 2, kinds
    assert not list(tmp_path.rglob(".tmp-*"))


async def test_a_file_that_cannot_be_stored_fails_alone_and_leaves_nothing_behind(tmp_path):
    store = AttachmentStore(tmp_path, max_size=1024)
    ok = await store.put(b"fine", "a", "text/plain")
    blocked = b"x"
    folder = store.path_for(hashlib.sha256(blocked).hexdigest()).parent
    folder.write_bytes(b"")  # a file where its folder should be
    results = store.put_many_sync([(blocked, "b", "text/plain"), (b"fine", "a2", "")])
    assert isinstance(results[0], OSError)
    assert results[1] == dataclasses.replace(ok, name="a2", content_type="application/octet-stream")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_temporary_file_left_by_a_killed_process_of_the_same_pid_loses_nothing(tmp_path):
    """A restarted container's gateway has the pid its killed predecessor had (often 1), and
    the temporary files that one left are still there. The same bytes twice in one group (one
    logo in two mails): before, the first open failed on the leftover name, the second item
    came back stored, and no file was ever written (its held copy was then let go)."""
    store = AttachmentStore(tmp_path, max_size=1024)
    data = b"logo"
    folder = store.path_for(hashlib.sha256(data).hexdigest()).parent
    folder.mkdir(parents=True)
    for n in range(4):  # as the process before us named them: pid and a counter from 0
        (folder / f".tmp-{os.getpid()}-{n}").write_bytes(b"half")
    results = store.put_many_sync([(data, "a.png", ""), (data, "b.png", "")])
    for result in results:
        if not isinstance(result, Exception):
            assert store.path_for(result.sha256).is_file(), "answered stored, never written"
    assert not any(isinstance(r, Exception) for r in results)
    assert store.read(hashlib.sha256(data).hexdigest()) == data


def test_bytes_whose_temporary_file_cannot_be_opened_fail_for_every_item_of_them(tmp_path):
    class Unopenable(AttachmentStore):
        def _tmp(self, folder: Any) -> str:
            return f"{folder}/no such folder/tmp"  # the open fails (ENOENT)

    store = Unopenable(tmp_path, max_size=1024)
    results = store.put_many_sync([(b"same", "a", ""), (b"same", "b", ""), (b"other", "c", "")])
    assert [type(r) for r in results] == [FileNotFoundError] * 3
    assert not store.path_for(hashlib.sha256(b"same").hexdigest()).exists()


async def test_start_removes_the_temporary_files_of_an_earlier_process_with_our_pid(tmp_path):
    store = AttachmentStore(tmp_path, max_size=1024)
    folder = tmp_path / "ab"
    folder.mkdir()
    earlier = folder / f".tmp-{os.getpid()}-0123abcd-0"  # our pid, not our temporary name
    other = folder / f".tmp-{os.getppid()}-0123abcd-0"  # a process still running (a worker)
    for path in (earlier, other):
        path.write_bytes(b"half")
    store._remove_stale_tmp()
    assert not earlier.exists()
    assert other.exists()


@pytest.mark.parametrize("restart", ["another host name", "the folder mounted elsewhere"])
async def test_files_left_held_are_written_by_the_next_start_on_the_same_folder(
    tmp_path, redis_client, prefix, monkeypatch, restart
):
    """A gateway killed after a 250 and before its held files were written (the raw message
    is then only in Redis) starts again on the same folder under another host name (a
    container made anew: Docker names it by its id) or with the folder mounted at another
    path: that start writes what was left held. The hold names the folder by an id kept in
    it, not by the host's name and the path (with those, the files stayed in Redis, unwritten,
    and the consumer API answered 404)."""
    import socket

    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys

    keys = Keys(prefix)
    before = tmp_path / "a" / "attachments"
    data = b"Subject: lamp\r\n\r\nthe light at gate 3 is out\r\n"
    digest = hashlib.sha256(data).hexdigest()
    before.mkdir(parents=True)
    # what the contact's write holds before the 250 (RedisQueue.write_batch's HSET); the
    # process is then killed before its write behind
    held_key = RedisHolder(redis_client, keys, before).key
    await redis_client.hset(held_key, digest, b"message/rfc822\n" + data)
    after = before
    if restart == "another host name":
        name = socket.gethostname()
        monkeypatch.setattr(socket, "gethostname", lambda: name + "-new")
    else:
        after = tmp_path / "b" / "attachments"
        after.parent.mkdir()
        before.rename(after)
    store = AttachmentStore(after, max_size=1024)
    holder = RedisHolder(redis_client, keys, after)
    store.hold_in(holder)
    assert await store.write_held() == 1
    assert store.read(digest) == data
    assert store.content_type(store.path_for(digest)) == "message/rfc822"
    assert await holder.held() == []  # released once written


async def test_a_hold_that_lands_after_its_contact_was_spooled_is_let_go(
    tmp_path, own_redis, prefix
):
    """Redis stops answering (SIGSTOP) while a mail's contact and held files are being
    written: the write times out, the contact is spooled, and ``settle`` writes the files
    first, as it must. The write was sent and lands when Redis answers again, after the
    release that followed the files; it is let go once more later, instead of staying in
    Redis until the gateway's next start (up to 64 KiB a file)."""
    import os
    import signal

    import redis.asyncio as aioredis

    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys
    from gateway.testing import eventually

    client = aioredis.from_url(own_redis.url, socket_timeout=30)
    writer = aioredis.from_url(own_redis.url, socket_timeout=30)  # the contact's write
    try:
        store = AttachmentStore(tmp_path / "attachments", max_size=1024)
        holder = RedisHolder(client, Keys(prefix), store.root)
        store.hold_in(holder)
        store.late_release_s = 0.5
        await client.ping()  # connected before the freeze
        await writer.ping()
        data = b"Subject: lamp\r\n\r\nthe light at gate 3 is out\r\n"
        plan = store.plan([(data, "message.eml", "message/rfc822")])
        assert plan.held is not None
        pid = own_redis.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            landing = asyncio.ensure_future(writer.hset(plan.held[0], mapping=plan.held[1]))
            await asyncio.sleep(0.2)  # sent; its caller gave up: the contact was spooled
            settling = asyncio.ensure_future(store.settle(plan, in_redis=False))
            digest = hashlib.sha256(data).hexdigest()
            await eventually(lambda: store.path_for(digest).is_file())  # written first
        finally:
            os.kill(pid, signal.SIGCONT)
        await settling
        await landing

        async def let_go() -> bool:
            return await holder.held() == []

        await eventually(let_go)
        assert store.read(digest) == data
    finally:
        await client.aclose()
        await writer.aclose()


async def test_held_files_are_written_behind_with_one_file_system_sync_per_group(
    tmp_path, redis_client, prefix, monkeypatch
):
    """Files held in Redis are written after their answer as one group: written under
    temporary names, the file system synced, renamed, synced again, and only then let go from
    Redis; no fsync per file and per folder (each cost ~270-340 µs of CPU against ~55-100 for
    the group's share of two syncs)."""
    from gateway.contact import attachments
    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys

    assert attachments._syncfs is not None  # Linux
    store = AttachmentStore(tmp_path / "attachments", max_size=4096)
    holder = RedisHolder(redis_client, Keys(prefix), store.root)
    store.hold_in(holder)
    blobs = [f"Subject: lamp {n}\r\n\r\nlight {n} is out\r\n".encode() for n in range(12)]
    plans = [store.plan([(b, f"m{n}.eml", "message/rfc822")]) for n, b in enumerate(blobs)]
    for plan in plans:  # what each contact's write sets
        assert plan.held is not None
        await redis_client.hset(plan.held[0], mapping=plan.held[1])
    steps: list[str] = []
    syncfs, replace, fsync = attachments._syncfs, os.replace, os.fsync

    def recording_syncfs(fd: int) -> OSError | None:
        held = asyncio.run_coroutine_threadsafe(holder.held(), loop).result()
        steps.append(f"sync {len(held)} held")
        return syncfs(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        steps.append("replace")
        replace(src, dst)

    def recording_fsync(fd: int) -> None:
        steps.append("fsync")
        fsync(fd)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(attachments, "_syncfs", recording_syncfs)
    monkeypatch.setattr(os, "replace", recording_replace)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    await asyncio.gather(*(store.settle(plan, in_redis=True) for plan in plans))
    await store.close()
    await holder.drain()
    monkeypatch.undo()
    # each file (and its type beside it where the file system has no user attributes)
    renames = (1 if attributes_here(tmp_path) else 2) * len(blobs)
    assert steps == ["sync 12 held", *["replace"] * renames, "sync 12 held"], steps
    for blob in blobs:
        assert store.read(hashlib.sha256(blob).hexdigest()) == blob
    assert await holder.held() == []
    assert not list(store.root.rglob(".tmp-*"))


def test_a_group_synced_with_syncfs_syncs_through_a_descriptor_opened_before_its_writes(
    tmp_path, monkeypatch
):
    """syncfs(2) reports a writeback error only to descriptors opened before the error was
    first seen: opened after the group's writes, another syncfs of the same file system
    (another worker, another program) can take the error first and the group's files are then
    renamed into place and let go from Redis on bytes that never reached the disk."""
    from gateway.contact import attachments

    assert attachments._syncfs is not None  # Linux 5.8 or later
    store = AttachmentStore(tmp_path / "attachments", max_size=4096)
    opened: list[str] = []
    synced: list[str] = []
    real_open, syncfs = os.open, attachments._syncfs

    def recording_open(path: Any, *args: Any, **kwargs: Any) -> int:
        fd = real_open(path, *args, **kwargs)
        opened.append(os.fspath(path))
        return fd

    def recording_syncfs(fd: int) -> OSError | None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return syncfs(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(attachments, "_syncfs", recording_syncfs)
    results = store.put_many_sync(
        [(f"light {n} is out".encode(), f"m{n}.txt", "text/plain") for n in range(3)],
        sync_fs=True,
    )
    monkeypatch.undo()
    assert all(not isinstance(r, Exception) for r in results), results
    root = str(store.root)
    assert synced == [root, root]
    first_write = next(n for n, path in enumerate(opened) if "/.tmp-" in path)
    assert root in opened[:first_write], opened


@pytest.mark.parametrize(
    ("release", "reports"),
    [("4.19.0-26-amd64", False), ("5.4.0-150-generic", False), ("5.7.19", False),
     ("5.8.0", True), ("5.15.0-91-generic", True), ("6.18.44-fc-v669", True), ("x", False)],
)
def test_syncfs_is_used_only_where_it_reports_writeback_errors(release, reports):
    """Before Linux 5.8 syncfs returned 0 whatever failed to be written: the store keeps its
    fsyncs there."""
    from gateway.contact.attachments import syncfs_reports_errors

    assert syncfs_reports_errors(release) is reports


async def test_a_release_that_waits_on_redis_does_not_hold_up_the_next_files(
    tmp_path, own_redis, prefix
):
    """The files written behind are let go from Redis after each group in the background: a
    release that waits (Redis slow, writes paused) does not keep the next group from being
    written (the release was awaited inside the group, so the writer waited with it)."""
    import redis.asyncio as aioredis

    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys
    from gateway.testing import eventually

    client = aioredis.from_url(own_redis.url, socket_timeout=60)
    admin = aioredis.from_url(own_redis.url)
    store = AttachmentStore(tmp_path / "attachments", max_size=4096)
    store.behind_interval = 0.0
    holder = RedisHolder(client, Keys(prefix), store.root)
    store.hold_in(holder)
    blobs = [f"Subject: lamp {n}\r\n\r\nlight {n} is out\r\n".encode() for n in range(2)]
    plans = [store.plan([(b, f"m{n}.eml", "message/rfc822")]) for n, b in enumerate(blobs)]
    for plan in plans:
        assert plan.held is not None
        await client.hset(plan.held[0], mapping=plan.held[1])
    paths = [store.path_for(hashlib.sha256(b).hexdigest()) for b in blobs]
    try:
        await admin.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # HDELs wait
        await store.settle(plans[0], in_redis=True)
        await eventually(paths[0].is_file)
        await store.settle(plans[1], in_redis=True)  # while the first group's release waits
        await eventually(paths[1].is_file)
        assert len(await holder.held()) == 2  # neither let go yet
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
    await store.close()
    await holder.drain()
    assert await holder.held() == []
    await client.aclose()
    await admin.aclose()


async def test_a_held_file_written_on_first_read_is_released_once(tmp_path, redis_client, prefix):
    """A held file read through ``ensure`` (the consumer API's download) or written at start
    (``write_held``) is written by the group writer, which releases it from Redis: one
    ``HDEL`` for it, done when the call returns (the caller released it a second time)."""
    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys

    released: list[str] = []

    class Counted(RedisHolder):
        async def release(self, digests):  # type: ignore[no-untyped-def]
            released.extend(digests)
            await super().release(digests)

    store = AttachmentStore(tmp_path / "attachments", max_size=1024)
    store.behind_interval = 0.0
    holder = Counted(redis_client, Keys(prefix), store.root)
    store.hold_in(holder)
    blobs = [f"Subject: lamp {n}\r\n\r\nlight {n} is out\r\n".encode() for n in range(2)]
    digests = [hashlib.sha256(b).hexdigest() for b in blobs]
    for digest, data in zip(digests, blobs, strict=True):
        await redis_client.hset(holder.key, digest, b"message/rfc822\n" + data)
    assert await store.ensure(digests[0])
    assert await holder.held() == [digests[1]]  # released by the time ensure returns
    assert await store.write_held() == 1
    assert await holder.held() == []
    assert store.read(digests[1]) == blobs[1]
    assert sorted(released) == sorted(digests)  # once each
    await store.close()


async def test_a_held_file_is_hashed_once_not_again_when_written_behind(
    tmp_path, redis_client, prefix, monkeypatch
):
    """``plan`` takes a held file's sha256 on the event loop; the writer's thread writes the
    file under it without hashing the bytes again (it held the GIL from the loop doing so),
    and the file, its type and its release are as before."""
    from gateway.contact import attachments
    from gateway.queueing.held import RedisHolder
    from gateway.queueing.keys import Keys

    store = AttachmentStore(tmp_path / "attachments", max_size=1 << 20)
    holder = RedisHolder(redis_client, Keys(prefix), store.root)
    store.hold_in(holder)
    store.behind_interval = 0.0
    hashed: list[int] = []
    sha256_hex = attachments.sha256_hex

    def counted(data: bytes) -> str:
        hashed.append(len(data))
        return sha256_hex(data)

    monkeypatch.setattr(attachments, "sha256_hex", counted)
    blobs = [b"Subject: lamp %d\r\n\r\n" % n + b"light is out\r\n" * 300 for n in range(3)]
    plans = [store.plan([(b, "message.eml", "message/rfc822")]) for b in blobs]
    assert len(hashed) == len(blobs)
    for plan in plans:
        assert plan.held is not None
        await redis_client.hset(plan.held[0], mapping=plan.held[1])
    await asyncio.gather(*(store.settle(plan, in_redis=True) for plan in plans))
    await store.close()
    await holder.drain()
    assert len(hashed) == len(blobs)  # not one more
    for blob, plan in zip(blobs, plans, strict=True):
        (attachment,) = plan.results
        assert isinstance(attachment, attachments.Attachment)
        assert attachment.sha256 == hashlib.sha256(blob).hexdigest()
        path = store.path_for(attachment.sha256)
        assert path.read_bytes() == blob
        assert store.content_type(path) == "message/rfc822"
    assert await holder.held() == []


def test_a_described_file_that_is_not_bytes_is_hashed_again(tmp_path):
    """``described`` is taken as the Attachment of immutable bytes only: a buffer that may
    have changed since it was described is hashed again, so a file never lands under a
    digest that is not its own."""
    store = AttachmentStore(tmp_path, max_size=1024)
    stale = store.describe(b"what it was", "a.txt", "text/plain")
    data = bytearray(b"what it is now")
    (stored,) = store.put_many_sync([(data, "a.txt", "text/plain")], described=[stale])
    assert not isinstance(stored, Exception)
    assert stored.sha256 == hashlib.sha256(data).hexdigest() != stale.sha256
    assert open(store.path_for(stored.sha256), "rb").read() == bytes(data)
