"""The case-systems configuration: push subscribers, watcher, dashboard, API key scopes."""

from __future__ import annotations

import pytest

from gateway.server.config import ConfigError, Secret, parse_settings


def test_sections_parse_with_secrets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", "from-env")
    settings, _ = parse_settings(
        {
            "api": {"keys": [{"key": "k", "name": "cases", "scopes": ["read", "reply"]}]},
            "push": {
                "subscribers": [
                    {
                        "name": "crm",
                        "url": "http://crm/hook",
                        "secret_env": "HOOK_SECRET",
                        "events": True,
                        "max_attempts": 3,
                        "backoff": "250ms",
                        "timeout": "2s",
                    }
                ]
            },
            "watcher": {"interval": "100ms"},
            "dashboard": {"window": "6h", "refresh": "10s"},
        }
    )
    (sub,) = settings.push.subscribers
    assert sub.secret == Secret("from-env") and "from-env" not in repr(sub)
    assert (sub.max_attempts, sub.backoff, sub.timeout, sub.events) == (3, 0.25, 2.0, True)
    assert settings.watcher.interval == 0.1 and settings.watcher.enabled
    assert (settings.dashboard.window, settings.dashboard.refresh) == (21600.0, 10.0)
    assert settings.api.keys[0].scopes == ("read", "reply")


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"api": {"keys": [{"key": "k", "scopes": ["write"]}]}}, "api.keys[0].scopes[0]"),
        ({"push": {"subscribers": [{"name": "a", "url": "u"}]}}, "push.subscribers[0].secret"),
        (
            {"push": {"subscribers": [{"name": "a", "url": "u", "secret": "s", "retries": 3}]}},
            "push.subscribers[0].retries",
        ),
        ({"watcher": {"interval": "soon"}}, "watcher.interval"),
        ({"dashboard": {"colour": "red"}}, "dashboard.colour"),
    ],
)
def test_errors_name_their_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert key in [k for k, _ in info.value.errors]
