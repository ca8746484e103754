"""Config validation (every error names its key, secrets from env/files) and masked logs."""

from __future__ import annotations

import logging

import pytest

from gateway.server.config import ConfigError, Secret, load_file, parse_duration
from gateway.server.logs import MaskingFilter, mask


def test_every_error_names_its_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        """
[redis]
url = 5
prefx = "typo"
[sla]
voice_answer = "fast"
[http]
listen = "nowhere"
[adapters.mystery]
type = "carrier-pigeon"
"""
    )
    with pytest.raises(ConfigError) as info:
        load_file(path)
    keys = {key for key, _ in info.value.errors}
    assert keys == {
        "redis.url",
        "redis.prefx",
        "sla.voice_answer",
        "http.listen",
        "adapters.mystery.type",
    }
    assert str(path) in str(info.value)


def test_secrets_from_env_and_file_never_print(tmp_path, monkeypatch):
    secret_file = tmp_path / "key"
    secret_file.write_text("from-file\n")
    monkeypatch.setenv("GW_KEY", "from-env")
    path = tmp_path / "ok.toml"
    path.write_text(
        f"""
[api]
keys = [{{ name = "a", key_env = "GW_KEY" }}, {{ name = "b", key_file = "{secret_file}" }}]
"""
    )
    settings, _ = load_file(path)
    a, b = settings.api.keys
    assert a.key.reveal() == "from-env" and b.key.reveal() == "from-file"
    assert "from-env" not in repr(settings) and "from-file" not in repr(settings)
    assert str(Secret("x")) == "Secret('***')"


def test_missing_secret_env_is_an_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[api]\nkeys = [{ name = "a", key_env = "GW_NOT_SET_ANYWHERE" }]\n')
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert info.value.errors[0][0] == "api.keys[0].key_env"


def test_example_config_is_valid(monkeypatch):
    for name in (
        "GATEWAY_AMI_SECRET",
        "GATEWAY_APP_KEY",
        "GATEWAY_KANNEL_SECRET",
        "GATEWAY_KANNEL_SENDSMS_PASSWORD",
        "GATEWAY_TELEGRAM_TOKEN",
        "GATEWAY_CASES_TOKEN",
        "GATEWAY_PUSH_SECRET",
        "GATEWAY_WECHAT_TOKEN",
        "GATEWAY_WECHAT_APPSECRET",
        "GATEWAY_WEIBO_APPSECRET",
        "GATEWAY_WEIBO_TOKEN",
        "GATEWAY_IOS_APP_KEY",
    ):
        monkeypatch.setenv(name, "example-secret")
    monkeypatch.setenv("GATEWAY_WECHAT_AESKEY", "a" * 43)
    settings, adapters = load_file("config/gateway.example.toml")
    assert set(adapters) == {
        "asterisk",
        "mailbox",
        "kannel",
        "telegram",
        "wechat",
        "weibo",
        "app",
        "open311",
    }
    deadlines = settings.sla.deadlines
    assert deadlines["voice_answer"] == 15 and deadlines["email_response"] == 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("15s", 15), ("3m", 180), ("24h", 86400), ("7d", 604800), ("250ms", 0.25), (30, 30)],
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_logs_mask_phone_numbers_and_addresses(caplog):
    assert mask("from +8613800138000") == "from +*********8000"
    assert mask("mail zhang.san@example.gov.cn") == "mail z***@example.gov.cn"
    logger = logging.getLogger("gateway.test")
    logger.addFilter(MaskingFilter())
    with caplog.at_level(logging.INFO):
        logger.info("sms from %s to %s", "+8613800138000", "12345")
    assert "13800138000" not in caplog.text and "8000" in caplog.text


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no")

    __str__ = __repr__


@pytest.mark.parametrize(
    ("msg", "args"),
    [
        ("update %d", ({},)),
        ("two %s %s", ("+8613800138000",)),
        ("none %s", ()),
        (_Unprintable(), ()),
        ("x %s", (_Unprintable(),)),
    ],
)
def test_masking_filter_never_raises_on_arguments_that_do_not_fit(msg, args):
    record = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, None)
    assert MaskingFilter().filter(record) is True
    assert "13800138000" not in record.getMessage()
