"""The report's figures against the hand-computed set, computed and through ``gateway report``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sys
from asyncio.subprocess import PIPE
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.cases.i18n import Language, Locale
from gateway.cases.report import build, hour_of, render
from gateway.contact.clock import SYSTEM_CLOCK
from gateway.queueing.keys import Keys
from gateway.server.config import SlaSection
from tests.cases import dataset

SLA = SlaSection(deadlines={"voice_answer": 15, "sms_response": 180, "email_response": 86400})


def rows_by_channel(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["channel"]: r for r in report["channels"]}


def test_figures_match_the_hand_computed_set() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    rows = rows_by_channel(report)
    assert set(rows) == set(dataset.EXPECTED)
    for channel, expected in dataset.EXPECTED.items():
        got = {k: rows[channel][k] for k in expected}
        assert got == expected, channel
    voice = report["voice"]
    assert (voice["offered"], voice["answered"], voice["abandoned"]) == (5, 4, 1)
    assert voice["connection_rate"] == 0.8 and voice["connection_met"] is False
    assert voice["average_speed_of_answer_s"] == 10.0
    series = report["series"]
    assert series["answer_times_ms"] == [3000, 5000, 12000, 20000]
    assert series["response_times_ms"] == {"email": [1800000], "sms": [60000, 200000]}
    assert sum(sum(per.values()) for per in series["volume_per_hour"].values()) == 11


def test_by_hour_splits_the_same_figures() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(
        contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA, by="hour"
    )
    h = now - now % dataset.HOUR - 2 * dataset.HOUR
    rows = {(r["hour"], r["channel"]): r for r in report["channels"]}
    assert rows[(hour_of(h), "voice")]["volume"] == 5
    assert rows[(hour_of(h), "email")]["within"] == 1
    sms_early = rows[(hour_of(h + dataset.HOUR), "sms")]
    assert (sms_early["volume"], sms_early["within"], sms_early["breached"]) == (4, 1, 2)
    assert rows[(hour_of(now), "sms")]["open"] == 1


def test_a_window_leaves_older_contacts_out() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 600 * dataset.S, until_us=now, sla=SLA)
    assert [(r["channel"], r["volume"], r["open"]) for r in report["channels"]] == [("sms", 1, 1)]


def local_minute(us: int, zone: str = "Asia/Shanghai") -> str:
    """Worked independently of gateway.cases.i18n: the minute ``us`` falls in, on a wall clock."""
    return datetime.fromtimestamp(us / 1e6, ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M")


ROWS = {
    # the hand-computed figures (dataset.EXPECTED) as a supervisor reads them
    "en": {
        "voice": "Phone 5 4 3 60.0% 75.0% 1 1 0 0 80.0% 10 s 5 s 20 s 20 s",
        "sms": "SMS 5 2 1 20.0% 50.0% 2 0 1 1 - 2 min 10 s 1 min 3 min 20 s 3 min 20 s",
        "email": "E-mail 1 1 1 100.0% 100.0% 0 0 0 0 - 30 min 30 min 30 min 30 min",
    },
    "zh": {
        "voice": "电话 5 4 3 60.0% 75.0% 1 1 0 0 80.0% 10 秒 5 秒 20 秒 20 秒",
        "sms": "短信 5 2 1 20.0% 50.0% 2 0 1 1 - 2 分 10 秒 1 分钟 3 分 20 秒 3 分 20 秒",
        "email": "邮件 1 1 1 100.0% 100.0% 0 0 0 0 - 30 分钟 30 分钟 30 分钟 30 分钟",
    },
}
HEADS = {
    "en": [
        "Connection rate",
        "On time, of received",
        "On time, of answered or replied",
        "Overdue",
        "Abandoned",
    ],
    "zh": ["接通率", "按时率（占受理）", "按时率（占已处理）", "超时", "放弃"],
}


def squeeze(line: str) -> str:
    return " ".join(line.split())


@pytest.mark.parametrize("lang", ["zh", "en"])
def test_table_in_each_language(lang: Language) -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    table = render(report, "table", Locale(lang))
    lines = [squeeze(line) for line in table.splitlines()]
    for row in ROWS[lang].values():
        assert row in lines, (row, table)
    assert all(head in lines[1] for head in HEADS[lang])
    # times on the wall clock of the configured zone (default Asia/Shanghai), not UTC
    assert local_minute(now) in lines[0] and "Asia/Shanghai" in lines[0]
    assert "T" not in lines[0].split(" ", 1)[1]  # no raw RFC 3339 in the title
    voice = table.split("\n\n", 1)[1]  # printed by gateway.channels.voice.report
    if lang == "zh":
        assert "接通率  80.0% (目标 95%: 未达标)" in voice
        assert "15 秒接听  3 (占接通 75.0%, 占呼入 60.0%)" in voice
    else:
        assert "Connection rate  80.0% (target 95%: NOT met)" in voice
        assert "Answered within 15 s  3 (75.0% of answered, 60.0% of offered)" in voice


def test_another_time_zone() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    title = render(report, "table", Locale("en", "Europe/Berlin")).splitlines()[0]
    assert local_minute(now, "Europe/Berlin") in title and "Europe/Berlin" in title


def test_renderings() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert {r["channel"]: r["within"] for r in rows} == {"email": "1", "sms": "1", "voice": "3"}
    assert {r["channel"]: r["within_settled_pct"] for r in rows}["sms"] == "50.0"
    for lang in ("zh", "en"):
        page = render(report, "html", Locale(lang))  # type: ignore[arg-type]
        assert "<script" not in page and "http://" not in page.replace(
            'xmlns="http://www.w3.org/2000/svg"', ""
        )
        assert page.count("<svg") == 4  # volume, answer times, sms and email response curves
        assert 'data-chart="answer"' in page and 'data-deadline="15"' in page
        assert 'data-chart="response-sms"' in page and 'data-deadline="180"' in page
        assert re.search(r'<tr data-channel="sms">.*?<td class="open" data-value="1">1</td>', page)
        # the answer histogram has the four calls in their one-second bins
        assert re.findall(r'data-second="(\d+)" data-count="1"', page) == ["3", "5", "12", "20"]
        # the sms curve says what it counts (1 of 2 replied in time), the table both shares
        assert 'data-share="1/2"' in page and "<figcaption>" in page
        assert '<td class="within_pct" data-value="20.0">20.0%</td>' in page
        assert '<td class="within_settled_pct" data-value="50.0">50.0%</td>' in page
        assert 'id="definitions"' in page and 'href="#def-within_pct"' in page
    assert '<html lang="zh-CN">' in render(report, "html", Locale("zh"))
    assert "1 of 2 replied" not in render(report, "html", Locale("zh"))
    assert "(1/2)" in render(report, "html", Locale("en")).replace("of replied ", "")


def test_no_voice_no_voice_panel() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    contacts = [c for c in contacts if c.channel != "voice"]
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    page = render(report, "html", Locale("en"))
    assert 'data-chart="answer"' not in page and 'id="voice"' not in page


async def test_gateway_report_command(
    redis_client: Any, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    keys = Keys(prefix)
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    await dataset.write(redis_client, keys, contacts, events)
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[gateway]\ndata_dir = "{tmp_path}"\n[redis]\nurl = "{redis_url}"\nprefix = "{prefix}"\n'
        '[sla]\nvoice_answer = "15s"\nsms_response = "3m"\nemail_response = "24h"\n'
    )

    async def run(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "report",
            "-c",
            str(config),
            "--since",
            "3h",
            *args,
            stdout=PIPE,
            stderr=PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return out.decode()

    report = json.loads(await run("--format", "json"))
    rows = rows_by_channel(report)
    for channel, expected in dataset.EXPECTED.items():
        assert {k: rows[channel][k] for k in expected} == expected, channel
    assert report["voice"]["connection_rate"] == 0.8
    by_hour = json.loads(await run("--format", "json", "--by", "hour"))
    assert sum(r["volume"] for r in by_hour["channels"]) == 11
    assert all("hour" in r for r in by_hour["channels"])
    page = await run("--format", "html", "--lang", "en")
    assert page.startswith("<!doctype html>") and page.count("<svg") == 4
    assert "Connection rate" in page
    csv_rows = list(csv.DictReader(io.StringIO(await run("--format", "csv", "--by", "hour"))))
    assert sum(int(r["volume"]) for r in csv_rows) == 11 and "hour" in csv_rows[0]
    table = await run("--lang", "zh")
    assert ROWS["zh"]["voice"] in [squeeze(line) for line in table.splitlines()]
    assert "接通率" in table
    table = await run("--lang", "en", "--tz", "UTC")
    assert ROWS["en"]["voice"] in [squeeze(line) for line in table.splitlines()]
    assert "(UTC)" in table.splitlines()[0]


async def test_load_reads_past_one_chunk(redis_client: Any, prefix: str) -> None:
    from gateway.cases.report import CHUNK, load

    keys = Keys(prefix)
    now = SYSTEM_CLOCK.now_us()
    template = dataset.contact("x", "sms", now - 10 * dataset.S)
    pipe = redis_client.pipeline(transaction=False)
    for i in range(CHUNK + 7):
        c = dataset.contact(f"c{i}", "sms", template.received_at)
        pipe.xadd(keys.contacts, {"contact": c.to_json(), "id": c.id, "channel": "sms"})
    await pipe.execute()
    contacts, events = await load(redis_client, keys, now - 60 * dataset.S)
    assert len(contacts) == CHUNK + 7 and events == []
    assert [c.id for c in contacts[:2]] == ["c0", "c1"] and contacts[-1].id == f"c{CHUNK + 6}"
