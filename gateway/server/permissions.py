"""Citizens' data stays private to the gateway's user: the data folder is 0700, the spool's
files and the embedded server's files 0600.

The gateway creates them so (``private_dir``, ``open_private``; the embedded server runs with
umask 077), and checks at start-up what an earlier run, a backup restore or an operator left:
``check_private`` lists every folder or file of the data folder's own state that the group or
others may read, write or enter. ``[gateway] permissions`` says what happens then: ``warn``
(the default: one WARNING naming them) or ``refuse`` (the gateway does not start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import IO, Literal

log = logging.getLogger(__name__)

Policy = Literal["warn", "refuse"]

CHECKED = ("", "spool", "spool/quarantine", "redis", "redis/appendonlydir", "attachments")
"""Folders under the data folder checked with the files directly in them (attachments: the
folder only; with the data folder at 0700 nothing inside is reachable by other users)."""


class UnsafePermissions(Exception):
    """The data folder holds folders or files other users may read (``permissions = refuse``)."""


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) with mode 0700; an existing folder is left as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def open_private(path: Path, mode: Literal["ab", "wb"] = "ab") -> IO[bytes]:
    """Open ``path`` for writing, created 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "ab" else os.O_TRUNC)
    return os.fdopen(os.open(path, flags, 0o600), mode)


def check_private(data_dir: Path) -> list[str]:
    """Return ``"<path> <mode>"`` for each checked folder or file group or others can use."""
    wide: list[str] = []
    for relative in CHECKED:
        folder = data_dir / relative if relative else data_dir
        try:
            mode = folder.lstat().st_mode
        except OSError:
            continue
        if not stat.S_ISDIR(mode):
            continue
        if mode & 0o077:
            wide.append(f"{folder} {stat.filemode(mode)}")
        if relative == "attachments":
            continue
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if entry.is_file(follow_symlinks=False):
                    file_mode = entry.stat(follow_symlinks=False).st_mode
                    if file_mode & 0o077:
                        wide.append(f"{entry.path} {stat.filemode(file_mode)}")
    return wide


def enforce(data_dir: Path, policy: Policy) -> None:
    """Check the data folder (``check_private``); warn, or raise UnsafePermissions."""
    wide = check_private(data_dir)
    if not wide:
        return
    shown = ", ".join(wide[:10]) + (f" and {len(wide) - 10} more" if len(wide) > 10 else "")
    advice = f"chmod -R go-rwx {data_dir}"
    if policy == "refuse":
        raise UnsafePermissions(
            f"other users may read the gateway's data ({shown}); run `{advice}` "
            "(or set [gateway] permissions = \"warn\")"
        )
    log.warning("other users may read the gateway's data: %s; run `%s`", shown, advice)
