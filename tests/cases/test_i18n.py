"""Language, time zone and number formats of the supervisor's views (``gateway.cases.i18n``)."""

from __future__ import annotations

import argparse
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.cases.i18n import Locale, catalogue, negotiate
from gateway.cases.report import main as report_main
from gateway.server.config import ConfigError, parse_settings


def test_the_browser_chooses_unless_the_config_does() -> None:
    assert negotiate("en-US,en;q=0.9,zh-CN;q=0.8") == "en"
    assert negotiate("zh-CN,zh;q=0.9,en;q=0.8") == "zh"
    assert negotiate("de-DE,en;q=0.5,zh-TW;q=0.7") == "zh"  # the higher q wins
    assert negotiate("fr, de") == "zh" and negotiate(None) == "zh"  # Chinese by default
    assert negotiate("en;q=0, zh;q=0.1") == "zh"  # q=0 means "not this one"
    assert negotiate("zh-CN", "en") == "en"  # fixed by [dashboard] language


def test_durations_shares_and_times() -> None:
    zh, en = Locale("zh"), Locale("en", "UTC")
    assert [en.duration(ms) for ms in (850, 15_000, 60_000, 200_000, 3_900_000, 93_600_000)] == [
        "850 ms", "15 s", "1 min", "3 min 20 s", "1 h 5 min", "1 d 2 h",
    ]  # fmt: skip
    assert zh.duration(200_000) == "3 分 20 秒" and zh.duration(None) == "-"
    assert zh.pct(0.95, fraction=True, digits=0) == "95%" and en.pct(60.0) == "60.0%"
    us = 1_795_594_483_000_000  # 2026-11-25 06:54:43 UTC
    expected = datetime.fromtimestamp(us / 1e6, ZoneInfo("Asia/Shanghai"))
    assert zh.time(us) == expected.strftime("%Y-%m-%d %H:%M:%S")
    midnight = datetime.fromtimestamp(zh.midnight_us(us) / 1e6, ZoneInfo("Asia/Shanghai"))
    assert (midnight.hour, midnight.minute, midnight.date()) == (0, 0, expected.date())


def test_every_message_has_both_languages() -> None:
    for key, (zh, en) in catalogue().items():  # the core's words and the media's
        assert zh and en, key
        assert sorted(_fields(zh)) == sorted(_fields(en)), key


def _fields(text: str) -> list[str]:
    import string

    return [f for _, f, _, _ in string.Formatter().parse(text) if f]


def test_a_wrong_time_zone_is_a_config_error_naming_its_key() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"dashboard": {"timezone": "Asia/Atlantis"}})
    assert caught.value.errors == [("dashboard.timezone", "unknown time zone 'Asia/Atlantis'")]
    settings, _ = parse_settings({})
    args = argparse.Namespace(since="1h", format="table", by="channel", lang="en", tz="Mars/Base")
    assert report_main(settings, args) == 2  # said on stderr, before any Redis is touched
