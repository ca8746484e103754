"""The consumer API, push webhooks, the deadline watcher and the live dashboard, wired as one
unit for the runtime."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.cases.api.routes import ConsumerApi
from gateway.cases.dashboard import DashboardRoutes, LiveReport
from gateway.cases.dashboard.aggregates import Aggregator
from gateway.cases.dashboard.wallboard import Wallboard
from gateway.cases.push import DeadLetters, Pusher
from gateway.cases.surge import SurgeWatch
from gateway.cases.watcher import DeadlineWatcher
from gateway.contact.attachments import AttachmentStore
from gateway.contact.clock import Clock
from gateway.queueing.coordination import Leases
from gateway.queueing.store import RedisQueue
from gateway.server.auth import ApiKeys
from gateway.server.config import Settings
from gateway.server.metrics import Metrics
from gateway.server.supervise import Supervisor

log = logging.getLogger(__name__)


class CaseServices:
    """Routes are added by ``register`` (before the server starts); tasks run from ``start``."""

    def __init__(
        self,
        settings: Settings,
        queue: RedisQueue,
        attachments: AttachmentStore,
        clock: Clock,
        metrics: Metrics,
        instance: str,
        leases: Leases,
        supervisor: Supervisor,
    ) -> None:
        self.settings = settings
        self.queue = queue
        keys = queue.keys
        subscribers = settings.push.subscribers
        self.live = LiveReport(queue.redis, keys, clock, settings.sla)
        self.deadletters = DeadLetters(queue.redis, keys, subscribers, metrics)
        self.api = ConsumerApi(
            queue,
            ApiKeys(settings.api),
            attachments,
            clock,
            metrics,
            max_body=settings.http.max_body,
            report=self.live.get,
            deadletter=self.deadletters,
        )
        self.surge = SurgeWatch(queue, clock, settings.surge, instance)
        if settings.surge.enabled:  # a new contact's surge keys travel in its enqueued event
            queue.surge_keys = self.surge.keys_of
        self.aggregator = Aggregator(
            queue,
            clock,
            settings.sla,
            instance,
            surge=self.surge if settings.surge.enabled else None,
        )
        channels = configured_channels(settings)
        self.wallboard = Wallboard(queue.redis, keys, clock, settings, channels)
        self.dashboard = (
            DashboardRoutes(settings.dashboard, self.wallboard, ApiKeys(settings.api))
            if settings.dashboard.enabled
            else None
        )
        self.watcher = (
            DeadlineWatcher(queue, clock, metrics, settings.watcher)
            if settings.watcher.enabled
            else None
        )
        self.leases = leases
        self.supervisor = supervisor
        self.pusher = Pusher(
            queue.redis, keys, subscribers, metrics, clock, instance, leases, supervisor,
            settings.egress,
        )
        self._started = False

    def register(self, router: web.UrlDispatcher) -> None:
        self.api.register(router)
        if self.dashboard is not None:
            self.dashboard.register(router)

    async def start(self) -> None:
        """Start the watcher and the pusher; with Redis down they retry on their own."""
        self._started = True
        await self.pusher.start()
        if self.watcher is not None:
            self.watcher.start(self.leases, self.supervisor)
        self.aggregator.start(self.supervisor, self.leases)
        if self.settings.surge.enabled:
            self.surge.start(self.leases, self.supervisor)

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.api.closing = True
        if self.watcher is not None:
            await self.watcher.stop()
        await self.aggregator.stop()
        await self.surge.stop()
        await self.pusher.stop()


def configured_channels(settings: Settings) -> set[str]:
    """The media of the configured adapters (the wallboard shows these even when quiet)."""
    from gateway.adapters import load_channel_types

    types = load_channel_types()
    return {types[t["type"]].channel for t in settings.adapters.values() if t.get("type") in types}
