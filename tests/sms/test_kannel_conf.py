"""deploy/kannel/kannel.conf: well formed for Kannel, and its get-url really works."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import aiohttp

CONF = Path(__file__).resolve().parents[2] / "deploy" / "kannel" / "kannel.conf"


def groups(text: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if not stripped:
            if current is not None:
                found.append(current)
            current = None
            continue
        key, sep, value = stripped.partition("=")
        assert sep, f"not a key = value line: {line!r}"
        if current is None:
            assert key.strip() == "group", f"group must start with group = ...: {line!r}"
            current = {}
        current[key.strip()] = value.strip().strip('"')
    assert current is None, "the last group must end with an empty line"
    return found


def test_every_group_ends_with_an_empty_line() -> None:
    text = CONF.read_text(encoding="utf-8")
    assert text.endswith("\n\n")
    names = [g["group"] for g in groups(text)]
    assert names == ["core", "smsc", "smsbox", "sendsms-user", "sms-service"]


def kannel_escape(pattern: str, values: dict[str, bytes]) -> str:
    """Fill %x escapes as Kannel's urltrans_fill_escape_codes does (url-encoded, + for space)."""
    return re.sub(
        r"%(.)",
        lambda m: quote_from_bytes(values.get(m.group(1), b""), safe="").replace("%20", "+"),
        pattern,
    )


async def test_get_url_from_the_conf_reaches_the_gateway(start_gateway: Any) -> None:
    service = next(g for g in groups(CONF.read_text(encoding="utf-8"))
                   if g["group"] == "sms-service")
    assert service["accept-x-kannel-headers"] == "true"
    assert service["omit-empty"] == "true"
    url = urlsplit(service["get-url"])
    password = url.password or ""
    gw = await start_gateway(adapters={"kannel": {"type": "kannel", "path": url.path,
                                                  "secret": password}})
    text = "市民来信：小区路灯不亮"
    query = kannel_escape(url.query, {
        "p": b"+8613800138000", "P": b"12345", "b": text.encode("utf-16-be"),
        "T": b"1795594480", "I": b"5c9f0e1a-4b5c-4d6e-8f70-112233445566", "c": b"2",
        "C": b"UTF-16BE", "u": b"", "i": b"operator1",
    })
    auth = base64.b64encode(f"{url.username}:{password}".encode()).decode()
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}{url.path}?{query}",
        headers={"Authorization": f"Basic {auth}", "User-Agent": "Kannel/1.4.5"},
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    (contact,) = await gw.read_contacts()
    assert contact.text == text
    assert contact.external_id == "5c9f0e1a-4b5c-4d6e-8f70-112233445566"
    assert contact.meta["smsc"] == "operator1"
    assert contact.origin_at == 1795594480_000000
