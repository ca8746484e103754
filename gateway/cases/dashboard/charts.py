"""Inline SVG charts of a report (no script, no CDN): used by ``report --format html`` and the
dashboard, so both draw the same figures from the same series."""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.adapters import load_media
from gateway.cases.i18n import Locale
from gateway.contact.clock import parse_time

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
    "th:first-child,td:first-child{text-align:left}"
    "figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}"
    "svg text{font-size:11px;fill:#333}"
)

W, H = 560, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 24, 30


def _svg(title: str, body: str, name: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" role="img" data-chart="{name}">'
        f"<title>{html.escape(title)}</title>"
        f'<text x="{LEFT}" y="14" font-weight="bold">{html.escape(title)}</text>'
        f'<line x1="{LEFT}" y1="{H - BOTTOM}" x2="{W - RIGHT}" y2="{H - BOTTOM}" stroke="#999"/>'
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{H - BOTTOM}" stroke="#999"/>'
        f"{body}</svg>"
    )


def volume_chart(volume: dict[str, dict[str, int]], loc: Locale) -> str:
    """Stacked bars: contacts per hour, one color per channel."""
    hours = sorted(volume)
    channels = sorted({ch for per in volume.values() for ch in per})
    peak = max([sum(per.values()) for per in volume.values()] + [1])
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bar = plot_w / max(1, len(hours))
    parts = [f'<text x="4" y="{TOP + 8}">{peak}</text>', f'<text x="4" y="{H - BOTTOM}">0</text>']
    step = max(1, len(hours) // 8)
    for i, hour in enumerate(hours):
        y = float(H - BOTTOM)
        for ch in channels:
            n = volume[hour].get(ch, 0)
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            parts.append(
                f'<rect x="{LEFT + i * bar + 1:.1f}" y="{y:.1f}" width="{max(1.0, bar - 2):.1f}" '
                f'height="{h:.1f}" fill="{load_media().color(ch)}" data-channel="{ch}" '
                f'data-hour="{hour}" data-count="{n}"><title>{hour} {ch}: {n}</title></rect>'
            )
        if i % step == 0:
            local = loc.clock(parse_time(hour.replace("Z", ":00.000000Z")))[:5]
            parts.append(f'<text x="{LEFT + i * bar:.1f}" y="{H - 14}">{local}</text>')
    for j, ch in enumerate(channels):
        x = W - RIGHT - 70 * (len(channels) - j)
        parts.append(
            f'<rect x="{x}" y="4" width="10" height="10" fill="{load_media().color(ch)}"/>'
            f'<text x="{x + 13}" y="13">{html.escape(loc.channel(ch))}</text>'
        )
    return _svg(loc.t("chart.volume"), "".join(parts), "volume")


Times = Mapping[int, int] | Iterable[int]
"""Settling times in ms: a list of them, or a histogram (ms -> how many)."""


def _hist(times: Times) -> dict[int, int]:
    return dict(times) if isinstance(times, Mapping) else dict(Counter(times))


def answer_chart(times_ms: Times, deadline_s: float, loc: Locale) -> str:
    """Histogram of answer times in one-second bins, with the answer deadline as a red line."""
    hist = _hist(times_ms)
    span = max(2 * deadline_s, 30.0)
    bins = [0] * (int(span) + 1)  # the last bin holds everything later
    for t, n in hist.items():
        bins[min(len(bins) - 1, int(t // 1000))] += n
    peak = max([*bins, 1])
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    bar = plot_w / len(bins)
    parts = [f'<text x="4" y="{TOP + 8}">{peak}</text>', f'<text x="4" y="{H - BOTTOM}">0</text>']
    for i, n in enumerate(bins):
        if n:
            h = plot_h * n / peak
            parts.append(
                f'<rect x="{LEFT + i * bar:.1f}" y="{H - BOTTOM - h:.1f}" width="{bar - 1:.1f}" '
                f'height="{h:.1f}" fill="#1f77b4" data-second="{i}" data-count="{n}"/>'
            )
    for s in range(0, len(bins), max(1, len(bins) // 10)):
        parts.append(f'<text x="{LEFT + s * bar:.1f}" y="{H - 14}">{s}s</text>')
    x = LEFT + deadline_s * bar
    parts.append(
        f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#d62728" '
        f'stroke-width="2" data-deadline="{deadline_s:g}"/>'
        f'<text x="{x + 3:.1f}" y="{TOP + 10}" fill="#d62728">{loc.seconds(deadline_s)}</text>'
    )
    return _svg(loc.t("chart.answer", n=sum(hist.values())), "".join(parts), "answer")


def response_chart(channel: str, times_ms: Times, deadline_s: float, loc: Locale) -> str:
    """Share of responses given within t (a cumulative curve), with the channel's deadline."""
    hist = _hist(times_ms)
    ordered = sorted(hist)
    total = sum(hist.values())
    span_ms = max(1.5 * deadline_s * 1000, float(ordered[-1]) if ordered else 0.0, 1.0)
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    color = load_media().color(channel)
    points = [f"{LEFT},{H - BOTTOM}"]
    seen = 0
    for t in ordered:
        seen += hist[t]
        x = LEFT + plot_w * t / span_ms
        y = H - BOTTOM - plot_h * seen / total
        points.append(f"{x:.1f},{points[-1].split(',')[1]}")
        points.append(f"{x:.1f},{y:.1f}")
    if ordered:
        points.append(f"{W - RIGHT},{points[-1].split(',')[1]}")
    x = LEFT + plot_w * deadline_s * 1000 / span_ms
    within = sum(n for t, n in hist.items() if t <= deadline_s * 1000)
    share = loc.t(
        "chart.share",
        deadline=loc.seconds(deadline_s),
        pct=loc.pct(100 * within / total if total else None, digits=0),
        within=within,
        n=total,
    )
    parts = [
        f'<text x="4" y="{TOP + 8}">100%</text><text x="4" y="{H - BOTTOM}">0%</text>',
        f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="2"/>',
        f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{H - BOTTOM}" stroke="#d62728" '
        f'stroke-dasharray="4 3" data-deadline="{deadline_s:g}"/>',
        f'<text x="{x + 3:.1f}" y="{TOP + 10}" fill="#d62728" data-share="{within}/{total}">'
        f"{html.escape(share)}</text>",
        f'<text x="{W - RIGHT - 60}" y="{H - 14}">{loc.duration(span_ms)}</text>',
        f'<text x="{LEFT}" y="{H - 14}">0</text>',
    ]
    title = loc.t("chart.response", channel=loc.channel(channel), n=total)
    return _svg(title, "".join(parts), f"response-{channel}")


def charts(report: dict[str, Any], loc: Locale | None = None) -> dict[str, str]:
    """Every chart of a report built by ``gateway.cases.report.build``, by name.

    The answer histogram is drawn only when the window has voice calls (or a voice row).
    """
    loc = loc or Locale()
    series = report["series"]
    deadlines = series["deadlines_s"]
    out = {"volume": volume_chart(series["volume_per_hour"], loc)}
    calls = load_media().answer_row() or ""  # the row of calls (voice): answer times
    if series["answer_times_ms"] or report.get(calls):
        out["answer"] = answer_chart(series["answer_times_ms"], deadlines.get(calls, 0.0), loc)
    for channel, times in series["response_times_ms"].items():
        out[f"response-{channel}"] = response_chart(
            channel, times, deadlines.get(channel, 0.0), loc
        )
    return out


def charts_html(report: dict[str, Any], loc: Locale) -> str:
    """The charts as figures; each response curve says how it relates to the table."""
    blocks = []
    for name, svg in charts(report, loc).items():
        caption = ""
        if name.startswith("response-"):
            caption = f"<figcaption>{html.escape(loc.t('chart.why'))}</figcaption>"
        blocks.append(f'<figure id="chart-{name}">{svg}{caption}</figure>')
    return "".join(blocks)
