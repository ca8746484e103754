"""``gateway agi``: the intake as a classic AGI script (stdin/stdout, one process per call).

For hosts that cannot open a FastAGI port. Asterisk starts the script per call; it reads the
header block through pyst2, posts the contact to the gateway's ``POST /v1/intake`` HTTP API
(so the script needs no Redis and no config of its own), and sets the same ``GATEWAY_*``
channel variables as the FastAGI ``intake`` script. Whatever fails, it sets
``GATEWAY_STATUS=FAILED`` and exits 0 so that the call goes on to the queue.

Dialplan: ``same => n,AGI(/opt/gateway/.venv/bin/gateway,agi,url=http://gw:8080/v1/intake,
api-key-file=/etc/asterisk/gateway.key,arrived=${GATEWAY_ARRIVED})``.
Options, as ``--name=value`` or ``name=value``, or environment: ``url``
(``GATEWAY_INTAKE_URL``, default ``http://127.0.0.1:8080/v1/intake``), the API key from
``GATEWAY_API_KEY`` or ``api-key-file``, ``config=FILE adapter=NAME`` to take ``languages``/
``queues``/``default_queue``/``region``/``repeat_priority`` from that adapter's table,
``timeout`` in seconds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from gateway.adapters import Receipt
from gateway.channels.voice.agi import format_command, script_args
from gateway.channels.voice.intake import arrival, build_inbound, channel_variables, dialled_number
from gateway.contact.clock import format_time, parse_time
from gateway.records import Deadline, Inbound, Repeat

DEFAULT_URL = "http://127.0.0.1:8080/v1/intake"


def _routing(path: str | None, adapter: str) -> Any:
    from gateway.channels.voice.adapter import AsteriskConfig
    from gateway.server.config import load_table

    if not path:
        return AsteriskConfig()
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    table = dict(raw.get("adapters", {}).get(adapter, {}))
    table.pop("type", None)
    table.pop("ami", None)  # its secret is not this process's business
    return load_table(AsteriskConfig, table, f"adapters.{adapter}")


def _options(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gateway agi", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("GATEWAY_INTAKE_URL", DEFAULT_URL))
    p.add_argument("--api-key-file", default=os.environ.get("GATEWAY_API_KEY_FILE", ""))
    p.add_argument("--config", default=os.environ.get("GATEWAY_CONFIG", ""))
    p.add_argument("--adapter", default="asterisk")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--arrived", default="")
    # ``name=value`` words work like ``--name=value``: the dialplan can pass them through
    # command lines that would take a leading ``--`` for their own options.
    words = [
        f"--{w}" if "=" in w and w.split("=", 1)[0] in _OPTION_NAMES else w for w in argv
    ]
    opts, _ = p.parse_known_args(words)
    return opts


_OPTION_NAMES = frozenset({"url", "api-key-file", "config", "adapter", "timeout", "arrived"})


def _api_key(opts: argparse.Namespace) -> str:
    if opts.api_key_file:
        return Path(opts.api_key_file).read_text(encoding="utf-8").strip()
    return os.environ.get("GATEWAY_API_KEY", "")


def post_contact(inbound: Inbound, url: str, key: str, timeout: float) -> Receipt:
    """POST the contact to ``/v1/intake``; return its receipt, raise ``OSError``/``ValueError``."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("the intake URL must be http:// or https://")
    body = {
        "channel": inbound.channel,
        "sender": {"address": inbound.sender.address, "name": inbound.sender.name},
        "recipient": inbound.recipient,
        "external_id": inbound.external_id,
        "language": inbound.language,
        "origin_at": format_time(inbound.origin_at or inbound.received_at),
        "meta": inbound.meta,
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, orjson.dumps(body), headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        if response.status != 202:
            raise ValueError(f"intake answered {response.status}")
        data = orjson.loads(response.read())
    deadline = data["deadline"]
    repeat = data.get("repeat") or {}
    return Receipt(
        contact_id=str(data["id"]),
        status=str(data.get("status", "enqueued")),
        deadline=Deadline(deadline["kind"], parse_time(deadline["due_at"]), deadline["policy"]),
        repeat=Repeat(int(repeat.get("count", 0)), int(repeat.get("window", 0))),
    )


def _set_variables(agi: Any, out: IO[str], variables: list[tuple[str, str]]) -> None:
    for name, value in variables:
        try:
            # pyst2's set_variable neither escapes quotes nor runs after SIGHUP; SET VARIABLE
            # works on a dead channel, so send it ourselves and read the reply through pyst2.
            out.write(format_command("SET VARIABLE", name, value).decode("utf-8"))
            out.flush()
            agi.get_result()
        except Exception:  # noqa: S112 - one failed variable must not stop the others
            continue


def _say(agi: Any, out: IO[str], message: str) -> None:
    """Tell both logs why the call has no contact: stderr and Asterisk's own (``VERBOSE``)."""
    print(message, file=sys.stderr)
    try:
        out.write(format_command("VERBOSE", message, 1).decode("utf-8"))
        out.flush()
        agi.get_result()
    except Exception:  # noqa: S110 - the call goes on to the queue whatever happens here
        pass


def main(argv: Sequence[str]) -> int:
    """Run one classic AGI session on stdin/stdout; always return 0."""
    started = time.time_ns() // 1000
    opts = _options(argv)
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline="\n")
    stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", write_through=True)
    from asterisk.agi import AGI

    agi = AGI(stdin=stdin, stdout=stdout, stderr=io.StringIO())  # stderr would log caller ids
    env: dict[str, str] = {str(k): str(v) for k, v in agi.env.items()}
    receipt: Receipt | None = None
    key = ""
    try:
        config = _routing(opts.config, opts.adapter)
    except Exception as exc:
        print(f"gateway agi: config: {exc}", file=sys.stderr)
        from gateway.channels.voice.adapter import AsteriskConfig

        config = AsteriskConfig()
    recipient = dialled_number(env)
    language = config.languages.get(recipient)
    try:
        own = set(argv) | {"agi"}
        received_at, origin_at, _ = arrival(opts.arrived, started, 120.0)
        inbound = build_inbound(
            env,
            adapter=opts.adapter,
            received_at=received_at,
            config=config,
            args=[a for a in script_args(env) if a not in own],
            origin_at=origin_at or started,
        )
        inbound.meta["agi_mode"] = "classic"
        key = _api_key(opts)
        receipt = post_contact(inbound, opts.url, key, opts.timeout)
    except urllib.error.HTTPError as exc:
        why = {
            401: "the intake API refused the call: no or wrong API key"
                 + ("" if key else " (none given: set GATEWAY_API_KEY or api-key-file=)"),
            403: "the API key may not post to /v1/intake (its scope lacks intake)",
        }.get(exc.code, f"the intake API answered {exc.code}")
        _say(agi, stdout, f"gateway agi: {why}")
    except Exception as exc:
        _say(agi, stdout, f"gateway agi: intake failed: {type(exc).__name__}")
    variables = channel_variables(receipt, recipient=recipient, language=language, config=config)
    _set_variables(agi, stdout, variables)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
