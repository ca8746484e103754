"""The ``gateway`` command: serve, tail, report, check-config, info, agi."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import platform
import signal
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from gateway import __version__
from gateway.cases.replies import reply_queues
from gateway.queueing.access import open_queue
from gateway.queueing.embedded import EmbeddedRedisError
from gateway.queueing.keys import Keys
from gateway.queueing.spool import SpoolError
from gateway.queueing.store import decode_fields
from gateway.server.config import (
    TOOL_SECRETS,
    ConfigError,
    Settings,
    deprecations,
    parse_settings,
    read_file,
)
from gateway.server.lock import DataDirBusy
from gateway.server.logs import setup_logging
from gateway.server.permissions import UnsafePermissions
from gateway.server.workers import (
    WorkerRole,
    default_count,
    die_with_parent,
    listener_addresses,
    serve_workers,
)


def default_raw_config() -> dict[str, Any]:
    """The try-it-here setup used when no config file is given (README, quick start)."""
    from gateway.adapters import load_channel_types

    types = load_channel_types()
    adapters: dict[str, Any] = {}
    if "smtp" in types:
        adapters["mailbox"] = {"type": "smtp", "listen": "127.0.0.1:2525", "domains": ["localhost"]}
    if "asterisk" in types:
        adapters["asterisk"] = {"type": "asterisk", "agi_listen": "127.0.0.1:4573"}
    return {
        "gateway": {"data_dir": "var"},
        "api": {"open_to_loopback": True},
        "adapters": adapters,
    }


def load_settings(
    path: str | None,
    *,
    secrets: Collection[str] | None = None,
    worker: WorkerRole | None = None,
) -> tuple[Settings, dict[str, Any]]:
    """Load ``path``, or the built-in defaults when None; ``secrets``: see ``parse_settings``;
    a ``worker`` listens on the addresses its parent bound (``WorkerRole.apply``)."""
    raw = read_file(path) if path else default_raw_config()
    if worker is not None:
        raw = worker.apply(raw)
    return parse_settings(raw, path or "<defaults>", secrets=secrets)


def load_for_tool(path: str | None, *sections: str) -> Settings:
    """Settings for a read-only command: only [redis]'s secrets (and ``sections``') are read,
    adapter tables are not built, so it runs without the adapters' secrets in the environment."""
    settings, _ = load_settings(path, secrets=TOOL_SECRETS | set(sections))
    return settings


# ------------------------------------------------------------------ serve


async def _serve(
    settings: Settings, adapter_configs: dict[str, Any], worker: WorkerRole | None = None
) -> int:
    from gateway.server.runtime import Gateway, settle_heap

    gateway = Gateway(settings, adapter_configs, worker=worker)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    settle_heap()
    if worker is not None:
        worker.announce_ready()
    else:
        print(
            f"gateway {__version__} listening: "
            f"http://{settings.http.listen.host}:{gateway.http_port} (Ctrl-C to stop)",
            file=sys.stderr,
        )
    try:
        await stop.wait()
    finally:
        await gateway.stop()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    worker = WorkerRole.from_env()  # set by the parent of `serve --workers N`, for its workers
    if worker is not None:
        from gateway.server import listeners

        die_with_parent(worker.parent)
        listeners.adopt(worker.sockets)
    with deprecations() as notes:
        settings, adapter_configs = load_settings(args.config, worker=worker)
    setup_logging(
        settings.gateway.log_format,
        settings.gateway.log_level,
        worker=None if worker is None else worker.slot,
    )
    if worker is None:  # the parent (or single process) says it once, not once per worker
        for note in notes:
            logging.getLogger("gateway.server.config").warning("config: %s", note)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    count = 1 if worker is not None else default_count(args.workers or settings.gateway.workers)
    if count > 1:
        return int(runner(serve_workers(args.config, settings, count)))
    return int(runner(_serve(settings, adapter_configs, worker)))


# ------------------------------------------------------------------ redis for the tools


def _print_contact(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(orjson.dumps(data).decode() + "\n")
    else:
        sender = data.get("sender") or {}
        text = (data.get("subject") or data.get("text") or "").replace("\n", " ")
        sys.stdout.write(
            f"{data.get('received_at')}  {data.get('channel', ''):5}  {data.get('id')}  "
            f"{sender.get('address') or '-'}  {text[:80]}\n"
        )
    sys.stdout.flush()


async def _tail(settings: Settings, count: int, follow: bool, as_json: bool) -> int:
    async with open_queue(settings) as (client, keys, _):
        entries = await client.xrevrange(keys.contacts, count=count)
        last = "$"
        for entry_id, fields in reversed(entries):
            _print_contact(decode_fields(fields), as_json)
            last = entry_id
        if entries:
            last = entries[0][0]
        while follow:
            reply = await client.xread({keys.contacts: last}, block=1000, count=100)
            for _, items in reply or []:
                for entry_id, fields in items:
                    _print_contact(decode_fields(fields), as_json)
                    last = entry_id
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    settings = load_for_tool(args.config)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(_tail(settings, args.count, args.follow, args.json))
    return 0


# ------------------------------------------------------------------ check-config, info


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exactly the validation ``serve`` runs (``load_settings``), adapter types' rules included."""
    with deprecations() as notes:
        try:
            _, adapters = load_settings(str(args.file))
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"{args.file}: OK ({len(adapters)} adapters: {', '.join(adapters) or 'none'})")
    return 0


