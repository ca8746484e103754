"""The live dashboard at ``/dashboard``: a page whose script polls ``/dashboard/live`` (the
wallboard's figures from incrementally kept counters, ``aggregates.py``); ``LiveReport``
serves ``/v1/report`` (a scan of the streams, for any window)."""

from __future__ import annotations

import asyncio
import html
import logging
import re
from importlib.resources import files
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from gateway.cases.dashboard.charts import charts
from gateway.cases.dashboard.wallboard import Wallboard
from gateway.cases.i18n import LANGUAGES, Locale, locale_for
from gateway.cases.report import build, load
from gateway.contact.clock import MICROS_PER_SECOND, Clock, parse_time
from gateway.queueing.keys import Keys
from gateway.queueing.store import RedisClient
from gateway.records import Contact, Event
from gateway.server.auth import ApiKeys
from gateway.server.config import DashboardSection, SlaSection
from gateway.server.problems import ApiProblem, problem

log = logging.getLogger(__name__)
PAGE = files("gateway.cases.dashboard").joinpath("page.html").read_text(encoding="utf-8")
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
    """``GET /dashboard`` (the page, in the browser's language) and ``GET /dashboard/live``
    (its figures as HTML parts, scope ``read``), refreshed by the page without a reload."""

    def __init__(self, section: DashboardSection, wallboard: Wallboard, keys: ApiKeys) -> None:
        self.section = section
        self.wallboard = wallboard
        self.keys = keys
        self.refresh_ms = str(int(section.refresh * 1000))

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_get("/dashboard", self.dashboard)
        router.add_get("/dashboard/live", self.live)

    def locale(self, request: web.Request) -> Locale:
        asked = request.query.get("lang")
        if self.section.language == "auto" and asked in LANGUAGES:
            return Locale(asked, self.section.timezone)
        return locale_for(
            self.section.language,
            self.section.timezone,
            request.headers.get("Accept-Language"),
        )

    async def dashboard(self, request: web.Request) -> web.Response:
        loc = self.locale(request)
        page = PAGE.replace("__REFRESH_MS__", self.refresh_ms)
        values = {
            "html_lang": loc.html_lang,
            "lang": loc.lang,
            "refresh_failed_js": loc.t("refresh_failed", error="{error}"),
            "updated_js": loc.t("updated", time="{time}"),
        }
        page = re.sub(
            r"{{([\w.]+)}}",
            lambda m: html.escape(values[m[1]] if m[1] in values else loc.t(m[1])),
            page,
        )
        return web.Response(
            text=page,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Content-Language": loc.html_lang,
                "Vary": "Accept-Language",
                "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                "style-src 'unsafe-inline'; img-src 'self' data:",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def live(self, request: web.Request) -> web.Response:
        try:
            self.keys.authorize(request, "read")
            snap = await self.wallboard.snapshot()
        except ApiProblem as exc:
            return problem(exc.status, exc.detail, exc.headers)
        except (RedisError, OSError) as exc:
            log.warning("dashboard: queue unavailable (%s)", type(exc).__name__)
            return problem(503, "queue unavailable, retry later", {"Retry-After": "2"})
        loc = self.locale(request)
        body = {
            "figures": snap,
            "html": self.wallboard.fragments(snap, loc),
            "shown_at": loc.time(parse_time(snap["now"])),
            "lang": loc.lang,
        }
        return web.Response(
            body=orjson.dumps(body),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )
