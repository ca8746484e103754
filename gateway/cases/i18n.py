"""The one message catalogue of the supervisor's views (dashboard, ``gateway report``), and the
formatting of times, durations and shares in Simplified Chinese or English.

Every label a supervisor reads comes from ``MESSAGES`` or from a medium's declaration (its rows'
labels, its report section's words: ``catalogue()``); code never writes user-facing words
itself. The language is fixed by ``[dashboard] language`` or, with ``"auto"``, chosen from the
browser's ``Accept-Language`` (the command line: ``--lang``, else ``LANG``); Chinese is the
fallback. Times are shown in ``[dashboard] timezone`` (default Asia/Shanghai).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Final, Literal
from zoneinfo import ZoneInfo

from gateway.adapters import load_media
from gateway.contact.clock import MICROS_PER_SECOND, Micros

Language = Literal["zh", "en"]
LANGUAGES: Final[tuple[Language, ...]] = ("zh", "en")
DEFAULT_LANGUAGE: Final[Language] = "zh"
DEFAULT_TIMEZONE: Final = "Asia/Shanghai"

# key: (Simplified Chinese, English). Placeholders are str.format fields.
MESSAGES: Final[dict[str, tuple[str, str]]] = {
    # titles and frame
    "report.title": ("服务水平报表", "Service levels"),
    "wallboard.title": ("服务水平实时大屏", "Service levels, live"),
    "window": ("{since} 至 {until}（{tz}）", "{since} to {until} ({tz})"),
    "updated": ("更新于 {time}", "updated {time}"),
    "loading": ("加载中…", "loading…"),
    "refresh_failed": ("无法刷新：{error}", "could not refresh: {error}"),
    "definitions": ("口径说明", "Definitions"),
    "none": ("无", "none"),
    "dash": ("-", "-"),
    # channels
    # the figures table
    "col.hour": ("时段", "Hour"),
    "col.channel": ("渠道", "Channel"),
    "col.volume": ("受理量", "Received"),
    "col.settled": ("已接听/已回复", "Answered or replied"),
    "col.within": ("按时", "On time"),
    "col.within_pct": ("按时率（占受理）", "On time, of received"),
    "col.within_settled_pct": ("按时率（占已处理）", "On time, of answered or replied"),
    "col.breached": ("超时", "Overdue"),
    "col.abandoned": ("放弃", "Abandoned"),
    "col.closed": ("关闭", "Closed"),
    "col.open": ("待处理", "Open"),
    "col.connection_rate": ("接通率", "Connection rate"),
    "col.average_ms": ("平均用时", "Average time"),
    "col.p50_ms": ("中位用时", "Median time"),
    "col.p90_ms": ("90% 用时", "90th percentile"),
    "col.p99_ms": ("99% 用时", "99th percentile"),
    # charts
    "chart.volume": ("每小时受理量（按渠道）", "Contacts per hour and channel"),
    "chart.answer": ("接听用时分布（{n} 个接通）", "Answer times ({n} calls answered)"),
    "chart.response": (
        "{channel}回复用时（{n} 个已回复）",
        "Response times, {channel} ({n} replied)",
    ),
    "chart.share": (
        "{deadline}内：{pct}（占已回复 {within}/{n}）",
        "{deadline}: {pct} of replied ({within}/{n})",
    ),
    "chart.why": (
        "曲线只计已回复的联系；表中“按时率（占受理）”的分母还含超时未回复、关闭和待处理的，所以较低。",
        "The curve counts replied contacts only; the table's 'on time, of received' also "
        "counts overdue, closed and open ones, so it is lower.",
    ),
    # wallboard tiles
    "tile.waiting": ("排队等待", "Calls waiting"),
    "tile.longest_wait": ("最长等待", "Longest wait"),
    "tile.answered_within_today": ("今日 {deadline}接听率", "Answered within {deadline} today"),
    "tile.connection_24h": ("24 小时接通率", "Connection rate, 24 h"),
    "tile.connection_today": ("今日接通率", "Connection rate today"),
    "tile.of_offered": ("占呼入", "of offered"),
    "tile.of_answered": ("占接通", "of answered"),
    "tile.target": ("目标 {target}", "target {target}"),
    "tile.met": ("达标", "meeting the standard"),
    "tile.not_met": ("未达标", "below the standard"),
    "tile.counts": ("{num} / {den}", "{num} of {den}"),
    "section.service": ("各渠道服务水平", "Service levels per channel"),
    "section.rolling": ("近 24 小时", "Last 24 h"),
    "section.today": ("今日（{date}）", "Today ({date})"),
    "section.open": ("待处理（按渠道）", "Open contacts per channel"),
    "section.breaches": ("近 1 小时超时", "Overdue in the last hour"),
    "section.repeats": ("重复来电来信（督办候选）", "Repeat contacts (follow-up candidates)"),
    "section.surges": ("实时舆情预警", "Surge warnings"),
    "open.count": ("待处理", "Open"),
    "open.soon": ("即将超时", "Due soon"),
    "open.next": ("最近截止", "Next due"),
    "open.left": ("剩余 {left}", "{left} left"),
    "open.overdue": ("已超时 {late}", "overdue by {late}"),
    "breach.at": ("超时时间", "Overdue at"),
    "breach.contact": ("联系", "Contact"),
    "breach.received": ("受理时间", "Received"),
    "repeat.sender": ("来源", "From"),
    "repeat.count": ("次数", "Contacts"),
    "repeat.last": ("最近", "Last"),
    "surge.kind": ("类型", "Kind"),
    "surge.key": ("对象", "What"),
    "surge.count": ("本时段", "Now"),
    "surge.baseline": ("通常", "Usual"),
    "surge.samples": ("样例", "Samples"),
    "surge.since": ("开始", "Since"),
    "surge.kind.all": ("总量", "all contacts"),
    "surge.kind.channel": ("渠道", "channel"),
    "surge.kind.recipient": ("号码/信箱", "number or mailbox"),
    "surge.kind.topic": ("话题", "topic"),
    "surge.kind.place": ("地点", "place"),
    "surge.kind.sensitive": ("敏感词", "sensitive words"),
    "surge.kind.repeat": ("同一人重复", "one citizen repeating"),
    # durations
    "unit.ms": ("{n} 毫秒", "{n} ms"),
    "unit.s": ("{s} 秒", "{s} s"),
    "unit.m": ("{m} 分钟", "{m} min"),
    "unit.ms2": ("{m} 分 {s} 秒", "{m} min {s} s"),
    "unit.h": ("{h} 小时", "{h} h"),
    "unit.hm": ("{h} 小时 {m} 分", "{h} h {m} min"),
    "unit.d": ("{d} 天", "{d} d"),
    "unit.dh": ("{d} 天 {h} 小时", "{d} d {h} h"),
}

DEFINITIONS: Final[dict[str, tuple[str, str]]] = {
    "volume": (
        "受理量：窗口内在网关边缘盖戳（received_at）的联系数，每个联系只计一次。",
        "Received: contacts stamped at the gateway's edge (received_at) in the window, each once.",
    ),
    "within": (
        "按时：接听（电话）或回复（其他渠道）发生在截止时间之前或当时。",
        "On time: answered (phone) or replied (other media) at or before the deadline.",
    ),
    "within_pct": (
        "按时率（占受理）= 按时 ÷ 受理量；按时率（占已处理）= 按时 ÷ 已接听/已回复。"
        "常见呼叫中心软件只给后者；国标考核看前者。",
        "On time, of received = on time / received; of answered or replied = on time / answered "
        "or replied. Most call-centre software shows only the latter; the standard counts the "
        "former.",
    ),
    "breached": (
        "超时：接听或回复晚于截止时间，或到期仍未处理（含值守程序写下的 breached 事件）。",
        "Overdue: answered or replied after the deadline, or nothing by the deadline.",
    ),
    "abandoned": (
        "放弃：来电人在接听前挂机。关闭：截止前关闭且未回复。待处理：尚未处理、尚未到期。",
        "Abandoned: the caller hung up before an answer. Closed: closed before the deadline "
        "without a reply. Open: nothing yet, not yet due.",
    ),
    "connection_rate": (
        "接通率 = 接通 ÷ 呼入量（不含回拨；短时放弃按配置可不计），国标要求 24 小时内不低于 95%。",
        "Connection rate = answered / calls offered (callbacks not counted; short abandons left "
        "out when configured); the standard asks for 95 % over 24 h.",
    ),
    "answered_within": (
        "15 秒接听率：截止时间（默认 15 秒）内接听的来电，分别占接通和占呼入。",
        "Answered within 15 s: calls answered within the answer deadline (default 15 s), as a "
        "share of answered and of offered calls.",
    ),
    "times": (
        "用时从边缘盖戳算起到接听或回复；百分位取最近秩。大屏的用时按桶统计：5 分钟内精确到秒，"
        "1 小时内精确到 10 秒，更长精确到分钟。",
        "Times run from the edge stamp to the answer or reply; percentiles are nearest-rank. "
        "The wallboard counts times in bins: to the second below 5 min, to 10 s below 1 h, to "
        "the minute beyond.",
    ),
    "windows": (
        "近 24 小时：到此刻为止的 24 小时（国标口径）；今日：本地时区零点至今。"
        "两者由同一组分钟计数汇总，数秒内刷新。",
        "Last 24 h: the 24 hours up to now (the standard's window); today: since local midnight. "
        "Both are summed from the same per-minute counters, refreshed within seconds.",
    ),
    "open": (
        "待处理：截止时间未到且尚未接听/回复的联系；即将超时：剩余时间不足预警时长。",
        "Open: not yet answered or replied and not yet due; due soon: less time left than the "
        "warning window.",
    ),
    "repeats": (
        "重复：同一来源（同一电话号码跨电话和短信算同一人）在重复窗口内第 3 次及以上来电来信。",
        "Repeat: the third or later contact from one sender (one phone number across calls and "
        "SMS is one citizen) within the repeat window.",
    ),
    "surges": (
        "舆情预警：当前时段的联系数远高于通常水平（同一时段过去几天的均值与最近一小时的均值取大），"
        "按泊松分布尾概率检验。",
        "Surge: contacts in the current period well above their usual level (the larger of the "
        "same period on past days and the last hour), by a Poisson tail probability.",
    ),
}


def catalogue() -> dict[str, tuple[str, str]]:
    """Every message: the core's ``MESSAGES`` and what the registered media declare (their rows'
    labels as ``channel.<row>``, the words of their report sections)."""
    return {**load_media().messages, **MESSAGES}


def negotiate(accept_language: str | None, configured: str = "auto") -> Language:
    """The language to show: the configured one, or the browser's best of zh and en."""
    if configured in LANGUAGES:
        return configured
    best: tuple[float, Language] | None = None
    for order, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        lang: Language | None = None
        if tag.startswith("zh"):
            lang = "zh"
        elif tag.startswith("en"):
            lang = "en"
        if lang is not None and q > 0 and (best is None or q > best[0]):
            best = (q - order * 1e-6, lang)
    return DEFAULT_LANGUAGE if best is None else best[1]


