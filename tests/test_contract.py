"""The contract every registered channel type keeps (built-in and entry-point ones alike).

Parametrized over the registry, so a new channel runs these without writing a line:
its example config validates, unknown keys are rejected by name, secrets never print,
the adapter starts from its example inside a real gateway, and stop is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

import pytest

from gateway.adapters import ChannelType, load_channel_types, load_media
from gateway.server.config import ConfigError, HostPort, Secret, load_table
from gateway.server.logs import MaskingFilter

TYPES = load_channel_types()
SECRET = "contract-secret-3f9a1c"


def example_with_secrets(channel_type: ChannelType[Any]) -> dict[str, Any]:
    """The type's example with every secret replaced by a recognizable value and ports at 0."""
    table = dict(channel_type.example)
    hints = typing.get_type_hints(channel_type.config)
    for f in dataclasses.fields(channel_type.config):
        tp = hints[f.name]
        if tp is Secret and f.name in table:
            table[f.name] = SECRET
        if tp is HostPort:
            table[f.name] = "127.0.0.1:0"
    return table


def test_builtin_channels_are_registered():
    assert {
        "smtp",
        "kannel",
        "smpp",
        "cmpp",
        "twilio",
        "sms-webhook",
        "telegram",
        "wechat",
        "weibo",
        "open311",
    } <= set(TYPES)


@pytest.mark.parametrize("type_name", sorted(TYPES))
def test_type_declares_a_known_channel_and_a_valid_example(type_name):
    channel_type = TYPES[type_name]
    assert channel_type.name == type_name
    assert channel_type.channel in load_media()
    config = load_table(channel_type.config, channel_type.example, f"adapters.{type_name}")
    assert dataclasses.is_dataclass(config)


@pytest.mark.parametrize("type_name", sorted(TYPES))
def test_unknown_keys_are_rejected_by_name(type_name):
    channel_type = TYPES[type_name]
    with pytest.raises(ConfigError) as info:
        load_table(channel_type.config, {**channel_type.example, "no_such_key": 1}, "adapters.x")
    assert ("adapters.x.no_such_key", "unknown key") in info.value.errors


@pytest.mark.parametrize("type_name", sorted(TYPES))
def test_secrets_never_appear_in_the_config_repr(type_name):
    channel_type = TYPES[type_name]
    config = load_table(channel_type.config, example_with_secrets(channel_type), "adapters.x")
    assert SECRET not in repr(config)


@pytest.mark.parametrize("type_name", sorted(TYPES))
async def test_adapter_starts_from_its_example_and_stops_twice(type_name, start_gateway, caplog):
    """Secrets are checked in what reaches a log handler: the gateway's handlers carry the
    masking filter (``gateway.server.logs.setup_logging``), so the test's capture handler does
    too."""
    channel_type = TYPES[type_name]
    table = {"type": type_name, **example_with_secrets(channel_type)}
    masking = MaskingFilter()
    caplog.handler.addFilter(masking)  # pytest keeps one capture handler: take it off after
    try:
        with caplog.at_level(logging.DEBUG):
            gw = await start_gateway(adapters={"probe": table})
            adapter = gw.adapters["probe"]
            assert adapter.name == "probe"
            assert adapter.channel == channel_type.channel
            await adapter.stop()
            await adapter.stop()
        assert SECRET not in caplog.text
    finally:
        caplog.handler.removeFilter(masking)


def walk(value: Any, seen: set[int] | None = None) -> list[Any]:
    """Every value reachable from ``value`` (dataclass fields, mappings, sequences)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    found = [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found += walk(getattr(value, f.name), seen)
    elif isinstance(value, dict):
        for k, v in value.items():
            found += walk(k, seen) + walk(v, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            found += walk(v, seen)
    return found


async def test_an_adapter_sees_no_secret_of_the_core_or_of_another_adapter(start_gateway):
    """``AdapterContext.settings`` was the whole Settings: every adapter could read every other
    adapter's table (with its secrets), the API keys and the push secrets."""
    from gateway.server.config import AdapterSettings

    core_secrets = {
        "api-key-7c1e0b",
        "push-secret-5d2a9e",
        "metrics-token-8b3f4c",
    }
    gw = await start_gateway(
        adapters={
            "kannel": {"type": "kannel", "path": "/sms/k", "secret": "kannel-secret-1a2b3c"},
            "hook": {"type": "sms-webhook", "path": "/sms/h", "secret": "hook-secret-4d5e6f"},
        },
        api={"keys": [{"name": "cases", "key": "api-key-7c1e0b", "scopes": ["read"]}]},
        push={"subscribers": [{"name": "crm", "url": "http://127.0.0.1:9/h",
                               "secret": "push-secret-5d2a9e"}]},
        http={"metrics_token": "metrics-token-8b3f4c"},
    )
    secrets = core_secrets | {"kannel-secret-1a2b3c", "hook-secret-4d5e6f"}
    for adapter in gw.adapters.values():
        settings = adapter.ctx.settings  # type: ignore[attr-defined]
        assert isinstance(settings, AdapterSettings)
        reachable = walk(settings)
        assert not [v for v in reachable if isinstance(v, Secret)]
        assert not [v for v in reachable if isinstance(v, str) and v in secrets]
        assert settings.gateway.data_dir == gw.settings.gateway.data_dir  # what adapters need
        assert settings.intake == gw.settings.intake and settings.sla == gw.settings.sla
