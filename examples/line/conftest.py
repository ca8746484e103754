"""The gateway's kit fixtures: a session Redis, a Redis to stop, a gateway starter."""

pytest_plugins = ["gateway.testing.plugin"]
