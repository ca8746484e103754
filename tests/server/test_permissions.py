"""Citizens' data is private to the gateway's user: the data folder 0700, spool and embedded
Redis files 0600, and a start-up check that warns (or refuses) when something is wider."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.server.permissions import UnsafePermissions
from gateway.server.runtime import Gateway
from tests.e2e.test_serve import PY
from tests.harness import settings_for
from tests.queueing.test_intake import inbound


def wide_entries(root: Path) -> list[str]:
    """Every folder and file under ``root`` (itself included) that group or others can use."""
    found = []
    for folder, _dirs, files in os.walk(root):
        for path in [Path(folder)] + [Path(folder) / f for f in files]:
            mode = path.lstat().st_mode
            if stat.S_ISSOCK(mode):
                continue  # the server's socket: 0700 by unixsocketperm, in a 0700 folder
            if mode & 0o077:
                found.append(f"{path.relative_to(root)} {stat.filemode(mode)}")
    return found


async def test_spool_attachments_lock_and_embedded_redis_are_private(tmp_path, prefix):
    """Under the usual umask 022, everything the gateway and its embedded server write in the
    data folder is 0700 (folders) or 0600 (files)."""
    old = os.umask(0o022)
    try:
        settings, configs = settings_for(tmp_path / "data", "", prefix)
        gw = Gateway(settings, configs)
        await gw.start()
        try:
            assert gw.embedded is not None
            await gw.redis.set("x", "1")
            await gw.spool.append(gw.intake.prepare(inbound(external_id="p1")))
            gw.attachments.put_sync(b"%PDF-", "report.pdf", "application/pdf")
            await gw.spool.rotate()
        finally:
            await gw.stop()
    finally:
        os.umask(old)
    data = tmp_path / "data"
    assert list((data / "spool").glob("segment-*.log"))
    assert list((data / "redis" / "appendonlydir").iterdir())
    assert wide_entries(data) == []


def test_wider_data_folder_warns_at_start_up_or_is_refused(tmp_path, redis_url, prefix, caplog):
    data = tmp_path / "data"
    (data / "spool").mkdir(parents=True)
    segment = data / "spool" / "segment-00000000000000000001.log"
    segment.write_bytes(b"")
    data.chmod(0o755)
    segment.chmod(0o644)

    async def start(policy: str) -> None:
        settings, configs = settings_for(data, redis_url, prefix, gateway={"permissions": policy})
        gw = Gateway(settings, configs)
        try:
            await gw.start()
        finally:
            await gw.stop()

    caplog.set_level(logging.WARNING, logger="gateway.server.permissions")
    asyncio.run(start("warn"))
    (warning,) = caplog.records
    assert str(data) in warning.getMessage() and "drwxr-xr-x" in warning.getMessage()
    assert str(segment) in warning.getMessage() and "-rw-r--r--" in warning.getMessage()
    with pytest.raises(UnsafePermissions):
        asyncio.run(start("refuse"))
    assert oct(data.stat().st_mode & 0o777) == "0o755"  # the operator's folder is not changed


def test_serve_refuses_with_a_clear_message_and_exit_code_2(tmp_path):
    data = tmp_path / "var"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        f'[gateway]\ndata_dir = "{data}"\npermissions = "refuse"\n'
        '[http]\nlisten = "127.0.0.1:0"\n'
    )
    done = subprocess.run(
        [PY, "-m", "gateway", "serve", "-c", str(cfg)], capture_output=True, timeout=60
    )
    assert done.returncode == 2
    assert b"chmod -R go-rwx" in done.stderr
