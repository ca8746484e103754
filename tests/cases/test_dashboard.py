"""The live dashboard and the html report in a real headless Chromium, in both languages: the
figures of a hand-computed set read back from the rendered DOM; screenshots kept as artifacts
(``var/test-artifacts/``, git-ignored; ``GATEWAY_TEST_ARTIFACTS`` moves them)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from asyncio.subprocess import PIPE
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.cases.i18n import Locale
from gateway.cases.report import build, render
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.records import Repeat
from gateway.server.config import SlaSection
from gateway.testing import eventually
from tests.cases import dataset
from tests.cases.conftest import API, TOKENS

CHROMIUM = "/usr/bin/chromium"
PACKAGES = ("chromium", "fonts-wqy-microhei")
ARTIFACTS = Path(
    os.environ.get(
        "GATEWAY_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "var" / "test-artifacts"
    )
)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed here when missing and we may (root with apt-get)."""
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.fail(
                f"these tests render the dashboard in Debian's headless Chromium at {CHROMIUM}, "
                f"which is missing. Install it (as root): apt-get install {' '.join(PACKAGES)} "
                "(fonts-wqy-microhei draws the Chinese text in the screenshots). Run as root "
                "on Debian, the tests install it themselves.",
                pytrace=False,
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
            done = subprocess.run(step, env=env, capture_output=True, text=True, check=False)
            assert done.returncode == 0, f"{' '.join(step)}: {done.stderr[-2000:]}"
    assert Path(CHROMIUM).exists()
    return CHROMIUM


async def render_in_chromium(
    chromium: str, url: str, screenshot: Path, *, lang: str = "en", budget_ms: int = 3000
) -> str:
    """Load ``url`` headless with ``Accept-Language: lang``, let its script run (virtual
    time), save a screenshot and return the resulting DOM."""
    profile = tempfile.mkdtemp(prefix="chromium-")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
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
            f"--lang={lang}",
            f"--accept-lang={lang}",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--window-size=1400,2600",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
            stdout=PIPE,
            stderr=PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
        assert screenshot.stat().st_size > 0
        return out.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "wbr", "source", "col"})


class Dom(HTMLParser):
    """Table rows as {table id: {data-channel: {td class: text}}}; text by element id."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, dict[str, str]]] = {}
        self.texts: dict[str, str] = {}
        self.body: dict[str, str] = {}
        self.html: dict[str, str] = {}
        self.charts: list[str] = []
        self.links: list[str] = []
        self._table: str | None = None
        self._row: str | None = None
        self._cell: str | None = None
        self._ids: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "html":
            self.html = a
        if tag == "body":
            self.body = a
        if tag == "table":
            self._table = a.get("id", "")
            self.tables.setdefault(self._table, {})
        elif tag == "tr" and "data-channel" in a and self._table is not None:
            self._row = a["data-channel"]
            self.tables[self._table][self._row] = {}
        elif tag == "td" and self._row is not None:
            self._cell = a.get("class")
        elif tag == "svg" and "data-chart" in a:
            self.charts.append(a["data-chart"])
        elif tag == "a" and "data-contact" in a:
            self.links.append(a["data-contact"])
        if tag not in VOID:
            self._ids.append((tag, a.get("id")))
        if "id" in a:
            self.texts[a["id"]] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th"):
            self._cell = None
        while self._ids:
            if self._ids.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._table is not None and self._row is not None and self._cell is not None:
            row = self.tables[self._table][self._row]
            row[self._cell] = row.get(self._cell, "") + data
        for _, ident in self._ids:
            if ident is not None:
                self.texts[ident] += data


def parse(dom: str) -> Dom:
    page = Dom()
    page.feed(dom)
    return page


SHOWN = {
    # dataset.EXPECTED as a supervisor reads it (worked by hand, both languages)
    "en": {
        "voice": ["Phone", "5", "4", "3", "60.0%", "75.0%", "1", "1", "0", "0", "80.0%",
                  "10 s", "5 s", "20 s", "20 s"],
        "sms": ["SMS", "5", "2", "1", "20.0%", "50.0%", "2", "0", "1", "1", "-",
                "2 min 10 s", "1 min", "3 min 20 s", "3 min 20 s"],
        "email": ["E-mail", "1", "1", "1", "100.0%", "100.0%", "0", "0", "0", "0", "-",
                  "30 min", "30 min", "30 min", "30 min"],
    },
    "zh": {
        "voice": ["电话", "5", "4", "3", "60.0%", "75.0%", "1", "1", "0", "0", "80.0%",
                  "10 秒", "5 秒", "20 秒", "20 秒"],
        "sms": ["短信", "5", "2", "1", "20.0%", "50.0%", "2", "0", "1", "1", "-",
                "2 分 10 秒", "1 分钟", "3 分 20 秒", "3 分 20 秒"],
        "email": ["邮件", "1", "1", "1", "100.0%", "100.0%", "0", "0", "0", "0", "-",
                  "30 分钟", "30 分钟", "30 分钟", "30 分钟"],
    },
}  # fmt: skip
COLUMNS = ("channel", "volume", "settled", "within", "within_pct", "within_settled_pct",
           "breached", "abandoned", "closed", "open", "connection_rate", "average_ms",
           "p50_ms", "p90_ms", "p99_ms")  # fmt: skip
WORDS = {
    "en": {"title": "Service levels, live", "answered": "Answered within 15 s today",
           "connection": "Connection rate, 24 h", "surges": "Surge warnings",
           "repeat": "one citizen repeating"},
    "zh": {"title": "服务水平实时大屏", "answered": "今日 15 秒接听率",
           "connection": "24 小时接通率", "surges": "实时舆情预警", "repeat": "同一人重复"},
}  # fmt: skip


def extras(now: int) -> list[Any]:
    """Beyond the hand-computed set (other channel, so its figures stay as they are): a web
    contact breached in the last hour and a citizen's third contact (a repeat)."""
    late = dataset.contact("w-late", "sms", now - 600 * dataset.S)
    late = dataclasses.replace(late, channel="web")
    repeat = dataclasses.replace(
        dataset.contact("w-again", "sms", now - 300 * dataset.S), channel="web", repeat=Repeat(2, 0)
    )
    return [late, repeat]


