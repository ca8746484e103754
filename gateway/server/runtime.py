"""The running gateway: wires Redis, Intake, the HTTP server, adapters and reply routing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.adapters import Adapter, AdapterContext, load_channel_types, load_media
from gateway.cases.api.services import CaseServices
from gateway.cases.replies import ReplyRouter
from gateway.contact import safejson
from gateway.contact.attachments import AttachmentStore
from gateway.contact.clock import SYSTEM_CLOCK, Clock
from gateway.contact.sla import SlaPolicy
from gateway.queueing.backlog import StreamKeeper
from gateway.queueing.coordination import Leases, SharedState
from gateway.queueing.embedded import EmbeddedRedis
from gateway.queueing.held import RedisHolder
from gateway.queueing.intake import Intake
from gateway.queueing.keys import Keys
from gateway.queueing.spool import Spool
from gateway.queueing.store import RateLimit, RedisQueue, connect, decode_fields
from gateway.records import Contact, Event
from gateway.server import permissions
from gateway.server.admission import Admission
from gateway.server.auth import ApiKeys
from gateway.server.config import AdapterSettings, LimitsSection, Settings
from gateway.server.egress import SendLimiter, send_rate_of
from gateway.server.http import CoreRoutes, HttpServer, build_app
from gateway.server.intake_api import IntakeApi
from gateway.server.lock import DataDirLock
from gateway.server.metrics import Metrics
from gateway.server.supervise import Supervisor
from gateway.server.workers import WorkerEndpoint, WorkerRole, adopt_spools

log = logging.getLogger(__name__)


def sender_contacts_of(table: dict[str, Any], limits: LimitsSection) -> int:
    """An adapter's per-sender limit: its table's ``sender_contacts``, else ``[limits]
    sender_contacts`` raised to its channel type's floor (a limit of 0 stays off)."""
    own = table.get("sender_contacts")
    if own is not None:
        return int(own)
    if limits.sender_contacts <= 0:
        return 0
    return max(limits.sender_contacts, load_channel_types()[table["type"]].sender_contacts)


YOUNG_OBJECTS = 10_000
"""The garbage collector's first threshold in a serving process (CPython's default: 700)."""


