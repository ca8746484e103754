"""One gateway per data folder: an exclusive lock held for the life of the process.

The spool, the attachment store and the embedded Redis's append-only file live in the data
folder; two processes sharing them would replay (and delete) each other's open spool segments
or start two servers on one AOF. Several instances side by side each get their own folder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirBusy(Exception):
    """Another process holds the data folder."""


class DataDirLock:
    """``fcntl.flock`` on ``<data_dir>/.lock``; released when closed or when the process dies."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise DataDirBusy naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirBusy(
                f"data folder {self.path.parent} is in use by another gateway (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
