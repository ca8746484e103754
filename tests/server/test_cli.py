"""The command line: ``check-config`` validates exactly as ``serve`` does; the read-only
commands need only the Redis settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.server.cli import load_settings, main

# Each table passes its config class's field types but breaks a rule of its channel type
# that was checked only when the adapter was constructed, so check-config said OK.
TYPE_RULES = [
    ('type = "kannel"', "adapters.x.secret"),
    ('type = "kannel"\nsecret = "s3cret"\neight_bit_charsets = ["no-such"]',
     "adapters.x.eight_bit_charsets"),
    ('type = "sms-webhook"\nauth = "hmac-sha256"', "adapters.x.secret"),
    ('type = "twilio"\naccount_sid = "AC00000000000000000000000000000000"\n'
     'auth_token = "tok-12345"', "adapters.x.public_url"),
    ('type = "wechat"\napp_id = "wx1"\ntoken = "tok-1"\nmode = "safe"',
     "adapters.x.encoding_aes_key"),
    ('type = "asterisk"\nagi_listen = "127.0.0.1:0"\nagi_allow = ["not-a-net"]',
     "adapters.x.agi_allow[0]"),
    ('type = "smtp"\nmailboxes = ["a@example.org"]\nmax_message_size = 60000000',
     "adapters.x.max_message_size"),
]


def config(tmp_path: Path, body: str, redis_url: str = "unix:///nowhere") -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[gateway]\ndata_dir = "{tmp_path / "var"}"\n'
        f'[redis]\nurl = "{redis_url}"\nprefix = "cli"\n'
        f'[http]\nlisten = "127.0.0.1:0"\n{body}\n'
    )
    return path


@pytest.mark.parametrize(("table", "key"), TYPE_RULES, ids=[k for _, k in TYPE_RULES])
def test_check_config_refuses_what_serve_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, key: str
) -> None:
    path = config(tmp_path, f"[adapters.x]\n{table}")
    assert main(["check-config", str(path)]) == 1
    checked = capsys.readouterr().err
    assert f"{key}:" in checked
    assert main(["serve", "-c", str(path)]) == 2  # refused before anything starts
    assert f"{key}:" in capsys.readouterr().err


def test_check_config_accepts_a_valid_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, '[adapters.k]\ntype = "kannel"\nsecret = "s3cret"')
    assert main(["check-config", str(path)]) == 0
    assert "OK (1 adapters: k)" in capsys.readouterr().out


# Secrets of everything but Redis, none of them in the environment.
UNSET = """
[[api.keys]]
name = "cases"
key_env = "CLI_TEST_UNSET_API_KEY"
scopes = ["read"]

[[push.subscribers]]
name = "crm"
url = "http://127.0.0.1:9/hook"
secret_env = "CLI_TEST_UNSET_PUSH_SECRET"

[adapters.kannel]
type = "kannel"
secret_env = "CLI_TEST_UNSET_KANNEL_SECRET"

[adapters.tg]
type = "telegram"
token_env = "CLI_TEST_UNSET_TELEGRAM_TOKEN"

[adapters.pbx]
type = "asterisk"
ami = { username = "gateway", secret_env = "CLI_TEST_UNSET_AMI_SECRET" }
"""


def test_read_only_commands_need_no_adapter_secrets(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, UNSET, redis_url)
    assert main(["check-config", str(path)]) == 1  # serve needs them all...
    assert "CLI_TEST_UNSET_TELEGRAM_TOKEN" in capsys.readouterr().err
    # ...the read-only commands need Redis only (all four refused to run before)
    assert main(["info", "-c", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"] == {"kannel": "kannel", "tg": "telegram", "pbx": "asterisk"}
    assert info["redis"]["contacts"] == 0
    assert main(["tail", "-c", str(path), "--count", "5"]) == 0
    assert main(["report", "-c", str(path), "--format", "json"]) == 0
    assert main(["deadletter", "-c", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "crm\t0"
    # a replay signs with the subscriber's secret: that one it does need
    assert main(["deadletter", "-c", str(path), "--replay", "crm"]) == 2
    assert "CLI_TEST_UNSET_PUSH_SECRET" in capsys.readouterr().err


def test_read_only_commands_still_read_the_redis_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, "")
    text = path.read_text().replace(
        'prefix = "cli"', 'prefix = "cli"\npassword_env = "CLI_TEST_UNSET_REDIS_PASSWORD"'
    )
    path.write_text(text)
    assert main(["tail", "-c", str(path)]) == 2
    assert "redis.password_env" in capsys.readouterr().err


def test_the_old_names_of_region_are_read_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three names meant one thing: [api] default_region, the voice adapter's default_region,
    # Open311's phone_region; the SMS adapters said region. Now all say region.
    path = config(
        tmp_path,
        '[api]\ndefault_region = "US"\n'
        '[adapters.o]\ntype = "open311"\nphone_region = "FR"\n'
        '[adapters.k]\ntype = "kannel"\nsecret = "s3cret"\nregion = "DE"',
    )
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "api.default_region: deprecated, the key is now 'region'" in err
    assert "adapters.o.phone_region: deprecated" in err
    assert "adapters.k" not in err
    settings, adapters = load_settings(str(path))
    assert settings.api.region == "US"
    assert adapters["o"].region == "FR" and adapters["k"].region == "DE"


def test_a_region_under_both_names_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = config(tmp_path, '[api]\ndefault_region = "US"\nregion = "CN"')
    assert main(["check-config", str(path)]) == 1
    assert "api.default_region: renamed to 'region'" in capsys.readouterr().err
