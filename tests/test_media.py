"""A medium is a package: a distribution the gateway has never heard of declares ``letter``
(its deadline, its row's labels) on its channel type, and a letter flows through intake, the
SLA deadline, ``[sla]``, the report and the dashboard with no change to the core.

The distribution is ``tests/letter_site/`` (a module and its ``.dist-info`` with the
``gateway.channels`` entry point), put on ``sys.path`` as pip would install it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.adapters import load_channel_types, load_media
from gateway.cases.i18n import Locale
from gateway.cases.report import build, render
from gateway.contact.clock import MICROS_PER_SECOND, SYSTEM_CLOCK
from gateway.server.config import ConfigError, parse_settings
from gateway.testing import eventually
from tests.cases.conftest import API, TOKENS

SITE = Path(__file__).parent / "letter_site"
DAY = 86400 * MICROS_PER_SECOND


@pytest.fixture
def letters(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The letter distribution installed for one test (the registries read again around it)."""
    monkeypatch.syspath_prepend(str(SITE))
    load_channel_types.cache_clear()
    load_media.cache_clear()
    yield
    monkeypatch.undo()
    load_channel_types.cache_clear()
    load_media.cache_clear()


def test_the_new_medium_is_registered_and_its_deadline_configurable(letters: None) -> None:
    assert "letter" in load_channel_types() and "letter" in load_media()
    assert load_media().names()[:5] == ("voice", "sms", "chat", "web", "email")
    settings, _ = parse_settings({"sla": {"letter_response": "10d"}})
    assert settings.sla.deadlines == {"letter_response": 10 * 86400}
    with pytest.raises(ConfigError) as caught:
        parse_settings({"sla": {"fax_response": "1h"}})
    assert caught.value.errors == [("sla.fax_response", "unknown key")]


def test_without_the_distribution_the_medium_is_unknown() -> None:
    assert "letter" not in load_media()
    with pytest.raises(ConfigError):
        parse_settings({"sla": {"letter_response": "10d"}})


async def post(gw: Any, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{gw.http_port}{path}", json=body) as r:
            return r.status, await r.json() if r.status == 200 else await r.text()


async def test_a_letter_flows_through_intake_deadline_report_and_dashboard(
    letters: None, start_gateway: Any
) -> None:
    gw = await start_gateway(
        api=API, adapters={"mailroom": {"type": "letter"}}, sla={"letter_response": "10d"}
    )
    status, answer = await post(gw, "/letters", {"scan": "S-1", "from": "张三", "text": "路灯坏了"})
    assert status == 200
    (contact,) = await gw.read_contacts()
    assert (contact.id, contact.channel, contact.adapter) == (answer["id"], "letter", "mailroom")
    assert contact.deadline.policy == "letter_response" and contact.deadline.kind == "response"
    assert contact.deadline.due_at == contact.received_at + 10 * DAY  # [sla] over the default
    # the intake API takes the registered medium too, under the same [sla] deadline
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{gw.http_port}/v1/intake",
            json={"channel": "letter", "text": "第二封", "external_id": "S-2"},
            headers={"Authorization": f"Bearer {TOKENS['intake']}"},
        ) as r:
            assert r.status == 202, await r.text()
    contacts = await gw.read_contacts()
    second = next(c for c in contacts if c.external_id == "S-2")
    assert second.deadline.due_at == second.received_at + 10 * DAY

    now = SYSTEM_CLOCK.now_us()
    events = await gw.read_events()
    report = build(contacts, events, since_us=now - DAY, until_us=now + 1, sla=gw.settings.sla)
    (row,) = report["channels"]
    assert (row["channel"], row["volume"], row["open"]) == ("letter", 2, 2)
    assert report["series"]["deadlines_s"]["letter"] == 10 * 86400
    assert "来信" in render(report, "table", Locale("zh", "UTC"))
    assert "Letters" in render(report, "html", Locale("en", "UTC"))

    async def counted() -> dict[str, Any] | None:
        """The live figures once the aggregator has counted both letters (it reads the events
        stream on its own; the wallboard caches a snapshot for a second)."""
        async with aiohttp.ClientSession() as s:
            async with s.get(
                f"http://127.0.0.1:{gw.http_port}/dashboard/live?lang=en",
                headers={"Authorization": f"Bearer {TOKENS['reader']}"},
            ) as r:
                assert r.status == 200
                body: dict[str, Any] = await r.json()
        rows = body["figures"]["rolling"]
        return body if rows.get("letter", {}).get("volume") == 2 else None

    live = await eventually(counted)
    assert "letter" in live["figures"]["channels"]
    assert "Letters" in live["html"]["rolling"] and "Letters" in live["html"]["open"]
