"""The voice medium: calls must be answered within 15 s and a missed call turned into a callback
contact returned within 30 min (GB/T 33358-2016); its report section is the connection rate."""

from gateway.channels.voice.report import SECTION
from gateway.contact.media import DeadlineRule, Medium
from gateway.records import Inbound


def _choose(inbound: Inbound) -> str:
    """A missed call to return (``meta["callback"]``) gets the callback deadline."""
    return "voice_callback" if inbound.meta.get("callback") else "voice_answer"


MEDIUM = Medium(
    name="voice",
    deadlines=(
        DeadlineRule(
            "voice_answer", "answer", 15, row="voice", label=("电话", "Phone"), color="#1f77b4"
        ),
        DeadlineRule(
            "voice_callback",
            "response",
            1800,
            row="voice_callback",
            label=("回拨", "Callbacks"),
            color="#17becf",
        ),
    ),
    choose=_choose,
    phone=True,
    messages={
        "voice.heading": ("电话", "Phone"),
        "voice.offered": ("呼入量", "Calls offered"),
        "voice.answered": ("接通", "Answered"),
        "voice.abandoned": ("放弃", "Abandoned"),
        "voice.answered_within": ("{deadline}接听", "Answered within {deadline}"),
        "voice.answered_within_rate": ("{deadline}接听率", "Answered within {deadline}"),
        "voice.of_answered": ("占接通 {pct}", "{pct} of answered"),
        "voice.of_offered": ("占呼入 {pct}", "{pct} of offered"),
        "voice.connection_rate": ("接通率", "Connection rate"),
        "voice.target": ("目标 {target}", "target {target}"),
        "voice.met": ("达标", "met"),
        "voice.not_met": ("未达标", "NOT met"),
        "voice.no_calls": ("无来电", "no calls"),
        "voice.asa": ("平均应答时间", "Average speed of answer"),
        "voice.callbacks": ("回拨已完成", "Callbacks returned"),
        "voice.of": ("{done} / {total}", "{done} of {total}"),
        "voice.worst_24h": ("最差 24 小时", "Worst 24 h"),
        "voice.worst_from": ("{rate}，自 {since}", "{rate} from {since}"),
        "voice.short_abandoned": (
            "短时放弃（< {limit}，不计）",
            "Short abandons (< {limit}, left out)",
        ),
        "voice.unresolved": ("尚无结果", "No outcome yet"),
    },
    report=SECTION,
)
