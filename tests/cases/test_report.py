"""The report's figures against the hand-computed set, computed and through ``gateway report``."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
import sys
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

from gateway.clock import SYSTEM_CLOCK
from gateway.config import SlaSection
from gateway.queueing.keys import Keys
from gateway.report import build, hour_of, render
from tests.cases import dataset

SLA = SlaSection(voice_answer=15, sms_response=180, email_response=86400)


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


def test_renderings() -> None:
    now = SYSTEM_CLOCK.now_us()
    contacts, events = dataset.build(now)
    report = build(contacts, events, since_us=now - 3 * dataset.HOUR, until_us=now, sla=SLA)
    table = render(report, "table")
    assert re.search(
        r"^\s*voice\s+5\s+4\s+3\s+60\.0\s+1\s+1\s+0\s+0\s+80\.0\s+10000\b", table, re.M
    )
    voice_lines = table.split("\n\n", 1)[1]  # printed by gateway.channels.voice.report
    assert "connection rate" in voice_lines and "80.0 %" in voice_lines
    rows = list(csv.DictReader(io.StringIO(render(report, "csv"))))
    assert {r["channel"]: r["within"] for r in rows} == {"email": "1", "sms": "1", "voice": "3"}
    page = render(report, "html")
    assert "<script" not in page and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert page.count("<svg") == 4  # volume, answer times, sms and email response curves
    assert 'data-chart="answer"' in page and 'data-deadline="15"' in page
    assert 'data-chart="response-sms"' in page and 'data-deadline="180"' in page
    assert re.search(r'<tr data-channel="sms">.*?<td class="open">1</td>', page)
    # the answer histogram has the four calls in their one-second bins
    assert re.findall(r'data-second="(\d+)" data-count="1"', page) == ["3", "5", "12", "20"]


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
    page = await run("--format", "html")
    assert page.startswith("<!doctype html>") and page.count("<svg") == 4
    csv_rows = list(csv.DictReader(io.StringIO(await run("--format", "csv", "--by", "hour"))))
    assert sum(int(r["volume"]) for r in csv_rows) == 11 and "hour" in csv_rows[0]
    table = await run()
    assert "voice" in table and "connection rate" in table


async def test_load_reads_past_one_chunk(redis_client: Any, prefix: str) -> None:
    from gateway.report import CHUNK, load

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
