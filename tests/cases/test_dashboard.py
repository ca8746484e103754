"""The live dashboard in a real headless Chromium: the figures read from the rendered DOM."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from asyncio.subprocess import PIPE
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SYSTEM_CLOCK
from tests.cases import dataset
from tests.cases.conftest import API, TOKENS

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed here when missing (CI: a fresh machine, root)."""
    if not Path(CHROMIUM).exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            done = subprocess.run(step, env=env, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr[-2000:]}"
    assert Path(CHROMIUM).exists()
    return CHROMIUM


async def dump_dom(chromium: str, url: str) -> str:
    """Load ``url`` headless, let its script run (virtual time), print the resulting DOM."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    try:
        proc = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=3000",
            "--dump-dom",
            url,
            stdout=PIPE,
            stderr=PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        return out.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Figures(HTMLParser):
    """Collects ``<tr data-channel>`` rows of ``#figures`` as {channel: {column: text}}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._row: str | None = None
        self._cell: str | None = None
        self.voice: dict[str, str] = {}
        self._voice = False
        self._b: str | None = None
        self.charts: list[str] = []
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        if tag == "tr" and "data-channel" in a:
            self._row = a["data-channel"]
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class")
        elif tag == "ul" and a.get("id") == "voice":
            self._voice = "hidden" not in a
        elif tag == "b" and self._voice:
            self._b = a.get("class")
        elif tag == "svg" and "data-chart" in a:
            self.charts.append(a["data-chart"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        if tag == "ul":
            self._voice = False

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._cell is not None:
            self.rows[self._row][self._cell] = data
            self._cell = None
        elif self._b is not None:
            self.voice[self._b] = data
            self._b = None


def text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


async def test_dashboard_shows_the_hand_computed_figures(start_gateway: Any, chromium: str) -> None:
    gw = await start_gateway(
        api=API, sla={"voice_answer": "15s", "sms_response": "3m"}, dashboard={"refresh": "500ms"}
    )
    contacts, events = dataset.build(SYSTEM_CLOCK.now_us())
    await dataset.write(gw.redis, gw.keys, contacts, events)
    url = f"http://127.0.0.1:{gw.http_port}/dashboard#token={TOKENS['reader']}"
    dom = await dump_dom(chromium, url)
    page = Figures()
    page.feed(dom)
    # the page polled again and again without a reload (one generation per refresh)
    assert int(page.body.get("data-generation", "0")) >= 2, dom[-1500:]
    assert set(page.rows) == set(dataset.EXPECTED)
    for channel, expected in dataset.EXPECTED.items():
        shown = page.rows[channel]
        for column, value in expected.items():
            assert shown[column] == text(value), (channel, column)
    assert page.voice == {"offered": "5", "answered": "4", "connection_rate": "80.0 %"}
    assert page.charts == ["volume", "answer", "response-email", "response-sms"]
    assert re.search(r'data-deadline="15"', dom)


async def test_dashboard_without_a_token_says_so(start_gateway: Any, chromium: str) -> None:
    gw = await start_gateway(api=API)
    dom = await dump_dom(chromium, f"http://127.0.0.1:{gw.http_port}/dashboard")
    assert "could not refresh: 401" in dom
    page = Figures()
    page.feed(dom)
    assert page.rows == {} and "data-generation" not in page.body
