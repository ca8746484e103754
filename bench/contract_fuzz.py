"""schemathesis over the gateway's own OpenAPI document, against a real gateway and Redis.

``make test`` runs it small (tests/cases/test_schemathesis.py: 25 examples per operation, a
fixed seed); this script runs it long against a ``gateway serve`` of its own (embedded Redis,
a temporary data folder) and prints schemathesis' summary:

    .venv/bin/python -m bench.contract_fuzz --examples 500 --seed 20261201

Every check is on (``--checks all``): server errors, problem+json and status codes as
documented, responses valid against their schemas (the shipped JSON Schemas for records),
schema-valid requests accepted and schema-violating ones refused, stateful sequences.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ADMIN_TOKEN = "contract-fuzz-admin-0123456789"
APP_KEY = "contract-fuzz-app-0123456789"


def gateway_tables(push_url: str) -> dict[str, object]:
    """What the fuzzed gateway serves: an admin key, a push subscriber, the app channel."""
    return {
        "api": {
            "open_to_loopback": False,
            "keys": [{"name": "fuzz", "key": ADMIN_TOKEN, "scopes": ["admin"]}],
        },
        "push": {
            "subscribers": [
                {"name": "crm", "url": push_url, "secret": "fuzz-push-secret", "max_attempts": 1}
            ]
        },
        "adapters": {"apps": {"type": "app", "apps": {"a1": {"key": APP_KEY}}}},
    }


def schemathesis_command(
    base_url: str, examples: int, seed: int, max_time_s: int | None = None
) -> list[str]:
    """The schemathesis run over every operation of the served document."""
    binary = Path(sys.executable).with_name("schemathesis")
    budget = ["--max-time", str(max_time_s)] if max_time_s else []
    return [
        str(binary),
        "run",
        *budget,
        f"{base_url}/v1/openapi.json",
        "--url",
        base_url,
        "--checks",
        "all",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--request-timeout",
        "40",  # long polls wait up to 30 s (wait_ms): schemathesis' 10 s would cut them
        "--max-response-time",
        "35",  # ...and a long poll that waits as asked is no slow answer
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--no-color",
        "--warnings",
        "off",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(tmp: Path, port: int) -> str:
    return f"""
[gateway]
data_dir = "{tmp / "var"}"
[http]
listen = "127.0.0.1:{port}"
[[api.keys]]
name = "fuzz"
key = "{ADMIN_TOKEN}"
scopes = ["admin"]
[[push.subscribers]]
name = "crm"
url = "http://127.0.0.1:9/hook"
secret = "fuzz-push-secret"
max_attempts = 1
[adapters.apps]
type = "app"
apps = {{ a1 = {{ key = "{APP_KEY}" }} }}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="per operation")
    parser.add_argument("--seed", type=int, default=20261201)
    parser.add_argument(
        "--max-time", type=int, default=0, help="a time budget in seconds: fuzzing and "
        "stateful tests repeat until it is spent (schemathesis --max-time); 0: none"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="contract-fuzz-") as folder:
        tmp = Path(folder)
        port = _free_port()
        config = tmp / "gateway.toml"
        config.write_text(_toml(tmp, port))
        serve = subprocess.Popen(
            [str(Path(sys.executable).with_name("gateway")), "serve", "-c", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            started = time.monotonic()
            code = subprocess.call(
                schemathesis_command(base, args.examples, args.seed, args.max_time or None)
            )
            print(f"contract_fuzz: {args.examples} examples per operation, seed {args.seed}: "
                  f"exit {code} in {time.monotonic() - started:.0f} s", flush=True)
            return code
        finally:
            serve.terminate()
            serve.wait(30)


if __name__ == "__main__":
    sys.exit(main())