def settle_heap() -> None:
    """After start-up, in a serving process: move every object made so far (modules, config,
    adapters, the app) out of the collector's sight (``gc.freeze``), and collect the young
    generation after 10,000 new objects instead of 700. Measured under the intake load
    (docs/performance.md): with the defaults a contact paid tens of microseconds of
    collections (a young collection every ~30 contacts, each a millisecond or more, a stall
    of every request in flight); with these, a collection is rare and its walk is short.
    Objects in reference cycles are still collected, later. Not for a process that starts
    many gateways (tests): what a frozen object holds is never collected."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_OBJECTS, middle, old)


class Gateway:
    """One gateway instance. ``start`` returns once every listener accepts connections."""

    def __init__(
        self,
        settings: Settings,
        adapter_configs: dict[str, Any] | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        worker: WorkerRole | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        """Set in a worker of ``gateway serve --workers N`` (gateway/server/workers.py)."""
        self.adapter_configs = adapter_configs or {}
        self.clock = clock
        self.instance = settings.gateway.instance or f"{socket.gethostname()}-{os.getpid()}"
        if worker is not None:
            base = settings.gateway.instance or f"{socket.gethostname()}-{worker.parent}"
            self.instance = worker.instance(base)
        self.data_dir: Path = settings.gateway.data_dir.resolve()
        self.keys = Keys(settings.redis.prefix)
        self.metrics = Metrics()
        self.supervisor = Supervisor(self.metrics)
        """Runs the background loops (replayer, replies, ...); see gateway/server/supervise.py."""
        self.adapters: dict[str, Adapter] = {}
        self.embedded: EmbeddedRedis | None = None
        self.lock = DataDirLock(worker.spool_dir(self.data_dir) if worker else self.data_dir)
        """The data folder's lock; a worker's parent holds that one, the worker its spool's."""
        self.endpoint: WorkerEndpoint | None = None
        self.redis_url = settings.redis.url
        self._started: list[Adapter] = []
        self._running = False
        self.http: HttpServer | None = None
        self.metrics_http: HttpServer | None = None
        self.replies: ReplyRouter | None = None
        self.keeper: StreamKeeper | None = None
        self.cases: CaseServices | None = None

    @property
    def http_port(self) -> int:
        return self.http.port if self.http else 0

    async def start(self) -> None:
        """Start everything; on failure, stop what was started and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        s = self.settings
        self._running = True
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.worker is None:
            self.lock.acquire()
            permissions.enforce(self.data_dir, s.gateway.permissions)
            adopt_spools(self.data_dir, 1)  # what workers of a `--workers N` run left
            self.spool = Spool(self.data_dir / "spool")
        else:  # the parent holds the folder; a dead predecessor may hold its spool a moment
            await self.worker.lock_spool(self.lock)
            self.spool = Spool(self.worker.spool_dir(self.data_dir))
        self.spool.open()
        self.attachments = AttachmentStore(self.data_dir / "attachments", s.intake.max_attachment)
        if self.worker is not None and self.worker.redis_url:
            self.redis_url = self.worker.redis_url  # the parent's embedded server
        elif not s.redis.url and s.redis.sentinel is None:
            self.embedded = EmbeddedRedis(self.data_dir, s.redis.server_binary)
            await self.embedded.start()
            self.redis_url = self.embedded.url
            self.supervisor.spawn("embedded-redis", self.embedded.keep_running, backoff=(0.5, 10.0))
        self.redis = connect(s.redis, self.redis_url)
        try:
            holder = RedisHolder(self.redis, self.keys, self.attachments.root)
        except OSError as exc:  # no id for the folder: every file written before its answer
            log.warning("attachments: nothing held in Redis (%s)", exc)
        else:
            self.attachments.hold_in(holder)
        self.queue = RedisQueue(
            self.redis,
            self.keys,
            self.clock,
            source=self.instance,
            dedupe_window_s=s.intake.dedupe_window,
            repeat_window_s=s.intake.repeat_window,
            retention_s=s.redis.retention,
            maxlen=s.redis.stream_maxlen,
            min_replicas=s.redis.min_replicas,
            replica_timeout_ms=int(s.redis.write_timeout * 1000),
            sender_limit=RateLimit(s.limits.sender_contacts, s.limits.sender_window),
            adapter_limit=RateLimit(s.limits.adapter_contacts, s.limits.adapter_window),
            sender_limits={
                name: RateLimit(sender_contacts_of(table, s.limits), s.limits.sender_window)
                for name, table in s.adapters.items()
            },
            sender_exempt=s.limits.sender_exempt,
            short_abandon_ms=int(float(s.sla.short_abandon) * 1000),
        )
        steps_failed = self.metrics.dashboard_steps_failed
        self.queue.step_failed = lambda writer: steps_failed.labels(writer).inc()
        safejson.configure(s.limits.json_depth, s.limits.json_string)
        self.intake = Intake(
            self.queue,
            self.spool,
            SlaPolicy(s.sla, load_media()),
            self.metrics,
            self.clock,
            write_timeout_s=s.redis.write_timeout,
            max_batch=s.redis.max_batch,
        )
        try:
            await self.queue.load_scripts()
        except Exception as exc:
            log.warning("redis unreachable at start (%s): contacts go to the spool", exc)
            self.intake.redis_up = False
        else:
            await self._warn_if_not_durable()
            self.attachments.start_writing_held()
        app = build_app(s.http.max_body, self.metrics)
        api_keys = ApiKeys(s.api)
        core = CoreRoutes(
            self._instance_ready,
            self._render_metrics,
            self.attachments,
            api_keys,
            s.http.metrics_token,
        )
        core.register(app.router, with_metrics=s.http.metrics_listen is None)
        if s.http.metrics_listen is not None:  # /metrics off the webhook port
            probes = build_app(s.http.max_body)
            core.register_probes(probes.router)
            self.metrics_http = HttpServer(probes, s.http.metrics_listen, s.limits)
        self.admission = Admission(
            self.intake, s.limits.in_flight, float(s.limits.loop_lag), self.metrics
        )
        IntakeApi(
            self.admission, api_keys, self.clock, s.http.max_body, s.api.region
        ).register(app, fast=s.http.fast_intake)
        self.leases = Leases(self.redis, self.keys, self.instance, s.fleet.lease_ttl)
        self.cases = CaseServices(
            s,
            self.queue,
            self.attachments,
            self.clock,
            self.metrics,
            self.instance,
            self.leases,
            self.supervisor,
        )
        self.cases.register(app.router)
        await self.cases.start()  # push groups exist before the first contact can arrive
        channel_types = load_channel_types()
        adapter_settings = AdapterSettings.of(s)  # no secrets: not the core's, no adapter's
        for name, table in s.adapters.items():
            channel_type = channel_types[table["type"]]
            ctx = AdapterContext(
                name=name,
                intake=self.admission,
                events=self.intake,
                contacts=self.queue,
                router=app.router,
                attachments=self.attachments,
                clock=self.clock,
                settings=adapter_settings,
                leases=self.leases,
                state=self.state_for(name),
                supervisor=self.supervisor,
                metrics=self.metrics.adapter(name),
            )
            self.adapters[name] = channel_type.factory(ctx, self.adapter_configs[name])
        self.app = app
        self.http = HttpServer(app, s.http.listen, s.limits, self.admission)
        await self.http.start()
        if self.metrics_http is not None:
            await self.metrics_http.start()
        self.intake.start(self.supervisor)
        self.admission.start()
        for adapter in self.adapters.values():
            await adapter.start()
            self._started.append(adapter)
        self.replies = ReplyRouter(
            self.queue,
            self.intake,
            self.adapters,
            self.clock,
            self.metrics,
            s.replies,
            self.instance,
            limiters={
                name: SendLimiter(
                    send_rate_of(table, channel_types[table["type"]].send_rate).shared(
                        self.worker.count if self.worker else 1
                    )
                )
                for name, table in s.adapters.items()
            },
        )
        self.replies.start(self.supervisor)
        self.keeper = StreamKeeper(self.queue, self.intake, self.metrics, s.redis)
        self.keeper.start(self.supervisor)
        if self.worker is not None:
            self.endpoint = WorkerEndpoint(
                self.worker, self.data_dir, self._render_own_metrics, self._ready
            )
            await self.endpoint.start()
        log.info(
            "gateway %s started%s: http %s:%d, %d adapters, redis %s",
            __version__,
            f" (worker {self.worker.slot}, {self.instance})" if self.worker else "",
            s.http.listen.host,
            self.http_port,
            len(self.adapters),
            "embedded" if self.embedded or (self.worker and self.worker.redis_url) else "external",
        )

    async def stop(self) -> None:
        """Stop accepting, drain in-flight work, close everything. Idempotent."""
        if not self._running:
            return
        self._running = False
        # Each step runs whatever the one before it raised: the embedded server is always
        # stopped and the data folder released (a failed step is logged, and stop goes on).
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        if self.endpoint is not None:
            steps.append(("worker endpoint", self.endpoint.stop))
        if self.keeper is not None:
            steps.append(("stream keeper", self.keeper.stop))
        if self.cases is not None:
            steps.append(("case services", self.cases.stop))
        if self.replies is not None:
            steps.append(("reply router", self.replies.stop))
        steps += [(f"adapter {a.name}", a.stop) for a in reversed(self._started)]
        self._started.clear()
        if self.http is not None:
            steps.append(("http", self.http.stop))
        if self.metrics_http is not None:
            steps.append(("metrics http", self.metrics_http.stop))
        if hasattr(self, "attachments"):
            steps.append(("attachments written after the answer", self.attachments.close))
        if hasattr(self, "admission"):
            self.admission.stop()
        if hasattr(self, "intake"):
            steps.append(("intake", self.intake.close))
        if hasattr(self, "queue"):
            steps.append(("intake link", self.queue.aclose))
        if hasattr(self, "redis"):
            steps.append(("redis client", self.redis.aclose))
        steps.append(("supervisor", self.supervisor.close))
        if self.embedded is not None:
            steps.append(("embedded redis", self.embedded.stop))
        for what, step in steps:
            try:
                await step()
            except Exception:
                log.exception("stop: %s failed to stop", what)
        self.embedded = None
        self.lock.release()
        log.info("gateway stopped")

    def state_for(self, scope: str) -> SharedState:
        """Shared state with expiry under one scope (an adapter's name)."""
        return SharedState(self.redis, self.keys, scope, self.queue.pseudonyms)

    async def _warn_if_not_durable(self) -> None:
        """Say so when the server may lose what it acknowledged (CONFIG may be disabled)."""
        try:
            config = await self.redis.config_get("append*")
        except Exception:  # managed services often forbid CONFIG
            return
        appendonly = config.get(b"appendonly", config.get("appendonly"))
        fsync = config.get(b"appendfsync", config.get("appendfsync"))
        if appendonly in (b"no", "no") or fsync not in (b"always", "always", None):
            log.warning(
                "redis runs appendonly=%s appendfsync=%s: a crash of the server may lose "
                "contacts it already acknowledged; appendonly yes + appendfsync always is safe",
                appendonly,
                fsync,
            )

    async def _ready(self) -> tuple[bool, dict[str, object]]:
        redis_ok = False
        with contextlib.suppress(Exception):
            redis_ok = await self.queue.ping()
        spool_ok = True
        try:
            await asyncio.to_thread(self.spool.check_writable)
        except Exception:
            spool_ok = False
        loops_ok, loops = self.supervisor.ready()
        backlog = self.keeper.last if self.keeper is not None else None
        refusing = backlog is not None and backlog.state == "refusing"
        detail: dict[str, object] = {
            "redis": redis_ok,
            "spool": spool_ok,
            "spool_depth": self.spool.depth,
            "loops": loops,
            "leases": {name: fence.token for name, fence in sorted(self.leases.held.items())},
        }
        if backlog is not None:
            detail["backlog"] = backlog.detail()
        if self.replies is not None and self.replies.held:
            detail["replies_held"] = dict(self.replies.held)  # shown, not a reason to fail
        return (redis_ok or spool_ok) and loops_ok and not refusing, detail

    async def _instance_ready(self) -> tuple[bool, dict[str, object]]:
        if self.endpoint is not None:  # every worker's, each under "workers"
            return await self.endpoint.ready_all()
        return await self._ready()

    async def _render_metrics(self) -> bytes:
        if self.endpoint is not None:  # every worker's, labelled
            return await self.endpoint.render_all()
        return await self._render_own_metrics()

    async def _render_own_metrics(self) -> bytes:
        with contextlib.suppress(Exception):
            self.metrics.stream_length.set(await self.queue.stream_length())
        self.metrics.spool_depth.set(self.spool.depth)
        self.metrics.spool_oldest.set(self.spool.oldest_age_s())
        return self.metrics.render()

    async def read_contacts(self, count: int | None = None) -> list[Contact]:
        """Contacts on the stream, oldest first (tests, ``gateway tail``)."""
        entries = await self.redis.xrange(self.keys.contacts, count=count)
        return [Contact.from_dict(decode_fields(fields)) for _, fields in entries]

    async def read_events(self, count: int | None = None) -> list[Event]:
        """Events on the stream, oldest first."""
        entries = await self.redis.xrange(self.keys.events, count=count)
        return [Event.from_dict(decode_fields(fields)) for _, fields in entries]