def from_environment(configured: str = "auto") -> Language:
    """The command line's language: configured, else ``LC_ALL`` / ``LANG``, else Chinese."""
    env = os.environ.get("LC_ALL") or os.environ.get("LC_MESSAGES") or os.environ.get("LANG")
    if configured in LANGUAGES:
        return configured
    return negotiate((env or "").split(".")[0].replace("_", "-"), "auto")


@dataclass(frozen=True, slots=True)
class Locale:
    """Words and formats of one language in one time zone."""

    lang: Language = DEFAULT_LANGUAGE
    timezone: str = DEFAULT_TIMEZONE

    @property
    def zone(self) -> tzinfo:
        return ZoneInfo(self.timezone) if self.timezone != "UTC" else UTC

    @property
    def html_lang(self) -> str:
        return "zh-CN" if self.lang == "zh" else "en"

    def t(self, key: str, **values: object) -> str:
        """The message ``key`` in this language, with ``values`` filled in."""
        zh, en = MESSAGES[key] if key in MESSAGES else load_media().messages[key]
        text = zh if self.lang == "zh" else en
        return text.format(**values) if values else text

    def definition(self, key: str) -> str:
        zh, en = DEFINITIONS[key]
        return zh if self.lang == "zh" else en

    def definitions(self) -> list[tuple[str, str]]:
        return [(k, self.definition(k)) for k in DEFINITIONS]

    def channel(self, name: str) -> str:
        key = f"channel.{name}"
        return self.t(key) if key in catalogue() else name

    def local(self, us: Micros) -> datetime:
        return datetime.fromtimestamp(us / MICROS_PER_SECOND, UTC).astimezone(self.zone)

    def time(self, us: Micros, *, seconds: bool = True) -> str:
        """``2026-12-01 08:30:05`` in this zone."""
        return self.local(us).strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")

    def clock(self, us: Micros) -> str:
        """``08:30:05`` in this zone."""
        return self.local(us).strftime("%H:%M:%S")

    def date(self, us: Micros) -> str:
        return self.local(us).strftime("%Y-%m-%d")

    def midnight_us(self, us: Micros) -> Micros:
        """The start of the local calendar day ``us`` falls in."""
        local = self.local(us)
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        return int(start.timestamp()) * MICROS_PER_SECOND

    def duration(self, ms: float | None) -> str:
        """A human duration: ``850 ms``, ``12 s``, ``3 min 20 s``, ``1 h 5 min``, ``2 d 3 h``."""
        if ms is None:
            return self.t("dash")
        if ms < 1000 and ms % 1000:
            return self.t("unit.ms", n=round(ms))
        total = round(ms / 1000)
        if total < 60:
            return self.t("unit.s", s=total)
        if total < 3600:
            m, s = divmod(total, 60)
            return self.t("unit.ms2", m=m, s=s) if s else self.t("unit.m", m=m)
        if total < 86400:
            h, rest = divmod(total, 3600)
            m = rest // 60
            return self.t("unit.hm", h=h, m=m) if m else self.t("unit.h", h=h)
        d, rest = divmod(total, 86400)
        h = rest // 3600
        return self.t("unit.dh", d=d, h=h) if h else self.t("unit.d", d=d)

    def seconds(self, s: float) -> str:
        return self.duration(s * 1000)

    def pct(self, value: float | None, *, fraction: bool = False, digits: int = 1) -> str:
        """``95.0%``; ``value`` in percent, or a 0-1 fraction with ``fraction=True``."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return self.t("dash")
        return f"{value * 100 if fraction else value:.{digits}f}%"

    def count(self, value: int | None) -> str:
        return self.t("dash") if value is None else f"{value:,}"


def locale_for(language: str, timezone: str, accept_language: str | None = None) -> Locale:
    """A locale from the configuration and (``language = "auto"``) the browser's header."""
    return Locale(negotiate(accept_language, language), timezone)
