"""The consumer API, push webhooks, the deadline watcher and the live dashboard, wired as one
unit for the runtime."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.api.routes import ConsumerApi
from gateway.attachments import AttachmentStore
from gateway.auth import ApiKeys
from gateway.clock import Clock
from gateway.config import Settings
from gateway.dashboard import DashboardRoutes, LiveReport
from gateway.metrics import Metrics
from gateway.push import DeadLetters, Pusher
from gateway.queueing.store import RedisQueue
from gateway.watcher import DeadlineWatcher

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
        self.dashboard = DashboardRoutes(settings.dashboard) if settings.dashboard.enabled else None
        self.watcher = (
            DeadlineWatcher(queue, clock, metrics, settings.watcher)
            if settings.watcher.enabled
            else None
        )
        self.pusher = Pusher(queue.redis, keys, subscribers, metrics, clock, instance)
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
            self.watcher.start()

    async def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        self.api.closing = True
        if self.watcher is not None:
            await self.watcher.stop()
        await self.pusher.stop()