def _daytime_zone(now: int) -> str:
    """The dashboard's time zone for a test whose data reach up to three hours back: one where
    ``now`` is at least three hours into the day, so that "today" holds them all (in Beijing
    time alone the test failed from 00:00 to about 02:10, 16:00-18:10 UTC)."""
    for zone in ("Asia/Shanghai", "UTC"):  # Beijing's first hours are UTC's afternoon
        if datetime.fromtimestamp(now / 1e6, ZoneInfo(zone)).hour >= 3:
            return zone
    raise AssertionError("unreachable: the two zones are eight hours apart")


@pytest.mark.parametrize("lang", ["zh", "en"])
async def test_dashboard_shows_the_hand_computed_figures(
    start_gateway: Any, chromium: str, lang: str
) -> None:
    now = SYSTEM_CLOCK.now_us()
    gw = await start_gateway(
        api=API, sla={"voice_answer": "15s", "sms_response": "3m"},
        dashboard={"refresh": "500ms", "timezone": _daytime_zone(now)},
    )
    contacts, events = dataset.build(now)
    more = extras(now)
    events.append(dataset.settle(more[0], "breached", 180))
    await dataset.write(gw.redis, gw.keys, contacts + more, events)
    assert gw.cases is not None
    await eventually(lambda: _aggregated(gw, len(contacts + more) + len(events)))
    url = f"http://127.0.0.1:{gw.http_port}/dashboard#token={TOKENS['reader']}"
    dom = await render_in_chromium(chromium, url, ARTIFACTS / f"dashboard-{lang}.png", lang=lang)
    page = parse(dom)
    # the page polled again and again without a reload (one generation per refresh)
    assert int(page.body.get("data-generation", "0")) >= 2, dom[-1500:]
    assert page.html.get("lang") == ("zh-CN" if lang == "zh" else "en")
    rows = page.tables["figures"]
    assert set(rows) == {"voice", "sms", "email", "web"}
    for channel, shown in SHOWN[lang].items():
        assert [rows[channel][c] for c in COLUMNS] == shown, channel
    assert rows["web"]["volume"] == "2" and rows["web"]["breached"] == "1"
    words = WORDS[lang]
    assert words["title"] in dom
    assert words["answered"] in page.texts["tile-answered_within_today"]
    assert "60.0%" in page.texts["tile-answered_within_today"]  # 3 of 5 offered
    assert "75.0%" in page.texts["tile-answered_within_today"]  # 3 of 4 answered
    assert words["connection"] in page.texts["tile-connection_24h"]
    assert "80.0%" in page.texts["tile-connection_24h"]
    assert page.texts["tile-waiting"].endswith("0")
    assert page.tables["open"]["sms"] and page.tables["open"]["web"]
    # late answers and replies and the watcher's breaches of the last hour (the hand-computed
    # set's own ones fall in it early in an hour)
    recent = [e for e in events if e.type == "breached" or (e.met is False)]
    expected = sum(1 for e in recent if e.at >= now - dataset.HOUR)
    assert page.texts["breach-count"] == str(expected) and "w-late" in page.links
    assert "w-again" in page.links  # the repeat, one click from its contact
    assert words["surges"] in page.texts["surges"]
    assert words["repeat"] in page.texts["surge-list"]  # the third contact of one citizen
    assert page.charts[:2] == ["volume", "answer"]
    assert {"response-sms", "response-email"} <= set(page.charts)
    assert re.search(r'data-deadline="15"', dom)
    assert 'id="definitions"' in dom and "def-within_pct" in dom


async def _aggregated(gw: Any, entries: int) -> bool:
    from gateway.cases.dashboard.aggregates import GROUP

    groups = await gw.redis.xinfo_groups(gw.keys.events)
    mine = [g for g in groups if g["name"] in (GROUP, GROUP.encode())]
    return bool(mine) and int(mine[0]["entries-read"] or 0) >= entries and not mine[0]["pending"]


async def test_dashboard_without_a_token_says_so(start_gateway: Any, chromium: str) -> None:
    gw = await start_gateway(api=API)
    url = f"http://127.0.0.1:{gw.http_port}/dashboard"
    dom = await render_in_chromium(chromium, url, ARTIFACTS / "dashboard-401.png", lang="en")
    assert "could not refresh: 401" in dom
    page = parse(dom)
    assert "figures" not in page.tables and "data-generation" not in page.body


@pytest.mark.parametrize("lang", ["zh", "en"])
async def test_html_report_in_the_browser(chromium: str, tmp_path: Path, lang: str) -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    sla = SlaSection(deadlines={"voice_answer": 15, "sms_response": 180, "email_response": 86400})
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=sla)
    path = tmp_path / f"report-{lang}.html"
    path.write_text(render(report, "html", Locale(lang)), encoding="utf-8")  # type: ignore[arg-type]
    dom = await render_in_chromium(
        chromium, path.as_uri(), ARTIFACTS / f"report-{lang}.png", lang=lang, budget_ms=500
    )
    page = parse(dom)
    rows = page.tables["figures"]
    for channel, shown in SHOWN[lang].items():
        assert [rows[channel][c] for c in COLUMNS] == shown, channel
    assert page.charts == ["volume", "answer", "response-email", "response-sms"]
    assert page.html.get("lang") == ("zh-CN" if lang == "zh" else "en")
