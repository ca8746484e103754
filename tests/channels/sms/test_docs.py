"""The configuration examples of docs/channels/sms.md are valid configurations."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from gateway.server.config import parse_settings

DOC = Path(__file__).resolve().parents[3] / "docs" / "channels" / "sms.md"
BLOCKS = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_documented_config_is_valid(block: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in set(re.findall(r'_env = "([A-Z_]+)"', block)):
        monkeypatch.setenv(var, "env-pw12")  # SMPP passwords: 8 at most
    _, configs = parse_settings(tomllib.loads(block), "<docs>")
    assert configs


def test_there_are_examples_for_every_type() -> None:
    types = {m for b in BLOCKS for m in re.findall(r'type = "([a-z-]+)"', b)}
    assert types == {"kannel", "twilio", "sms-webhook", "smpp", "cmpp"}
