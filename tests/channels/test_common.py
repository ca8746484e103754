"""What every channel shares (gateway/channels/common.py): the refusal answers of the submit
path in a protocol's format, and the record of a reply's parts already sent."""

from __future__ import annotations

from aiohttp import web

from gateway.channels.common import Refused, SentParts, unavailable


def test_a_refusal_is_answered_in_the_protocols_format_with_its_headers() -> None:
    def xml(status: int, reason: str) -> web.Response:
        return web.Response(status=status, text=f"<error>{reason}</error>",
                            content_type="text/xml")

    answer = unavailable().answer(xml)
    assert answer.status == 503 and answer.content_type == "text/xml"
    assert answer.text == "<error>retry later</error>" and answer.headers["Retry-After"] == "5"
    plain = Refused(429, "too many contacts, slow down", {"Retry-After": "7"}).answer()
    assert (plain.status, plain.text, plain.headers["Retry-After"]) == (
        429, "too many contacts, slow down", "7")


def test_the_parts_sent_are_kept_only_for_a_reply_cut_short_and_are_bounded() -> None:
    sent = SentParts(limit=2)
    sent.keep("done", 3, 3)  # all out: nothing to resume
    sent.keep("none", 0, 3)  # nothing out: start from the first
    assert sent.resume("done") == 0 and sent.resume("none") == 0
    for key in ("a", "b", "c"):
        sent.keep(key, 1, 3)
    assert sent.resume("a") == 0  # the oldest was forgotten past the limit
    assert sent.resume("c") == 1 and sent.resume("c") == 0  # resumed once
