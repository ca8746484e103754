"""deploy/kannel/kannel.conf: well formed for Kannel, and its get-url really works."""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes, urlsplit

import aiohttp
import pytest

from gateway.server.config import ConfigError
from gateway.testing import eventually
from tests.harness import free_ports, require

CONF = Path(__file__).resolve().parents[3] / "deploy" / "kannel" / "kannel.conf"


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
    assert url.password is None, "Kannel logs the whole get-url: no secret in it"
    gw = await start_gateway(adapters={"kannel": {"type": "kannel", "path": url.path,
                                                  "allow_from": ["127.0.0.1"]}})
    text = "市民来信：小区路灯不亮"
    query = kannel_escape(url.query, {
        "p": b"+8613800138000", "P": b"12345", "b": text.encode("utf-16-be"),
        "T": b"1795594480", "I": b"5c9f0e1a-4b5c-4d6e-8f70-112233445566", "c": b"2",
        "C": b"UTF-16BE", "u": b"", "i": b"operator1",
    })
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}{url.path}?{query}",
        headers={"User-Agent": "Kannel/1.4.5"},
    ) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    (contact,) = await gw.read_contacts()
    assert contact.text == text
    assert contact.external_id == "5c9f0e1a-4b5c-4d6e-8f70-112233445566"
    assert contact.meta["smsc"] == "operator1"
    assert contact.origin_at == 1795594480_000000


async def test_allow_from_refuses_other_peers_and_may_add_a_secret(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={
        "elsewhere": {"type": "kannel", "path": "/sms/a", "allow_from": ["10.20.0.0/16"]},
        "here": {"type": "kannel", "path": "/sms/b", "allow_from": ["127.0.0.0/8", "::1"],
                 "secret": "s3cret-pass"},
    })
    query = "from=%2B8613800138000&to=12345&text=hi&id=m1"
    base = f"http://127.0.0.1:{gw.http_port}"
    auth = base64.b64encode(b"kannel:s3cret-pass").decode()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/sms/a?{query}") as resp:
            assert resp.status == 403
        async with http.get(f"{base}/sms/b?{query}") as resp:
            assert resp.status == 401  # the right peer still needs the secret when one is set
        async with http.get(f"{base}/sms/b?{query}",
                            headers={"Authorization": f"Basic {auth}"}) as resp:
            assert resp.status == 200
    assert len(await gw.read_contacts()) == 1


async def test_allow_from_must_be_addresses(start_gateway: Any) -> None:
    with pytest.raises(ConfigError, match="allow_from"):
        await start_gateway(adapters={"k": {"type": "kannel", "allow_from": ["kannel.example"]}})


def paths(conf: str) -> list[str]:
    """Every file the sample makes Kannel write (logs, the message store)."""
    keys = ("log-file", "access-log", "store-location")
    return [v for g in groups(conf) for k, v in g.items() if k in keys]


async def test_bearerbox_and_smsbox_start_with_the_sample(tmp_path: Path) -> None:
    require(shutil.which("bearerbox") is not None,
            "Kannel's bearerbox: apt-get install kannel (.ci/run does)")
    text = CONF.read_text(encoding="utf-8")
    for path in paths(text):  # what Debian's kannel package creates (only /var/log/kannel)
        assert Path(path).parent.is_dir(), f"{path}: its folder is not on a Debian install"
    ports = dict(zip((13000, 13001, 13013), free_ports(3), strict=True))
    copy = text.replace('"/var/log/kannel/', f'"{tmp_path}/')
    for old, new in ports.items():
        copy = copy.replace(f"-port = {old}", f"-port = {new}")
    conf = tmp_path / "kannel.conf"
    conf.write_text(copy, encoding="utf-8")
    boxes: list[asyncio.subprocess.Process] = []

    async def get(url: str, log: str) -> tuple[int, str] | None:
        for box in boxes:
            assert box.returncode is None, (tmp_path / log).read_text()[-2000:]
        try:
            async with aiohttp.ClientSession() as http, http.get(url) as resp:
                return resp.status, await resp.text()
        except aiohttp.ClientError:
            return None

    async def start(box: str) -> None:
        boxes.append(await asyncio.create_subprocess_exec(
            box, str(conf), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        ))

    admin = groups(text)[0]["admin-password"]
    status = f"http://127.0.0.1:{ports[13000]}/status.txt?password={admin}"
    try:
        await start("bearerbox")
        answer = await eventually(lambda: get(status, "bearerbox.log"))
        assert answer[0] == 200 and "Kannel bearerbox version" in answer[1]
        assert (tmp_path / "kannel.store").exists()
        await start("smsbox")
        # smsbox is up when its sendsms port answers: a wrong password is refused (403)
        sendsms = f"http://127.0.0.1:{ports[13013]}/cgi-bin/sendsms?username=gateway&password=x"
        answer = await eventually(lambda: get(sendsms, "smsbox.log"))
        assert answer[0] == 403 and "Authorization failed" in answer[1]
    finally:
        for box in reversed(boxes):
            box.terminate()
            await box.wait()
