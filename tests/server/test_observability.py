"""What an operator watches: per-adapter series, HTTP, sessions, the metrics listener, logs."""

from __future__ import annotations

import asyncio
import logging
import smtplib
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.server.logs import JsonFormatter, MaskingFilter, mask
from tests.channels.voice.fakes import agi_fixture, fake_call


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in the exposition text, or None when it is absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


async def scrape(port: int, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{port}/metrics", headers=headers
    ) as resp:
        return resp.status, await resp.text()


async def test_two_kannel_boxes_are_told_apart(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={
        "box1": {"type": "kannel", "path": "/sms/box1", "allow_from": ["127.0.0.1"]},
        "box2": {"type": "kannel", "path": "/sms/box2", "allow_from": ["127.0.0.1"]},
    })
    base = f"http://127.0.0.1:{gw.http_port}"
    async with aiohttp.ClientSession() as http:
        for i, path in enumerate(["/sms/box1", "/sms/box2", "/sms/box2"]):
            async with http.get(f"{base}{path}?from=%2B8613800138000&to=12345&text=hi&id=m{i}"):
                pass
        async with http.get(f"{base}/sms/box1?from=x"):  # 400: no message id
            pass
        async with http.get(f"{base}/no/such/path/42"):
            pass
    _, text = await scrape(gw.http_port)
    assert sample(text, "gateway_contacts_enqueued_total", adapter="box1", channel="sms") == 1
    assert sample(text, "gateway_contacts_enqueued_total", adapter="box2", channel="sms") == 2
    assert sample(text, "gateway_http_requests_total", route="/sms/box2", method="GET",
                  status="200") == 2
    assert sample(text, "gateway_http_requests_total", route="/sms/box1", status="400") == 1
    # unknown paths share one label value: a scan cannot blow up the series count
    assert sample(text, "gateway_http_requests_total", route="unmatched", status="404") == 1
    assert "/no/such/path" not in text
    assert sample(text, "process_resident_memory_bytes") is not None
    assert sample(text, "process_open_fds") is not None


async def test_metrics_on_their_own_listener_with_a_token(start_gateway: Any) -> None:
    gw = await start_gateway(http={"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                                   "metrics_token": "scrape-token-1"})
    assert gw.metrics_http is not None and gw.metrics_http.port != gw.http_port
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/metrics"
    ) as resp:
        assert resp.status == 404  # not on the webhook port
    assert (await scrape(gw.metrics_http.port))[0] == 401
    assert (await scrape(gw.metrics_http.port, "wrong-token"))[0] == 401
    status, text = await scrape(gw.metrics_http.port, "scrape-token-1")
    assert status == 200 and "gateway_build_info" in text


async def test_agi_sessions_counted_and_timed(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"pbx": {"type": "asterisk", "agi_listen": "127.0.0.1:0",
                                               "settle": "0s"}})
    call = await fake_call(gw.adapters["pbx"].port, agi_fixture("sip_call.agi"))  # type: ignore[attr-defined]
    assert call.variables["GATEWAY_STATUS"]
    _, text = await scrape(gw.http_port)
    assert sample(text, "gateway_sessions_total", adapter="pbx", protocol="agi") == 1
    assert sample(text, "gateway_session_duration_seconds_count", adapter="pbx",
                  protocol="agi") == 1
    assert sample(text, "gateway_sessions_active", adapter="pbx", protocol="agi") == 0
    assert sample(text, "gateway_contacts_enqueued_total", adapter="pbx", channel="voice") == 1


async def test_smtp_sessions_and_reply_codes(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={"mailbox": {
        "type": "smtp", "listen": "127.0.0.1:0", "mailboxes": ["12345@hotline.example"]}})
    port = gw.adapters["mailbox"].port  # type: ignore[attr-defined]

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port) as smtp:
            smtp.sendmail("citizen@example.org", ["12345@hotline.example"],
                          b"Subject: lamp\r\n\r\nThe lamp is out.\r\n")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                smtp.sendmail("citizen@example.org", ["nobody@hotline.example"], b"x\r\n")

    await asyncio.to_thread(send)

    async def closed() -> str | None:
        _, text = await scrape(gw.http_port)
        active = sample(text, "gateway_sessions_active", adapter="mailbox", protocol="smtp")
        return text if active == 0 else None

    from gateway.testing import eventually

    text = await eventually(closed)
    assert sample(text, "gateway_sessions_total", adapter="mailbox", protocol="smtp") == 1
    assert sample(text, "gateway_smtp_replies_total", adapter="mailbox", code="220") == 1
    assert sample(text, "gateway_smtp_replies_total", adapter="mailbox", code="550") == 1
    assert (sample(text, "gateway_smtp_replies_total", adapter="mailbox", code="250") or 0) >= 3


