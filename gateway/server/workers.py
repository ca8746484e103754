"""``gateway serve --workers N``: one parent process and N worker processes, every core used.

One Python process is the ceiling of the intake path (docs/performance.md), so a host runs one
worker per core. The **parent** does no intake itself:

- it holds the data folder's lock (``gateway/server/lock.py``), checks its permissions and runs
  the embedded Valkey when no Redis is configured (started again if it dies, as in one process);
- it binds every listener address (HTTP, ``metrics_listen``, each adapter's ``listen``/
  ``agi_listen``) once per worker slot with ``SO_REUSEPORT`` (``listeners.bind_slots``), so a
  port written as ``0`` is one port for all, and hands each worker its slot's bound sockets
  (inherited, the parent's copies closed): the worker listens on them once it serves, the
  kernel spreads new connections over the listening workers, and a dead worker's socket goes
  with it (its queued connections are reset, as when a single process dies; before any worker
  serves, connections are refused, as before a single process listens). A replacement gets
  newly bound sockets on the same ports;
- it moves spool segments left in a folder no worker will own (``spool/`` of a one-process run,
  ``spool/worker-K`` for K >= N) into a worker's folder before starting any worker (a
  one-process start moves every worker's folder into its ``spool/``, ``runtime.py``);
- it starts the workers (``python -m gateway serve`` with the ``GATEWAY_WORKER`` environment
  variable saying which slot, which sockets, which Redis), restarts a worker that dies with a
  back-off (0.5 s doubling to 30 s, from 0.5 s again after a minute of running), hands the
  spool segments of a worker that has not served for ``HANDOVER_S`` to a serving worker's
  folder (while it is down, under its spool lock), and on SIGTERM
  or SIGINT sends SIGTERM to every worker, waits for them to drain (45 s, then SIGKILL), stops
  Valkey and exits 0 (1 if a worker had to be killed; a worker that fails before it ever
  served stops the whole start with its exit code, e.g. 2 for a config error).

Each **worker** is a whole gateway (``gateway/server/runtime.py``) with three differences: its
instance name is ``<instance>-w<K>`` (consumer names and lease holders are per worker, and a
replacement takes over its predecessor's pending entries and leases at once), its spool is
``spool/worker-K`` (replayed by its replacement: the same slot, the same folder, locked by one
process at a time), and it dies with the parent (``PR_SET_PDEATHSIG``). Singletons (the
deadline watcher, surge detection, each Telegram poller, push lane, AMI tracker and SMPP/CMPP
bind) run under the fleet leases, so exactly one worker of one instance holds each, as between
instances.

**Metrics.** Each worker also serves ``/metrics`` and ``/readyz`` of its own on a unix socket,
``<data_dir>/run/worker-K.sock``. Whichever worker answers a scrape of ``/metrics`` (the kernel
picks one) asks every other worker there and returns all of them, each series with a
``worker="K"`` label: one scrape target as before, counters of each process kept apart (a
restarted worker's reset is a normal counter reset), per-worker CPU and balance visible.
``/readyz`` on the shared port answers the same way for the whole instance: ready when every
worker is, each worker's own answer under ``workers`` (``WorkerEndpoint.ready_all``). The
multiprocess mode of prometheus_client was not taken: it needs its folder before the metrics
exist, does not carry the process, GC and custom collectors, and keeps the files of dead
processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.server.config import HostPort, Settings
from gateway.server.lock import DataDirBusy, DataDirLock
from gateway.server.supervise import Backoff

log = logging.getLogger(__name__)

ENV = "GATEWAY_WORKER"
RESTART_BACKOFF = (0.5, 30.0)
DRAIN_S = 45.0
HANDOVER_S = 10.0
"""A dead worker's spool goes to a serving worker once its slot has not served for this long."""
"""A worker still running this long after SIGTERM is killed (systemd's stop timeout is 60 s)."""
_PR_SET_PDEATHSIG = 1
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerRole:
    """What the parent tells a worker (``GATEWAY_WORKER``, JSON)."""

    slot: int
    count: int
    parent: int
    """The parent's pid: the worker exits when it is gone."""
    redis_url: str = ""
    """The parent's embedded Valkey; empty when Redis is configured."""
    listen: tuple[tuple[tuple[str, ...], str], ...] = ()
    """Config values to set before parsing: (path, "host:port") with the ports the parent bound."""
    sockets: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """("host:port", inherited file descriptor) of this worker's slot."""
    ready_fd: int = -1
    """Written to once the worker serves, then closed."""

    def to_env(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_env(cls) -> WorkerRole | None:
        raw = os.environ.get(ENV)
        if not raw:
            return None
        d = json.loads(raw)
        return cls(
            slot=int(d["slot"]),
            count=int(d["count"]),
            parent=int(d["parent"]),
            redis_url=str(d["redis_url"]),
            listen=tuple((tuple(path), str(value)) for path, value in d["listen"]),
            sockets={str(a): [int(fd) for fd in fds] for a, fds in d["sockets"].items()},
            ready_fd=int(d["ready_fd"]),
        )

    def apply(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``raw`` (a parsed TOML config) with the listeners' addresses the parent bound."""
        for path, value in self.listen:
            table = raw
            for key in path[:-1]:
                table = table.setdefault(key, {})
            table[path[-1]] = value
        return raw

    def instance(self, base: str) -> str:
        return f"{base}-w{self.slot}"

    def spool_dir(self, data_dir: Path) -> Path:
        return spool_folder(data_dir, self.slot)

    def socket_path(self, data_dir: Path, slot: int | None = None) -> Path:
        return run_dir(data_dir) / f"worker-{self.slot if slot is None else slot}.sock"

    async def lock_spool(self, lock: DataDirLock, wait_s: float = 30.0) -> None:
        """Take this slot's spool folder, waiting while a predecessor still holds it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                lock.acquire()
                return
            except DataDirBusy:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)

    def announce_ready(self) -> None:
        if self.ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.ready_fd, b"1")
                os.close(self.ready_fd)


def default_count(configured: int) -> int:
    """``configured`` if set (> 0), else one per core this process may run on."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def spool_folder(data_dir: Path, slot: int) -> Path:
    return data_dir / "spool" / f"worker-{slot}"


def run_dir(data_dir: Path) -> Path:
    """Where the workers' sockets are: ``<data_dir>/run``, or a folder in the temporary folder
    named after it when that path is too long for a unix socket."""
    folder = data_dir / "run"
    if len(str(folder / "worker-000.sock")) > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        folder = Path(tempfile.gettempdir()) / f"gw-run-{digest}"
    return folder


def listener_addresses(settings: Settings) -> Iterator[tuple[tuple[str, ...], HostPort]]:
    """Every address the gateway listens on, with its config path: ``[http] listen`` and
    ``metrics_listen``, and each adapter's ``listen`` and ``agi_listen``."""
    from gateway.server.config import parse_host_port

    yield ("http", "listen"), settings.http.listen
    if settings.http.metrics_listen is not None:
        yield ("http", "metrics_listen"), settings.http.metrics_listen
    for name, table in settings.adapters.items():
        for key in ("listen", "agi_listen"):
            if isinstance(table.get(key), str):
                with contextlib.suppress(ValueError):
                    yield ("adapters", name, key), parse_host_port(table[key])


def adopt_spools(data_dir: Path, count: int) -> int:
    """Move spool segments from folders no worker of ``count`` owns (``spool/`` itself when
    ``count`` > 1, ``spool/worker-K`` for K >= count; with ``count`` = 1 every worker folder)
    into an owned folder. Runs in the parent while no worker runs. Returns the files moved."""
    root = data_dir / "spool"
    if not root.is_dir():
        return 0
    owned = {root} if count == 1 else {spool_folder(data_dir, k) for k in range(count)}
    sources = [root, *sorted(p for p in root.glob("worker-*") if p.is_dir())]
    moved = 0
    for i, folder in enumerate(p for p in sources if p not in owned):
        moved += move_segments(folder, root if count == 1 else spool_folder(data_dir, i % count))
    return moved


def move_segments(source: Path, target: Path) -> int:
    """Move ``source``'s spool segments into ``target`` (renamed if the name is taken there);
    return how many. The replayer of the worker owning ``target`` finds them on its next pass
    (it lists the folder each time); the caller makes sure no process writes ``source``."""
    segments = sorted(source.glob("segment-*.log"))
    if not segments:
        return 0
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for segment in segments:
        destination = target / segment.name
        if destination.exists():
            destination = target / f"{segment.stem}-from-{source.name}.log"
        os.replace(segment, destination)
    for folder in (target, source):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    log.warning("spool: %d segment(s) of %s moved to %s", len(segments), source, target)
    return len(segments)


def hand_over_spool(data_dir: Path, dead: int, serving: int) -> int:
    """Move dead slot ``dead``'s spool segments to serving slot ``serving``'s folder, holding
    the dead slot's spool lock meanwhile (0 if a process holds it: not dead after all)."""
    lock = DataDirLock(spool_folder(data_dir, dead))
    try:
        lock.acquire()
    except DataDirBusy:
        return 0
    try:
        return move_segments(spool_folder(data_dir, dead), spool_folder(data_dir, serving))
    finally:
        lock.release()


# ------------------------------------------------------------------ the parent


@dataclasses.dataclass
class _Slot:
    index: int
    process: asyncio.subprocess.Process | None = None
    served: bool = False
    restarts: int = 0
    up: bool = False
    """Its worker serves now."""
    last_up: float = 0.0
    """When its worker last served (monotonic)."""


class WorkerPool:
    """Starts, watches and stops the workers (see the module docstring)."""

    def __init__(
        self,
        config_path: str | None,
        count: int,
        redis_url: str,
        listen: list[tuple[tuple[str, ...], str]],
        sockets: dict[str, list[socket.socket]],
        data_dir: Path | None = None,
    ) -> None:
        """``sockets``: by "host:port", one bound socket per slot for the first start of each
        worker (the parent's copy is closed once the worker has it); ``data_dir``: where the
        workers' spools are (a dead worker's is handed to a serving one, see ``_keep``)."""
        self.data_dir = data_dir
        self.config_path = config_path
        self.count = count
        self.redis_url = redis_url
        self.listen = listen
        self.sockets = sockets
        self.slots = [_Slot(k) for k in range(count)]
        self.stopping = asyncio.Event()
        self.failed: int | None = None
        self.killed = False

    async def run(self) -> int:
        """Run until ``stop()`` (or a worker fails before it served); return the exit code."""
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        await self.stopping.wait()
        await self._drain()
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if self.failed is not None:
            return self.failed
        return 1 if self.killed else 0

    def stop(self) -> None:
        self.stopping.set()

    def pids(self) -> dict[int, int]:
        return {
            s.index: s.process.pid
            for s in self.slots
            if s.process is not None and s.process.returncode is None
        }

    async def _keep(self, slot: _Slot) -> None:
        backoff = Backoff(*RESTART_BACKOFF)
        while not self.stopping.is_set():
            started = time.monotonic()
            code = await self._run_once(slot)
            if self.stopping.is_set():
                return
            if not slot.served:
                log.error("worker %d exited with %s before it served: stopping", slot.index, code)
                self.failed = code if code else 1
                self.stop()
                return
            if time.monotonic() - started >= 60.0:
                backoff.reset()
            slot.restarts += 1
            self._hand_over(slot)
            pause = backoff.next()
            log.error(
                "worker %d exited (%s); starting it again in %.1f s", slot.index, code, pause
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self.stopping.wait()

    def _hand_over(self, slot: _Slot) -> None:
        """A worker that keeps dying (it has not served for ``HANDOVER_S``) would keep its
        spool for ever: while it is down, its segments go to a serving worker, whose replayer
        takes them (contacts dedupe, so a segment replayed twice is harmless)."""
        if self.data_dir is None or time.monotonic() - slot.last_up < HANDOVER_S:
            return
        to = next((s for s in self.slots if s.up and s is not slot), None)
        if to is None:
            log.error("worker %d has not served for %.0f s and no worker serves: its spool "
                      "waits", slot.index, time.monotonic() - slot.last_up)
            return
        try:
            moved = hand_over_spool(self.data_dir, slot.index, to.index)
        except OSError as exc:
            log.error("worker %d's spool not handed over: %s", slot.index, exc)
            return
        if moved:
            log.error("worker %d has not served for %.0f s: its spool (%d segment(s)) handed "
                      "to worker %d", slot.index, time.monotonic() - slot.last_up, moved,
                      to.index)

    async def _run_once(self, slot: _Slot) -> int:
        read_end, write_end = os.pipe()
        handed = self.sockets_of(slot.index)
        fds = [s.fileno() for s in handed.values()]
        role = WorkerRole(
            slot=slot.index,
            count=self.count,
            parent=os.getpid(),
            redis_url=self.redis_url,
            listen=tuple(self.listen),
            sockets={a: [s.fileno()] for a, s in handed.items()},
            ready_fd=write_end,
        )
        argv = [sys.executable, "-m", "gateway", "serve", "--workers", "1"]
        if self.config_path:
            argv += ["-c", self.config_path]
        try:
            slot.process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=(write_end, *fds), env={**os.environ, ENV: role.to_env()}
            )
        finally:
            os.close(write_end)
            for s in handed.values():  # the worker's now: it dies with it
                s.close()
        try:
            ready = await asyncio.to_thread(os.read, read_end, 1)  # b"" when it died first
        finally:
            os.close(read_end)
        if ready:
            slot.served = slot.up = True
            log.info("worker %d (pid %d) serving", slot.index, slot.process.pid)
        try:
            return await slot.process.wait()
        finally:
            if slot.up:
                slot.up, slot.last_up = False, time.monotonic()

    def sockets_of(self, slot: int) -> dict[str, socket.socket]:
        """Slot ``slot``'s bound sockets: those of the first start, then newly bound ones."""
        from gateway.server.listeners import bind_slots

        handed: dict[str, socket.socket] = {}
        for address, per_slot in self.sockets.items():
            s = per_slot[slot]
            if s.fileno() < 0:  # closed: handed to an earlier worker of this slot
                host, _, port = address.rpartition(":")
                s = per_slot[slot] = bind_slots(host, int(port), 1)[0]
            handed[address] = s
        return handed

    async def _drain(self) -> None:
        running = [s.process for s in self.slots if s.process and s.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        if not running:
            return
        waits = [asyncio.create_task(p.wait()) for p in running]
        _, late = await asyncio.wait(waits, timeout=DRAIN_S)
        if late:
            self.killed = True
            for process in running:
                if process.returncode is None:
                    log.error("worker pid %d did not stop in %.0f s: killed", process.pid, DRAIN_S)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.wait(late, timeout=10.0)


async def serve_workers(config_path: str | None, settings: Settings, count: int) -> int:
    """The parent of ``gateway serve --workers N`` (N > 1): see the module docstring."""
    from gateway import __version__
    from gateway.queueing.embedded import EmbeddedRedis, own_private_dir
    from gateway.server import permissions
    from gateway.server.listeners import bind_slots
    from gateway.server.metrics import Metrics
    from gateway.server.supervise import Supervisor

    data_dir = settings.gateway.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = DataDirLock(data_dir)
    lock.acquire()
    opened: dict[str, list[socket.socket]] = {}
    supervisor = Supervisor(Metrics())
    embedded: EmbeddedRedis | None = None
    try:
        permissions.enforce(data_dir, settings.gateway.permissions)
        adopt_spools(data_dir, count)
        own_private_dir(run_dir(data_dir))  # the workers' sockets: ours alone, even in /tmp
        listen: list[tuple[tuple[str, ...], str]] = []
        for path, address in listener_addresses(settings):
            slots = bind_slots(address.host, address.port, count)
            bound = HostPort(address.host, slots[0].getsockname()[1])
            key = f"{bound.host}:{bound.port}"
            if key in opened:  # two listeners on one address: the adapters will say so
                for s in slots:
                    s.close()
            else:
                opened[key] = slots
            listen.append((path, str(bound)))
        redis_url = ""
        if not settings.redis.url and settings.redis.sentinel is None:
            embedded = EmbeddedRedis(data_dir, settings.redis.server_binary)
            await embedded.start()
            redis_url = embedded.url
            supervisor.spawn("embedded-redis", embedded.keep_running, backoff=(0.5, 10.0))
        pool = WorkerPool(config_path, count, redis_url, listen, opened, data_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pool.stop)
        shown = ", ".join(f"{'.'.join(p)} {v}" for p, v in listen)
        log.info("gateway %s: %d workers, listening on %s", __version__, count, shown)
        print(
            f"gateway {__version__} listening: http://{listen[0][1]} with {count} workers"
            " (Ctrl-C to stop)",
            file=sys.stderr,
        )
        return await pool.run()
    finally:
        await supervisor.close()
        if embedded is not None:
            await embedded.stop()
        for slots in opened.values():
            for s in slots:
                s.close()
        lock.release()


# ------------------------------------------------------------------ in a worker


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (Linux), and exit now if it is gone already:
    a worker never outlives the parent that holds the data folder."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class WorkerEndpoint:
    """A worker's own ``/metrics`` and ``/readyz`` on ``<data_dir>/run/worker-K.sock``, and the
    scrape of every worker merged (the module docstring, Metrics)."""

    def __init__(
        self,
        role: WorkerRole,
        data_dir: Path,
        own_metrics: Callable[[], Awaitable[bytes]],
        own_ready: Callable[[], Awaitable[tuple[bool, dict[str, object]]]],
    ) -> None:
        self.role = role
        self.data_dir = data_dir
        self.own_metrics = own_metrics
        self.own_ready = own_ready
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/readyz", self._ready)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        path = self.role.socket_path(self.data_dir)
        path.unlink(missing_ok=True)
        await web.UnixSite(self._runner, str(path)).start()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self.role.socket_path(self.data_dir).unlink(missing_ok=True)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.own_metrics(), content_type="text/plain")

    async def _ready(self, request: web.Request) -> web.Response:
        ok, detail = await self.own_ready()
        detail = {"worker": {"slot": self.role.slot, "pid": os.getpid()}, **detail}
        return web.json_response(detail, status=200 if ok else 503)

    async def render_all(self) -> bytes:
        """Every worker's metrics with a ``worker`` label (a worker that does not answer
        within a second is left out of this scrape)."""
        texts = {self.role.slot: await self.own_metrics()}
        others = [k for k in range(self.role.count) if k != self.role.slot]
        if others:
            results = await asyncio.gather(*(self._fetch(k, "/metrics") for k in others))
            texts.update(
                {k: r[1] for k, r in zip(others, results, strict=True) if r and r[0] == 200}
            )
        return merge_metrics(texts)

    async def ready_all(self) -> tuple[bool, dict[str, object]]:
        """The instance's readiness for the shared port's ``/readyz``: ready only when every
        worker answers (within a second) and is ready, since the kernel gives each listening
        worker its share of new connections. Each worker's own answer is under ``workers``
        (``"ready"`` added; a worker that does not answer shows ``{"ready": false, "answering":
        false}``); at the top: ``redis`` and ``spool`` true when true in every answering worker,
        ``spool_depth`` summed, ``leases`` (name: fencing token) of all workers, and ``backlog``
        and ``replies_held`` (of the shared Redis) as this worker sees them."""
        ok, own = await self.own_ready()
        workers: dict[int, dict[str, Any]] = {
            self.role.slot: {"ready": ok, "worker": {"slot": self.role.slot, "pid": os.getpid()},
                             **own}
        }
        others = [k for k in range(self.role.count) if k != self.role.slot]
        results = await asyncio.gather(*(self._fetch(k, "/readyz") for k in others))
        for slot, result in zip(others, results, strict=True):
            detail: dict[str, Any] = {"ready": False, "answering": False}
            if result is not None:
                with contextlib.suppress(ValueError):
                    answer = json.loads(result[1])
                    if isinstance(answer, dict):
                        detail = {"ready": result[0] == 200, **answer}
            workers[slot] = detail
        answering = [d for d in workers.values() if d.get("answering", True)]
        leases: dict[str, object] = {}
        for d in answering:
            leases.update(d.get("leases") or {})
        summary: dict[str, object] = {
            "redis": all(d.get("redis") is True for d in answering),
            "spool": all(d.get("spool") is True for d in answering),
            "spool_depth": sum(int(d.get("spool_depth") or 0) for d in answering),
            "leases": dict(sorted(leases.items())),
            "workers": {str(k): workers[k] for k in sorted(workers)},
        }
        for shared in ("backlog", "replies_held"):  # of the shared Redis: one worker's is all's
            if shared in own:
                summary[shared] = own[shared]
        return all(d["ready"] for d in workers.values()), summary

    async def _fetch(self, slot: int, path: str) -> tuple[int, bytes] | None:
        """(status, body) of ``path`` asked of worker ``slot``, or None when it does not
        answer within a second."""
        socket_path = self.role.socket_path(self.data_dir, slot)
        try:
            connector = aiohttp.UnixConnector(path=str(socket_path))
            timeout = aiohttp.ClientTimeout(total=1.0)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://worker{path}") as resp,
            ):
                return resp.status, await resp.read()
        except (OSError, aiohttp.ClientError, TimeoutError):
            return None


def merge_metrics(texts: dict[int, bytes]) -> bytes:
    """Prometheus text expositions of several workers as one, each sample labelled with its
    worker (families kept whole, as the format requires)."""
    families: dict[str, Metric] = {}
    for slot, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode()):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples += [
                Sample(s.name, {**s.labels, "worker": str(slot)}, s.value, s.timestamp)
                for s in family.samples
            ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families
