"""Content-addressed attachment store shared by every channel.

Bytes are kept once per sha256 under ``<data_dir>/attachments/<aa>/<sha256>``, the content type
they first came with beside them in ``<sha256>.type``; a contact refers to them as
``/v1/attachments/<sha256>``, which the HTTP server serves to API clients with that type.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from pathlib import Path

from gateway.records import Attachment, repair_text

REF_PREFIX = "/v1/attachments/"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
OCTET_STREAM = "application/octet-stream"


def media_type(content_type: str) -> str:
    """``type/subtype`` of a Content-Type (parameters dropped), or octet-stream if malformed."""
    value = content_type.split(";", 1)[0].strip().lower()
    return value if _MEDIA_TYPE.fullmatch(value) else OCTET_STREAM


class AttachmentTooLarge(Exception):
    """The file is larger than the configured bound."""


class AttachmentStore:
    """Stores attachment bytes by sha256, durably (fsync before the rename)."""

    def __init__(self, root: Path, max_size: int) -> None:
        self.root = root
        self.max_size = max_size

    def path_for(self, sha256: str) -> Path:
        """Return where the bytes of ``sha256`` live; raise ValueError for a malformed hash."""
        if not _SHA256.fullmatch(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def put_sync(self, data: bytes, name: str, content_type: str) -> Attachment:
        """Store ``data`` (blocking, durable: file and folder entry fsynced) and return it."""
        attachment, folder = self._write(data, name, content_type)
        if folder is not None:
            _fsync_dir(folder)
        return attachment

    def put_many_sync(self, items: list[tuple[bytes, str, str]]) -> list[Attachment | Exception]:
        """Store several files (blocking); each folder entry is fsynced once for all of them.

        A file that is too large or cannot be written comes back as its exception.
        """
        out: list[Attachment | Exception] = []
        folders: set[Path] = set()
        for data, name, content_type in items:
            try:
                attachment, folder = self._write(data, name, content_type)
            except (AttachmentTooLarge, OSError) as exc:
                out.append(exc)
                continue
            out.append(attachment)
            if folder is not None:
                folders.add(folder)
        for folder in folders:
            _fsync_dir(folder)
        return out

    def _write(self, data: bytes, name: str, content_type: str) -> tuple[Attachment, Path | None]:
        """Write the file if new (fsynced, renamed into place); return it and the folder to sync."""
        if len(data) > self.max_size:
            raise AttachmentTooLarge(f"{len(data)} bytes > {self.max_size}")
        digest = hashlib.sha256(data).hexdigest()
        target = self.path_for(digest)
        folder = None
        if not target.exists():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            target.parent.mkdir(exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            folder = target.parent
        kind = media_type(content_type)
        sidecar = target.with_name(target.name + ".type")
        if kind != OCTET_STREAM and not sidecar.exists():  # the first type given is kept
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(kind)
            os.replace(tmp, sidecar)
            folder = target.parent
        attachment = Attachment(
            name=_safe_name(name),
            content_type=content_type or "application/octet-stream",
            size=len(data),
            sha256=digest,
            ref=REF_PREFIX + digest,
        )
        return attachment, folder

    async def put(self, data: bytes, name: str, content_type: str) -> Attachment:
        """Store ``data`` off the event loop and return its Attachment."""
        if len(data) < 64 * 1024:
            return self.put_sync(data, name, content_type)
        return await asyncio.to_thread(self.put_sync, data, name, content_type)

    def content_type(self, path: Path) -> str:
        """The stored content type of the file at ``path`` (octet-stream when none was given)."""
        try:
            return media_type(path.with_name(path.name + ".type").read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError):
            return OCTET_STREAM

    def read(self, sha256: str) -> bytes:
        """Return the stored bytes; raise FileNotFoundError or ValueError."""
        return self.path_for(sha256).read_bytes()


def _fsync_dir(folder: Path) -> None:
    """Make a rename into ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def _safe_name(name: str) -> str:
    cleaned = _UNSAFE.sub("_", repair_text(name)).strip() or "attachment"
    return cleaned[:255]
