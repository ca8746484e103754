"""The live dashboard at ``/dashboard``: a static page whose script polls ``/v1/report``."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from typing import Any

from aiohttp import web

from gateway.clock import MICROS_PER_SECOND, Clock
from gateway.config import DashboardSection, SlaSection
from gateway.dashboard.charts import charts
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient
from gateway.records import Contact, Event
from gateway.report import build, load

PAGE = files("gateway.dashboard").joinpath("page.html").read_text(encoding="utf-8")
CACHE_S = 2.0
"""One computation serves every viewer for this long: reading the window costs a scan
(the JSON is decoded and the figures computed in a worker thread, off the gateway's loop)."""


class LiveReport:
    """Reports computed on demand from the streams, shared by viewers for ``CACHE_S``."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock, sla: SlaSection) -> None:
        self.redis = client
        self.keys = keys
        self.clock = clock
        self.sla = sla
        self._cache: dict[tuple[float, str], tuple[float, dict[str, Any]]] = {}
        self._lock = asyncio.Lock()

    def _build(
        self, contacts: list[Contact], events: list[Event], since_us: int, now: int, by: str
    ) -> dict[str, Any]:
        report = build(contacts, events, since_us=since_us, until_us=now + 1, sla=self.sla, by=by)
        report["charts"] = charts(report)
        return report

    async def get(self, since_s: float, by: str, with_charts: bool) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with self._lock:
            hit = self._cache.get((since_s, by))
            if hit is None or loop.time() - hit[0] > CACHE_S:
                now = self.clock.now_us()
                since_us = now - int(since_s * MICROS_PER_SECOND)
                contacts, events = await load(self.redis, self.keys, since_us)
                report = await asyncio.to_thread(self._build, contacts, events, since_us, now, by)
                if len(self._cache) > 16:
                    self._cache.clear()
                hit = self._cache[(since_s, by)] = (loop.time(), report)
        report = hit[1]
        if with_charts:
            return report
        return {k: v for k, v in report.items() if k != "charts"}


class DashboardRoutes:
    """``GET /dashboard``; the figures come from ``/v1/report`` (scope ``read``)."""

    def __init__(self, section: DashboardSection) -> None:
        window = f"{int(section.window)}s"
        self.page = PAGE.replace("__REFRESH_MS__", str(int(section.refresh * 1000))).replace(
            "__WINDOW__", window
        )

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/dashboard", self.dashboard)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(
            text=self.page,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:",
                "Referrer-Policy": "no-referrer",
            },
        )