async def _info(settings: Settings) -> dict[str, Any]:
    keys = Keys(settings.redis.prefix)
    info: dict[str, Any] = {
        "gateway": __version__,
        "python": platform.python_version(),
        "config": settings.source,
        "data_dir": str(settings.gateway.data_dir.resolve()),
        "redis": {
            "url": redact_url(settings.redis.url) or "embedded",
            "keys": {"contacts": keys.contacts, "events": keys.events, "replies": keys.replies},
        },
        "listeners": {_listener_name(path): str(at) for path, at in listener_addresses(settings)},
        "adapters": {name: table.get("type") for name, table in settings.adapters.items()},
    }
    try:
        async with open_queue(settings) as (client, _, url):
            server = await client.info("server")
            info["redis"]["url"] = redact_url(url)
            info["redis"]["server"] = server.get("valkey_version") or server.get("redis_version")
            info["redis"]["contacts"] = await client.xlen(keys.contacts)
            info["streams"] = {
                name: await _stream_info(client, key)
                for name, key in (("contacts", keys.contacts), ("events", keys.events))
            }
            info["replies"] = {q.adapter: q.to_dict() for q in await reply_queues(client, keys)}
    except Exception as exc:
        info["redis"]["error"] = str(exc)
    return info


async def _stream_info(client: Any, key: str) -> dict[str, Any]:
    """Length and consumer groups of a stream: what each group has still to read or ack."""
    groups: dict[str, Any] = {}
    with contextlib.suppress(Exception):  # no stream yet
        for g in await client.xinfo_groups(key):
            name = g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
            groups[name] = {"pending": int(g["pending"]), "lag": g.get("lag")}
    return {"length": int(await client.xlen(key)), "groups": groups}


def _listener_name(path: tuple[str, ...]) -> str:
    """"http", "http.metrics_listen", "<adapter>.<key>"."""
    if path == ("http", "listen"):
        return "http"
    return ".".join(path[1:] if path[0] == "adapters" else path)


def redact_url(url: str) -> str:
    """The URL without its password (``redis://user:***@host``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def cmd_info(args: argparse.Namespace) -> int:
    settings = load_for_tool(args.config)
    info = asyncio.run(_info(settings))
    sys.stdout.write(orjson.dumps(info, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def run_classic_agi(arguments: list[str]) -> int:
    """``gateway agi``: the classic AGI script; its options go to it untouched."""
    import importlib

    classic = importlib.import_module("gateway.channels.voice.classic")
    return int(classic.main(arguments))


def cmd_report(args: argparse.Namespace) -> int:
    from gateway.cases.report import main as report_main

    settings = load_for_tool(args.config)
    return int(report_main(settings, args))


def cmd_deadletter(args: argparse.Namespace) -> int:
    from gateway.cases.push.deadletter import main as deadletter_main

    # listing needs Redis only; a replay signs its POSTs with the subscriber's secret
    settings = load_for_tool(args.config, *(["push"] if args.replay else []))
    return int(deadletter_main(settings, args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run every configured adapter")
    p.add_argument("-c", "--config", help="TOML config file (default: built-in loopback setup)")
    p.add_argument(
        "--workers",
        type=int,
        help="worker processes sharing the listeners (default: [gateway] workers, else one per"
        " core; 1: a single process)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tail", help="print contacts from the stream")
    p.add_argument("-c", "--config")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", type=int, default=10, help="how many recent contacts (default 10)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new contacts")
    p.set_defaults(func=cmd_tail)

    p = sub.add_parser("report", help="service levels per channel")
    p.add_argument("-c", "--config")
    p.add_argument("--since", default="24h", help="window, e.g. 24h, 7d (default 24h)")
    p.add_argument("--by", choices=["channel", "hour"], default="channel")
    p.add_argument("--format", choices=["table", "json", "csv", "html"], default="table")
    p.add_argument(
        "--lang", choices=["zh", "en"], help="table and html language (default: config, LANG)"
    )
    p.add_argument("--tz", help="time zone of the table and html (default: dashboard.timezone)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("deadletter", help="list push dead letters, or replay them")
    p.add_argument("-c", "--config")
    p.add_argument("--replay", metavar="SUBSCRIBER", help="POST this subscriber's again")
    p.add_argument("--count", type=int, default=1000, help="replay at most this many")
    p.set_defaults(func=cmd_deadletter)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("info", help="where the queue is, listeners, versions")
    p.add_argument("-c", "--config")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("agi", help="classic AGI script (run by Asterisk over stdin/stdout)")
    p.add_argument("agi_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: run_classic_agi(a.agi_args))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gateway`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["agi"]:  # before argparse, which would refuse the script's options
        return run_classic_agi(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
        return int(args.func(args))
    except (ConfigError, DataDirBusy, SpoolError, EmbeddedRedisError, UnsafePermissions) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
