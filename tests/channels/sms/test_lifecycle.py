"""Every SMS channel type: registered, its example config valid, stop idempotent."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.adapters import load_channel_types

TYPES = ["kannel", "twilio", "sms-webhook", "smpp", "cmpp"]


@pytest.mark.parametrize("name", TYPES)
async def test_registered_example_starts_and_stops_twice(name: str, start_gateway: Any) -> None:
    channel_type = load_channel_types()[name]
    assert channel_type.channel == "sms"
    gw = await start_gateway(adapters={"a": {"type": name, **channel_type.example}})
    adapter = gw.adapters["a"]
    assert adapter.channel == "sms" and adapter.name == "a"
    await adapter.stop()
    await adapter.stop()


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"type": "kannel"}, "adapters.a.secret"),
        ({"type": "sms-webhook"}, "adapters.a.secret"),
        ({"type": "twilio", "account_sid": "AC1", "auth_token": "t"}, "adapters.a.public_url"),
        ({"type": "kannel", "secret": "s", "eight_bit_charsets": ["no-such-codec"]},
         "adapters.a.eight_bit_charsets"),
        ({"type": "smpp", "system_id": "x"}, "adapters.a.host"),
        ({"type": "smpp", "host": "h", "system_id": "x", "password": "longer-than-8"},
         "adapters.a.password"),
        ({"type": "cmpp", "host": "h", "source_addr": "901234", "window": 17},
         "adapters.a.window"),
        ({"type": "cmpp", "host": "h", "source_addr": "9012345"}, "adapters.a.source_addr"),
    ],
)
async def test_unauthenticated_or_broken_config_refused(table: dict[str, Any], key: str,
                                                         start_gateway: Any) -> None:
    from gateway.server.config import ConfigError

    with pytest.raises(ConfigError) as err:
        await start_gateway(adapters={"a": table})
    assert key in str(err.value)
