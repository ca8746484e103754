"""Content-addressed attachment store shared by every channel.

Bytes are kept once per sha256 under ``<data_dir>/attachments/<aa>/<sha256>``, the content type
they first came with on the file as the extended attribute ``user.gateway.type`` (or, where the
file system has no user attributes, and for files stored before, beside it in ``<sha256>.type``);
a contact refers to them as ``/v1/attachments/<sha256>``, which the HTTP server serves to API
clients with that type.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import itertools
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway.queueing.batching import Coalescer
from gateway.records import Attachment, repair_text

log = logging.getLogger(__name__)

REF_PREFIX = "/v1/attachments/"
LATE_RELEASE_S = 30.0
"""A contact's write that timed out may still land (with its held files) this much later."""
HOLD_LIMIT = 64 * 1024
"""Files up to this size may be held in Redis with their contact (``AttachmentStore.plan``)
instead of written to their own files before the answer. Larger ones cost Valkey more to
write (append-only file, then the release) than their own group-committed file: at 256 KiB
200 KB mails went through at about half the rate (``bench/email_bench.py``)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
OCTET_STREAM = "application/octet-stream"
TYPE_ATTRIBUTE = "user.gateway.type"
"""The extended attribute holding a file's content type: set on the new file's descriptor, one
system call, where a ``.type`` file beside it cost a file of its own and its rename (about half
of the CPU of writing a small mail's file)."""
_NO_ATTRIBUTES = frozenset((errno.ENOTSUP, errno.EOPNOTSUPP))


def media_type(content_type: str) -> str:
    """``type/subtype`` of a Content-Type (parameters dropped), or octet-stream if malformed."""
    value = content_type.split(";", 1)[0].strip().lower()
    return value if _MEDIA_TYPE.fullmatch(value) else OCTET_STREAM


_GIL_FREE = 2048
"""hashlib lets the GIL go while it hashes this many bytes or more."""


def sha256_hex(data: bytes) -> str:
    """The sha256 of ``data``; bytes up to ``HOLD_LIMIT`` (what the event loop hashes) are fed
    in pieces under 2 KiB, so hashlib keeps the GIL: letting it go for a few microseconds of
    hashing handed it to the writer threads and the loop waited for it back (py-spy: ~3 % of
    the loop's samples under 50 SMTP sessions, in the hash of a 2 KB mail)."""
    size = len(data)
    if size < _GIL_FREE or size > HOLD_LIMIT:
        return hashlib.sha256(data).hexdigest()
    view = memoryview(data)
    digest = hashlib.sha256(view[: _GIL_FREE - 1])
    for start in range(_GIL_FREE - 1, size, _GIL_FREE - 1):
        digest.update(view[start : start + _GIL_FREE - 1])
    return digest.hexdigest()


class AttachmentTooLarge(Exception):
    """The file is larger than the configured bound."""


class Holder(Protocol):
    """Durable storage for small files until their own files are written: a hash in the
    gateway's Redis (``gateway.queueing.held.RedisHolder``), set in a contact's own write;
    field the sha256, value the media type, a newline, the bytes."""

    @property
    def key(self) -> str:
        """The hash's key."""

    async def fetch(self, digest: str) -> bytes | None: ...

    async def release(self, digests: Sequence[str]) -> None: ...

    async def held(self) -> list[str]:
        """The digests held now."""


class AttachmentStore:
    """Stores attachment bytes by sha256, durably (fsync before the rename and of the folder).

    Concurrent ``put`` calls are written as one group (``put_many_sync``) in a worker thread:
    every new file of the group is written first, then all of them are fsynced, then renamed
    into place, then each folder is fsynced once. The first fsync's journal commit carries
    much of the others' work, so a burst of small files costs far fewer disk flushes than one
    round of file and folder fsync each, and the event loop never waits on the disk.
    """

    def __init__(self, root: Path, max_size: int, *, max_batch: int = 64) -> None:
        self.root = root
        self.max_size = max_size
        self._root = str(root)
        self._folders: set[str] = set()
        """Folders known to exist (made once, not checked per file)."""
        self._names = itertools.count()
        self._token = secrets.token_hex(4)
        """In temporary names beside the pid: a restarted container's process has the pid of
        the one killed before it (often 1), whose temporary files may still be there."""
        self._writer: Coalescer[_File, Attachment | Exception] = Coalescer(
            self._write_group, max_batch=max_batch, max_inflight=2
        )
        self._behind_writer: Coalescer[_Behind, Attachment | Exception] = Coalescer(
            self._write_behind_group, max_batch=BEHIND_BATCH, max_inflight=1
        )
        """Files held in Redis, written after their answer: no hurry, so one group at a time,
        at most one every ``behind_interval`` (the next one grows meanwhile), and two syncs of
        the file system per group instead of an fsync per file and folder
        (``put_many_sync(sync_fs=True)``)."""
        self.behind_interval = BEHIND_INTERVAL_S
        self._behind_next = 0.0
        self._attributes = True
        """False once the file system has refused a user attribute: ``.type`` files then."""
        self._holder: Holder | None = None
        self._hold_limit = 0
        self._holder_down_until = 0.0
        self._behind: set[asyncio.Task[None]] = set()
        self._releasing: dict[str, asyncio.Task[None]] = {}
        """Files a group wrote behind, by sha256, while its release from Redis is under way
        (the group's own: ``_write_behind`` waits for it instead of sending another)."""
        self.late_release_s = LATE_RELEASE_S
        """Files held in Redis being written to disk (``settle``)."""

    def hold_in(self, holder: Holder, *, limit: int = HOLD_LIMIT) -> None:
        """Let ``plan`` hold files up to ``limit`` bytes in ``holder`` (see ``plan``)."""
        self._holder = holder
        self._hold_limit = min(limit, self.max_size)

    def path_for(self, sha256: str) -> Path:
        """Return where the bytes of ``sha256`` live; raise ValueError for a malformed hash."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put_sync(self, data: bytes, name: str, content_type: str) -> Attachment:
        """Store ``data`` (blocking, durable: file and folder entry fsynced) and return it."""
        (result,) = self.put_many_sync([(data, name, content_type)])
        if isinstance(result, Exception):
            raise result
        return result

    def put_many_sync(
        self,
        items: list[_File],
        *,
        sync_fs: bool = False,
        described: Sequence[Attachment | None] = (),
    ) -> list[Attachment | Exception]:
        """Store several files (blocking) with one group commit; see the class.

        Each result is durable when this returns. A file that is too large or cannot be
        written comes back as its exception; the others are stored.

        ``sync_fs``: instead of an fsync per file and per folder, one ``syncfs`` of the store's
        file system once the files are written under their temporary names and one more after
        the renames (a file's name never points to bytes not yet on disk). Cheaper in CPU per
        file (measured: about 55-100 against 270-340 µs) but it waits for whatever else is
        dirty on that file system: for files that are already durable elsewhere (held in
        Redis), not for an answer that waits. Without ``syncfs`` (not Linux) it is the fsyncs.

        ``described``: for some items, the Attachment ``describe`` made of those very bytes (a
        held file's, by ``plan``), not made again here (its sha256 above all).
        """
        if sync_fs and _syncfs is not None:
            return self._put_many_syncfs(items, _syncfs, described)
        staged: dict[str, _Staged] = {}  # by digest: the same bytes twice are written once
        try:
            out = self._stage_all(items, staged, described)
            written = [f for f in staged.values() if f.fd >= 0 and f.error is None]
            for file, error in zip(written, _fsync_all([f.fd for f in written]), strict=True):
                file.error = error  # the group commit
            folders: dict[str, list[_Staged]] = {}
            for file in staged.values():
                file.close()
                if file.error is None:
                    try:
                        file.rename_all()
                    except OSError as exc:
                        file.error = exc
                folders.setdefault(file.folder, []).append(file)
            for files, error in zip(
                folders.values(), _fsync_dirs(list(folders)), strict=True
            ):
                if error is not None:
                    for file in files:
                        file.error = file.error or error
        finally:
            _let_go(staged)
        return _outcomes(out, staged)

    def _stage_all(
        self,
        items: list[_File],
        staged: dict[str, _Staged],
        described: Sequence[Attachment | None] = (),
    ) -> list[Attachment | Exception]:
        """Write each item under a temporary name (``_stage``): its Attachment, or its error."""
        out: list[Attachment | Exception] = []
        # ``described`` may be shorter than ``items`` (none given: empty): None for the rest
        for (data, name, content_type), known in itertools.zip_longest(
            items, described[: len(items)]
        ):
            try:
                out.append(self._stage(data, name, content_type, staged, known))
            except (AttachmentTooLarge, OSError) as exc:
                out.append(exc)
        return out

    def _put_many_syncfs(
        self, items: list[_File], syncfs: _SyncFs, described: Sequence[Attachment | None] = ()
    ) -> list[Attachment | Exception]:
        """``put_many_sync(sync_fs=True)``: written, synced, renamed, synced.

        The file system is synced through a descriptor opened before the group's first write:
        ``syncfs`` reports a writeback error only to descriptors opened before it was first
        seen, so one opened later misses an error that another syncfs of the same file system
        (another worker's group, any other process) has already seen, and the file's name would
        then be put on bytes that never reached the disk.
        """
        staged: dict[str, _Staged] = {}
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            root = os.open(self._root, os.O_RDONLY)
        except OSError as exc:
            return [exc for _ in items]
        try:
            out = self._stage_all(items, staged, described)
            for file in staged.values():
                file.close()
            pending = [f for f in staged.values() if f.error is None]
            error = syncfs(root) if any(f.renames for f in pending) else None
            for file in pending:
                file.error = error
                if error is None:
                    try:
                        file.rename_all()
                    except OSError as exc:
                        file.error = exc
            # also what a concurrent group renamed (a file found in place, not written here)
            error = syncfs(root) if pending else None
            for file in pending:
                file.error = file.error or error
        finally:
            os.close(root)
            _let_go(staged)
        return _outcomes(out, staged)

    def describe(self, data: bytes, name: str, content_type: str) -> Attachment:
        """The Attachment ``data`` is stored as (raise AttachmentTooLarge); nothing written."""
        if len(data) > self.max_size:
            raise AttachmentTooLarge(f"{len(data)} bytes > {self.max_size}")
        digest = sha256_hex(data)
        return Attachment(
            name=_safe_name(name),
            content_type=content_type or "application/octet-stream",
            size=len(data),
            sha256=digest,
            ref=REF_PREFIX + digest,
        )

    def _stage(
        self,
        data: bytes,
        name: str,
        content_type: str,
        staged: dict[str, _Staged],
        described: Attachment | None = None,
    ) -> Attachment:
        """Write the file (and its type) under temporary names if new, not yet fsynced."""
        # plan's Attachment of these very bytes; anything but immutable bytes is hashed again
        attachment = (
            described if described is not None and type(data) is bytes
            else self.describe(data, name, content_type)
        )
        digest = attachment.sha256
        folder = f"{self._root}/{digest[:2]}"  # path_for's, as strings (no pathlib per file)
        target = f"{folder}/{digest}"
        file = staged.get(digest)
        if file is None:
            self._make(folder)
            file = staged[digest] = _Staged(folder)
            if not os.access(target, os.F_OK):
                tmp = self._tmp(folder)
                try:
                    file.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    file.renames.append((tmp, target))
                    view = memoryview(data)
                    while view:
                        view = view[os.write(file.fd, view) :]
                except OSError as exc:  # never renamed into place half written, and every
                    file.error = exc  # item of these bytes in the group fails with it
                    raise
        kind = media_type(content_type)
        if kind == OCTET_STREAM or file.typed:
            return attachment
        # the first type given is kept; a lost type only serves the bytes as octet-stream
        if file.fd >= 0 and self._attributes:  # a new file: its type on it
            try:
                os.setxattr(file.fd, TYPE_ATTRIBUTE, kind.encode("ascii"))
            except OSError as exc:
                if exc.errno in _NO_ATTRIBUTES:
                    self._attributes = False
            else:
                file.typed = True
                return attachment
        sidecar = target + ".type"
        if file.fd < 0 and _attribute_type(target) is not None:
            file.typed = True  # a file already there, typed
        elif not os.access(sidecar, os.F_OK):
            # renamed into place without an fsync of its own
            tmp = self._tmp(folder)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, kind.encode("ascii"))
            finally:
                os.close(fd)
            file.renames.append((tmp, sidecar))
            file.typed = True
        return attachment

    def _make(self, folder: str) -> None:
        if folder not in self._folders:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                if not os.path.isdir(folder):
                    raise
            self._folders.add(folder)

    def _tmp(self, folder: str) -> str:
        return f"{folder}/.tmp-{os.getpid()}-{self._token}-{next(self._names)}"

    async def put(self, data: bytes, name: str, content_type: str) -> Attachment:
        """Store ``data`` durably (grouped with concurrent puts) and return its Attachment."""
        result = await self.submit(data, name, content_type)
        if isinstance(result, Exception):
            raise result
        return result

    def submit(
        self, data: bytes, name: str, content_type: str
    ) -> asyncio.Future[Attachment | Exception]:
        """Queue ``data`` for the next group; the future resolves, once the file is durable,
        to its Attachment or to the exception that kept it out (``AttachmentTooLarge``,
        ``OSError``)."""
        return self._writer.submit((data, name, content_type))

    async def _write_group(self, items: list[_File]) -> list[Attachment | Exception]:
        return await asyncio.to_thread(self.put_many_sync, items)

    async def _write_behind_group(self, items: list[_Behind]) -> list[Attachment | Exception]:
        """Write a group of held files to disk, then release the ones written from Redis (one
        ``HDEL``); a file not written stays held (written again at the next start)."""
        wait = self._behind_next - time.monotonic()
        if wait > 0:  # syncs back to back slowed Valkey's own fsyncs
            await asyncio.sleep(wait)
        self._behind_next = time.monotonic() + self.behind_interval
        try:
            results = await asyncio.to_thread(
                self.put_many_sync,
                [file for file, _ in items],
                sync_fs=True,
                described=[known for _, known in items],
            )
        except Exception as exc:  # no thread to run it (shutting down): every item stays held
            results = [exc] * len(items)
        done = [r.sha256 for r in results if isinstance(r, Attachment)]
        for r in results:
            if isinstance(r, Exception):
                log.warning("attachments: held file not written: %s", r)
        if done and self._holder is not None:  # a task: a slow Redis never holds up the writes
            task = self._spawn(self._release_written(done))
            for digest in done:
                self._releasing[digest] = task
            task.add_done_callback(lambda _: self._released(done, task))
        return results

    def _released(self, digests: list[str], task: asyncio.Task[None]) -> None:
        for digest in digests:
            if self._releasing.get(digest) is task:  # not a later group's release of it
                del self._releasing[digest]

    async def _release_written(self, digests: list[str]) -> None:
        assert self._holder is not None
        try:
            await self._holder.release(digests)
        except Exception as exc:  # written again later: the same bytes, the same name
            log.info("attachments: held files not released (%s)", type(exc).__name__)

    def plan(self, items: Sequence[_File]) -> Plan:
        """Decide how ``items`` become durable: files up to the hold limit (``hold_in``) go into
        Redis with the contact (``Plan.held``, passed to ``Submitter.submit``) and to their own
        files after the answer (``settle``); the others, and all of them while the holder is
        not to be used, are written to disk first (``write_first``)."""
        plan = Plan(list(items), [None] * len(items), [], None)
        holder = self._holder
        if holder is None or time.monotonic() < self._holder_down_until:
            return plan
        fields: dict[str, bytes] = {}
        for i, (data, name, content_type) in enumerate(items):
            if len(data) > self._hold_limit:
                continue
            attachment = self.describe(data, name, content_type)
            plan.results[i] = attachment
            plan.held_at.append(i)
            # no stat here: the writer skips a file that exists, and a stat waits while the
            # writer renames in that folder
            fields[attachment.sha256] = media_type(content_type).encode() + b"\n" + data
        if fields:
            plan.held = (holder.key, fields)
        return plan

    async def write_first(self, plan: Plan) -> list[Attachment | Exception]:
        """Write the files the plan does not hold (durable when this returns); every item's
        result, as ``submit``'s."""
        first = [i for i, r in enumerate(plan.results) if r is None]
        if first:
            written = await asyncio.gather(*(self.submit(*plan.items[i]) for i in first))
            for i, result in zip(first, written, strict=True):
                plan.results[i] = result
        return [r for r in plan.results if r is not None]

    async def settle(self, plan: Plan, in_redis: bool) -> None:
        """After the contact's write: held files are written to disk in the background when
        Redis has them (``in_redis``), else now, durably, before this returns (raises the
        first file's error); either way released from Redis once on disk."""
        if not plan.held_at:
            return
        if in_redis:
            self._spawn_behind(
                (plan.items[i], known if isinstance(known := plan.results[i], Attachment) else None)
                for i in plan.held_at
            )
            return
        items = [plan.items[i] for i in plan.held_at]
        self._holder_down_until = time.monotonic() + 1.0  # Redis away: write first for a while
        results = await asyncio.gather(*(self.submit(*item) for item in items))
        for result in results:
            if isinstance(result, Exception):
                raise result
        digests = [r.sha256 for r in results if isinstance(r, Attachment)]
        # set anyway if the write reached Redis after all (it was sent; Redis was slow): let
        # go now, and once more later for a write that lands after this release
        await self._release_quietly(digests)
        asyncio.get_running_loop().call_later(
            self.late_release_s, lambda: self._spawn(self._release_quietly(digests))
        )

    async def _release_quietly(self, digests: list[str]) -> None:
        if self._holder is not None and digests:
            with contextlib.suppress(Exception):
                await self._holder.release(digests)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._behind.add(task)
        task.add_done_callback(self._behind.discard)
        return task

    def _spawn_behind(self, behind: Iterable[_Behind]) -> None:
        """Queue held files for the next group written behind (no task of their own: the group
        writes them, logs what failed and releases the others; ``close`` waits for both), each
        with the Attachment ``plan`` made of it (its sha256 not taken again in the writer's
        thread, where it held the GIL from the event loop), or None."""
        for entry in behind:
            self._behind_writer.submit(entry)

    async def _write_behind(self, items: list[_File]) -> None:
        """Write held files to disk (one group commit with others); return once they are and
        their group has released them from Redis (its release, not one more ``HDEL``)."""
        results = await asyncio.gather(
            *(self._behind_writer.submit((item, None)) for item in items)
        )
        releases = {
            self._releasing[r.sha256]
            for r in results
            if isinstance(r, Attachment) and r.sha256 in self._releasing
        }
        if releases:
            await asyncio.wait(releases)

    async def _fetch_held(self, sha256: str) -> _File | None:
        if self._holder is None or not _SHA256.fullmatch(sha256):
            return None
        value = await self._holder.fetch(sha256)
        if value is None:
            return None
        kind, _, data = value.partition(b"\n")
        return data, "held", kind.decode("ascii", "replace")

    async def held(self, sha256: str) -> tuple[bytes, str] | None:
        """The bytes and media type of a file held and not yet on disk, or None; a file found
        held is written to disk in the background."""
        found = await self._fetch_held(sha256)
        if found is None:
            return None
        self._spawn_behind([(found, None)])
        return found[0], media_type(found[2])

    async def load(self, sha256: str) -> bytes:
        """The bytes of a stored or held file; raise FileNotFoundError or ValueError."""
        try:
            return await asyncio.to_thread(self.read, sha256)
        except FileNotFoundError:
            found = await self.held(sha256)
            if found is not None:
                return found[0]
        # written and let go between the two looks: on disk now
        return await asyncio.to_thread(self.read, sha256)

    async def ensure(self, sha256: str) -> bool:
        """Whether the file of ``sha256`` is on disk, written first if it is held."""
        if self.path_for(sha256).is_file():
            return True
        found = await self._fetch_held(sha256)
        if found is None:  # written and let go between the two looks, or never there
            return self.path_for(sha256).is_file()
        await self._write_behind([found])
        return self.path_for(sha256).is_file()

    async def write_held(self) -> int:
        """Write every file left held (a process killed between a contact and its files) to
        disk and release it; return how many."""
        if self._holder is None:
            return 0
        digests = await self._holder.held()
        for start in range(0, len(digests), 32):
            chunk = digests[start : start + 32]
            found = await asyncio.gather(*(self._fetch_held(d) for d in chunk))
            await self._write_behind([f for f in found if f is not None])
        return len(digests)

    def start_writing_held(self) -> None:
        """``write_held`` in the background (at start: what a killed process left held)."""

        async def run() -> None:
            await asyncio.to_thread(self._remove_stale_tmp)
            try:
                count = await self.write_held()
            except Exception as exc:  # Redis away: written on first read or the next start
                log.warning("attachments: held files not written at start (%s)", exc)
            else:
                if count:
                    log.info("attachments: %d held files written at start", count)

        task = asyncio.get_running_loop().create_task(run())
        self._behind.add(task)
        task.add_done_callback(self._behind.discard)

    def _remove_stale_tmp(self) -> None:
        """Remove temporary files a killed process left (never renamed into place: not a
        stored file); those of a process still running (another worker) are kept."""
        me = str(os.getpid())
        for tmp in self.root.glob("??/.tmp-*"):
            parts = tmp.name.split("-")
            pid, token = parts[1], parts[2] if len(parts) > 3 else ""
            ours_before = pid == me and token != self._token  # our pid, an earlier process
            if pid.isdigit() and (ours_before or not Path(f"/proc/{pid}").exists()):
                with contextlib.suppress(OSError):
                    tmp.unlink()

    async def close(self) -> None:
        """Let the files being written after ``settle`` finish, for at most 10 s (those left
        stay held)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while loop.time() < deadline:
            if self._behind:  # a hold that lands starts a write
                await asyncio.wait(set(self._behind), timeout=deadline - loop.time())
            elif self._behind_writer.busy:
                try:
                    await asyncio.wait_for(
                        self._behind_writer.drain(), timeout=deadline - loop.time()
                    )
                except TimeoutError:
                    return
            else:
                return

    def content_type(self, path: Path) -> str:
        """The stored content type of the file at ``path`` (octet-stream when none was given):
        its attribute, else the ``.type`` file beside it."""
        kind = _attribute_type(str(path))
        if kind is not None:
            return kind
        try:
            return media_type(path.with_name(path.name + ".type").read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError):
            return OCTET_STREAM

    def read(self, sha256: str) -> bytes:
        """Return the stored bytes; raise FileNotFoundError or ValueError."""
        return self.path_for(sha256).read_bytes()


_File = tuple[bytes, str, str]
"""Bytes, name, content type."""
_Behind = tuple[_File, Attachment | None]
"""A held file to write behind, and the Attachment ``plan`` made of it (None: made again)."""


@dataclass(slots=True)
class Plan:
    """How some files become durable (``AttachmentStore.plan``)."""

    items: list[_File]
    results: list[Attachment | Exception | None]
    """An Attachment for a held file; None until written for the others."""
    held_at: list[int]
    held: tuple[str, dict[str, bytes]] | None
    """The hash key and fields to set with the contact, or None."""


class _Staged:
    """One new file of a group: its open descriptor and the renames that put it in place."""

    __slots__ = ("error", "fd", "folder", "renamed", "renames", "typed")

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.fd = -1
        self.renames: list[tuple[str, str]] = []
        self.renamed = 0
        """How many of ``renames`` are done."""
        self.typed = False
        self.error: OSError | None = None

    def rename_all(self) -> None:
        for tmp, target in self.renames[self.renamed :]:
            os.replace(tmp, target)
            self.renamed += 1

    def remove_unrenamed(self) -> None:
        """Remove the temporary files not renamed into place (a failed group's)."""
        for tmp, _ in self.renames[self.renamed :]:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


BEHIND_BATCH = 256
"""Most files of one group written behind (``AttachmentStore._behind_writer``)."""
BEHIND_INTERVAL_S = 0.25
"""Least time from the start of one group written behind to the next: a ``syncfs`` flushes the
whole file system, and groups written back to back (one a few milliseconds under 8 SMTP
sessions) kept Valkey's ``appendfsync always`` waiting on the journal (the intake write's p50
7.5 against 5.1 ms on the shared machine)."""

_SyncFs = Callable[[int], OSError | None]


def syncfs_reports_errors(release: str) -> bool:
    """Whether a kernel of this release (``os.uname().release``) returns writeback errors from
    ``syncfs``: Linux before 5.8 returned 0 whatever failed to reach the disk."""
    found = re.match(r"(\d+)\.(\d+)", release)
    return found is not None and (int(found[1]), int(found[2])) >= (5, 8)


def _attribute_type(path: str) -> str | None:
    """The content type set on the file at ``path`` (``TYPE_ATTRIBUTE``), or None."""
    try:
        value = os.getxattr(path, TYPE_ATTRIBUTE)
    except OSError:  # none, no such file, or no attributes on this file system
        return None
    try:
        return media_type(value.decode("ascii"))
    except UnicodeDecodeError:
        return None


def _let_go(staged: dict[str, _Staged]) -> None:
    """Close a group's files and remove what was not renamed into place."""
    for file in staged.values():
        file.close()
        file.remove_unrenamed()


def _outcomes(
    out: list[Attachment | Exception], staged: dict[str, _Staged]
) -> list[Attachment | Exception]:
    """``out`` with each file that failed after staging (sync, rename) as its error."""
    failed = {digest: f.error for digest, f in staged.items() if f.error is not None}
    if not failed:
        return out
    return [failed.get(r.sha256, r) if isinstance(r, Attachment) else r for r in out]


def _load_syncfs() -> _SyncFs | None:
    """``syncfs(2)`` through the C library (the os module has none), or None where missing or
    where it does not report writeback errors (then the store keeps its fsyncs)."""
    if not syncfs_reports_errors(os.uname().release):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int

    def syncfs(fd: int) -> OSError | None:
        """Flush the file system holding the open ``fd``; the error it reports, or None."""
        if call(fd) != 0:
            code = ctypes.get_errno() or errno.EIO
            return OSError(code, f"syncfs: {os.strerror(code)}")
        return None

    return syncfs


_syncfs = _load_syncfs()

_SYNC_WORKERS = 16
_sync_pool: ThreadPoolExecutor | None = None
_sync_lock = threading.Lock()


def _fsync_all(fds: list[int]) -> list[OSError | None]:
    """fsync every descriptor, at the same time: the file system's journal (ext4's jbd2, XFS's
    log) commits the fsyncs that wait together in one or two commits, where one after the other
    each waits for a commit of its own (measured on this project's disk under other work: 32
    files in 8-23 ms together, 224-270 ms one by one)."""
    if len(fds) <= 1:
        return [_try_fsync(fd) for fd in fds]
    global _sync_pool
    with _sync_lock:
        if _sync_pool is None:
            _sync_pool = ThreadPoolExecutor(_SYNC_WORKERS, thread_name_prefix="fsync")
        pool = _sync_pool
    return list(pool.map(_try_fsync, fds))


def _try_fsync(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


def _fsync_dirs(folders: list[str]) -> list[OSError | None]:
    """Make the renames into ``folders`` durable, the folders' fsyncs at the same time."""
    fds: list[int] = []
    errors: list[OSError | None] = []
    try:
        for folder in folders:
            try:
                fds.append(os.open(folder, os.O_RDONLY))
                errors.append(None)
            except OSError as exc:
                fds.append(-1)
                errors.append(exc)
        opened = [n for n, fd in enumerate(fds) if fd >= 0]
        for n, error in zip(opened, _fsync_all([fds[n] for n in opened]), strict=True):
            errors[n] = error
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)
    return errors


def _forget_pool() -> None:
    global _sync_pool
    _sync_pool = None  # a forked child has none of its parent's threads


os.register_at_fork(after_in_child=_forget_pool)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def _safe_name(name: str) -> str:
    cleaned = _UNSAFE.sub("_", repair_text(name)).strip() or "attachment"
    return cleaned[:255]
