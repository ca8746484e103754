"""The configuration examples in docs/channels/chat.md and web.md load as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.server.config import parse_settings

DOCS = Path(__file__).resolve().parents[3] / "docs" / "channels"
ENV = {
    "GATEWAY_TELEGRAM_TOKEN": "123:abc",
    "GATEWAY_WECHAT_TOKEN": "token",
    "GATEWAY_WECHAT_APPSECRET": "secret",
    "GATEWAY_WECHAT_AESKEY": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
    "GATEWAY_WEIBO_APPSECRET": "secret",
    "GATEWAY_WEIBO_TOKEN": "token",
    "GATEWAY_APP_IOS_KEY": "key",
    "GATEWAY_OPEN311_KEY_APP1": "key",
}


def _blocks(name: str) -> list[str]:
    return re.findall(r"```toml\n(.*?)```", (DOCS / name).read_text(encoding="utf-8"), re.S)


CASES = [(doc, i) for doc in ("chat.md", "web.md") for i in range(len(_blocks(doc)))]


def test_the_docs_have_examples() -> None:
    assert [doc for doc, _ in CASES].count("chat.md") >= 3
    assert [doc for doc, _ in CASES].count("web.md") >= 2


@pytest.mark.parametrize(("doc", "index"), CASES)
def test_doc_examples_load(
    doc: str, index: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    key_file = tmp_path / "web-app.key"
    key_file.write_text("k\n")
    block = _blocks(doc)[index].replace("/etc/gateway/web-app.key", str(key_file))
    _, configs = parse_settings(tomllib.loads(block), doc)
    assert configs, "each example configures at least one adapter"