@pytest.mark.parametrize("kept", [
    "AGI session 1732981234.17 ended",
    "replayed stream entry 1732981234567-0",
    "linkedid=1795594483.0 uniqueid=1795594483.12",
    "took 1234567.25 s",
])
def test_ids_that_are_not_phone_numbers_are_not_masked(kept: str) -> None:
    assert mask(kept) == kept


@pytest.mark.parametrize(("text", "masked"), [
    ("from +8613800138000.", "from +*********8000."),
    ("call 138-0013-8000 now", "call ***-****-8000 now"),
    ("to 13800138000, cc zhang@example.cn", "to *******8000, cc z***@example.cn"),
])
def test_phone_numbers_and_addresses_still_masked(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_json_lines_carry_adapter_contact_and_event() -> None:
    record = logging.LogRecord("gateway.cases.replies", logging.WARNING, __file__, 1,
                               "reply %s failed for %s", ("r1", "+8613800138000"), None)
    record.adapter, record.contact_id, record.event = "kannel", "0193-abc", "reply_failed"
    MaskingFilter().filter(record)
    line = orjson.loads(JsonFormatter().format(record))
    assert line["adapter"] == "kannel" and line["contact_id"] == "0193-abc"
    assert line["event"] == "reply_failed"
    assert line["message"] == "reply r1 failed for +*********8000"


async def test_watcher_lines_per_contact_are_debug_and_breaches_counted_by_policy(
    start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.cases.watcher import DeadlineWatcher
    from gateway.contact.clock import FixedClock
    from gateway.records import Inbound, Sender
    from gateway.server.config import WatcherSection

    clock = FixedClock()
    gw = await start_gateway(clock=clock, sla={"web_response": "100s"},
                             watcher={"enabled": False})
    for i in range(5):
        await gw.intake.submit(Inbound("web", "api", f"w{i}", Sender("a@example.org"), "",
                                       clock.now_us(), text="x"))
    watcher = DeadlineWatcher(gw.queue, clock, gw.metrics, WatcherSection())
    clock.advance(101)
    with caplog.at_level(logging.INFO):
        assert await watcher.tick() == 5  # the five breaches (their warnings are past too)
    assert not [r for r in caplog.records if r.name == "gateway.cases.watcher"]
    with caplog.at_level(logging.DEBUG, logger="gateway.cases.watcher"):
        clock.advance(1)
        await gw.intake.submit(Inbound("web", "api", "w9", Sender("a@example.org"), "",
                                       clock.now_us(), text="x"))
        clock.advance(101)
        await watcher.tick()
    (line,) = [r for r in caplog.records if r.name == "gateway.cases.watcher"]
    assert line.levelno == logging.DEBUG and line.event == "breached"  # type: ignore[attr-defined]
    _, text = await scrape(gw.http_port)
    assert sample(text, "gateway_deadline_events_total", type="breached",
                  policy="web_response") == 6


async def test_answer_within_15_seconds_is_measured(start_gateway: Any) -> None:
    from gateway.contact.clock import FixedClock
    from gateway.records import Inbound, Sender

    clock = FixedClock()
    gw = await start_gateway(clock=clock)
    for seconds in (3, 12, 40):
        receipt = await gw.intake.submit(Inbound("voice", "pbx", f"c{seconds}",
                                                 Sender("+8613800138000"), "12345",
                                                 clock.now_us()))
        await gw.intake.stamp(receipt.contact_id, "answered",
                              clock.now_us() + seconds * 1_000_000, "pbx")
    _, text = await scrape(gw.http_port)
    assert sample(text, "gateway_deadline_stamp_seconds_bucket", type="answered", met="true",
                  le="15.0") == 2
    assert sample(text, "gateway_deadline_stamp_seconds_count", type="answered",
                  met="false") == 1


async def test_ami_link_reconnects_and_event_lag(start_gateway: Any) -> None:
    from gateway.testing import eventually
    from tests.channels.voice.fakes import FakeAmi
    from tests.channels.voice.test_ami import voice_with_ami

    ami = FakeAmi([(b"", True)])  # the first session is cut at once; the second stays up
    gw = await voice_with_ami(start_gateway, ami)

    async def up_again() -> str | None:
        _, text = await scrape(gw.http_port)
        ok = ami.accepted >= 2 and sample(text, "gateway_ami_connected", adapter="asterisk") == 1
        return text if ok else None

    text = await eventually(up_again)
    assert (sample(text, "gateway_ami_reconnects_total", adapter="asterisk") or 0) >= 1
    # every login is followed by FullyBooted, which carries a Timestamp (timestampevents)
    assert (sample(text, "gateway_ami_event_lag_seconds_count", adapter="asterisk") or 0) >= 2
    await ami.stop()

    async def down() -> bool:
        _, text = await scrape(gw.http_port)
        return sample(text, "gateway_ami_connected", adapter="asterisk") == 0

    assert await eventually(down)
