"""Configuration: one TOML file, validated on load; every error names its key.

Each section is a frozen dataclass. ``load_table`` fills one from a TOML table by the
dataclass's own field types, rejects unknown keys, and reads ``Secret`` fields from
``<key>``, ``<key>_env`` (an environment variable) or ``<key>_file`` (a file).
Adapters declare their config the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

from gateway.contact.clock import check_timezone

T = TypeVar("T")

log = logging.getLogger(__name__)


class ConfigError(Exception):
    """One or more configuration errors, each ``(key, message)``."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "") -> None:
        self.errors = errors
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(f"{prefix}{key}: {msg}" for key, msg in errors))


KNOWN_SECRETS: set[str] = set()
"""Every secret value loaded, so the log filter can redact it wherever it appears
(a third-party library logging a URL with a bot token in it, for instance)."""


class Secret:
    """A secret value that never prints itself, and is redacted from every log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= 4:  # shorter ones would redact ordinary words
            KNOWN_SECRETS.add(value)

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class Duration(float):
    """Seconds; in TOML ``"15s"``, ``"3m"``, ``"24h"``, ``"7d"``, ``"250ms"`` or a number."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: object) -> Duration:
    """Parse a duration; raise ValueError with a readable message."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "15s", "3m", "24h"')
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return Duration(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return Duration(float(m.group(1)) * _UNITS[m.group(2)])
    raise ValueError(f'expected a duration such as "15s", "3m", "24h", got {value!r}')


@dataclass(frozen=True, slots=True)
class HostPort:
    """A listen or connect address, written ``"host:port"`` (``[::1]:port`` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(value: object) -> HostPort:
    """Parse ``host:port``."""
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {value!r}')
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'expected "host:port", got {value!r}')
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":port" means every interface
    return HostPort(host, int(port))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, errors: list[tuple[str, str]]) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _convert(args[0], value, key, errors)
        for arg in args:
            sub: list[tuple[str, str]] = []
            result = _convert(arg, value, key, sub)
            if not sub:
                return result
        errors.append((key, f"expected one of {', '.join(_type_name(a) for a in args)}"))
        return None
    if origin is typing.Literal:
        choices = get_args(tp)
        if value not in choices:
            errors.append(
                (key, f"expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            errors.append((key, f"expected a list, got {type(value).__name__}"))
            return ()
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            errors.append((key, f"expected a table, got {type(value).__name__}"))
            return {}
        kv = get_args(tp)
        if len(kv) == 2:
            return {str(k): _convert(kv[1], v, f"{key}.{k}", errors) for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is Duration:
        try:
            return parse_duration(value)
        except ValueError as exc:
            errors.append((key, str(exc)))
            return Duration(0)
    if tp is HostPort:
        try:
            return parse_host_port(value)
        except ValueError as exc:
            errors.append((key, str(exc)))
            return HostPort("127.0.0.1", 0)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            errors.append((key, f"expected a table, got {type(value).__name__}"))
            return None
        return _load(tp, value, key, errors)
    if tp is Secret:
        if not isinstance(value, str):
            errors.append((key, "expected a string"))
            return Secret("")
        return Secret(value)
    if tp is Path:
        if not isinstance(value, str):
            errors.append((key, "expected a path string"))
            return Path()
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append((key, f"expected true or false, got {value!r}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append((key, f"expected an integer, got {value!r}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append((key, f"expected a number, got {value!r}"))
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append((key, f"expected a string, got {type(value).__name__}"))
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")


_SECRET_SECTIONS: ContextVar[frozenset[str] | None] = ContextVar("_SECRET_SECTIONS", default=None)
"""Top-level sections whose secrets are read (None: all). The read-only commands read only
``[redis]``'s, so they run without the adapters' secrets in the environment."""


def _read_secret(
    raw: Mapping[str, Any], name: str, key: str, errors: list[tuple[str, str]]
) -> Secret | None:
    sections = _SECRET_SECTIONS.get()
    if sections is not None and key.split(".", 1)[0] not in sections:
        given = any(k in raw for k in (name, f"{name}_env", f"{name}_file"))
        return Secret("") if given else None  # present, not read: a placeholder
    if name in raw:
        value = raw[name]
        if not isinstance(value, str):
            errors.append((key, "expected a string"))
            return Secret("")
        return Secret(value)
    env_key = f"{name}_env"
    if env_key in raw:
        var = raw[env_key]
        if not isinstance(var, str) or var not in os.environ:
            errors.append((f"{key}_env", f"environment variable {var!r} is not set"))
            return Secret("")
        return Secret(os.environ[var])
    file_key = f"{name}_file"
    if file_key in raw:
        try:
            return Secret(Path(str(raw[file_key])).read_text(encoding="utf-8").strip())
        except OSError as exc:
            errors.append((f"{key}_file", f"cannot read secret file: {exc.strerror}"))
            return Secret("")
    return None


RENAMED: dict[str, str] = {"default_region": "region", "phone_region": "region"}
"""Old key -> its name now, in any table whose dataclass has the new key: the old one is still
accepted, with a warning (logged; ``check-config`` prints it), and both at once are an error."""

_DEPRECATED: ContextVar[list[str] | None] = ContextVar("_DEPRECATED", default=None)


@contextlib.contextmanager
def deprecations() -> Iterator[list[str]]:
    """Collect the deprecation warnings of the configs loaded inside (instead of logging them)."""
    notes: list[str] = []
    token = _DEPRECATED.set(notes)
    try:
        yield notes
    finally:
        _DEPRECATED.reset(token)


def _renamed(cls: type[T], raw: Mapping[str, Any], prefix: str,
             errors: list[tuple[str, str]]) -> Mapping[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    out: dict[str, Any] | None = None
    for old, new in RENAMED.items():
        if old not in raw or old in names or new not in names:
            continue
        key = f"{prefix}.{old}" if prefix else old
        out = dict(raw) if out is None else out
        value = out.pop(old)
        if new in raw:
            errors.append((key, f"renamed to {new!r}: set only {new}"))
            continue
        note = f"{key}: deprecated, the key is now {new!r} (same meaning)"
        notes = _DEPRECATED.get()
        if notes is None:
            log.warning("config: %s", note)
        else:
            notes.append(note)
        out[new] = value
    return raw if out is None else out


def _load(cls: type[T], raw: Mapping[str, Any], prefix: str, errors: list[tuple[str, str]]) -> T:
    raw = _renamed(cls, raw, prefix, errors)
    hints = get_type_hints(cls)
    known: set[str] = set()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        known.add(f.name)
        is_secret = tp is Secret or (
            get_origin(tp) in (typing.Union, types.UnionType) and Secret in get_args(tp)
        )
        if is_secret:
            known.update((f"{f.name}_env", f"{f.name}_file"))
            secret = _read_secret(raw, f.name, key, errors)
            if secret is not None:
                values[f.name] = secret
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append((key, f"required (set {f.name}, {f.name}_env or {f.name}_file)"))
            continue
        if f.name in raw:
            values[f.name] = _convert(tp, raw[f.name], key, errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append((key, "required"))
    for k in raw:
        if k not in known:
            errors.append((f"{prefix}.{k}" if prefix else k, "unknown key"))
    try:
        return cls(**values)
    except TypeError:  # a required field was missing: already reported
        return None  # type: ignore[return-value]


def load_table(cls: type[T], raw: Mapping[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a TOML table; raise ``ConfigError`` listing every error."""
    errors: list[tuple[str, str]] = []
    result = _load(cls, raw, prefix, errors)
    if errors:
        raise ConfigError(errors)
    return result


# ---------------------------------------------------------------- core sections


@dataclass(frozen=True, slots=True)
class GatewaySection:
    data_dir: Path = Path("var")
    instance: str = ""
    """Name of this gateway instance in events and consumer names; default: host name."""
    log_format: typing.Literal["plain", "json"] = "plain"
    log_level: str = "INFO"
    workers: int = 0
    """Worker processes of ``gateway serve`` (``--workers``); 0: one per core, 1: one process
    (gateway/server/workers.py)."""
    permissions: typing.Literal["warn", "refuse"] = "warn"
    """The data folder (0700) and its spool and Redis files (0600) found wider at start-up:
    log a warning, or refuse to start (gateway/server/permissions.py)."""


@dataclass(frozen=True, slots=True)
class SentinelSection:
    hosts: tuple[HostPort, ...] = ()
    master: str = "mymaster"
    password: Secret | None = None


@dataclass(frozen=True, slots=True)
class RedisSection:
    url: str = ""
    """Empty: start the embedded server. Otherwise redis://, rediss:// or unix://."""
    prefix: str = "gateway"
    cluster: bool = False
    sentinel: SentinelSection | None = None
    password: Secret | None = None
    server_binary: str = ""
    """Embedded mode: a redis-server or valkey-server to run instead of the bundled Valkey."""
    write_timeout: Duration = Duration(1.0)
    """A batch not written within this bound goes to the spool instead."""
    max_batch: int = 256
    """Contacts written per pipelined round trip (1 turns coalescing off)."""
    min_replicas: int = 0
    """With Sentinel or replicas: a batch counts as written only once this many replicas have
    it (``WAIT``); otherwise it is spooled and replayed, so a failover loses nothing."""
    stream_maxlen: int = 1_000_000
    """Entries each stream keeps (history for ``gateway report``, ``tail``); older ones go once
    every consumer group has read and acknowledged them, never before
    (``gateway/queueing/backlog.py``)."""
    stream_retention: Duration = Duration(0)
    """Off (0) by default. Otherwise entries older than this leave the streams even if a
    group has not read them: an explicit retention the operator chose."""
    trim_interval: Duration = Duration(5)
    """How often each instance trims the streams and measures the backlog."""
    backlog_warning: int = 100_000
    """Entries kept for the slowest consumer group beyond which metrics, a WARNING log and
    ``/readyz`` say so (0: off)."""
    backlog_limit: int = 5_000_000
    """Beyond this backlog new contacts are refused the protocol's retry-later way (0: off)."""
    memory_limit: float = 0.9
    """Refuse new contacts once Redis uses this fraction of its ``maxmemory`` (when set)."""
    retention: Duration = Duration(35 * 86400)
    """How long a contact stays retrievable by id (reply routing, API)."""


@dataclass(frozen=True, slots=True)
class HttpSection:
    listen: HostPort = HostPort("127.0.0.1", 8080)
    max_body: int = 1 << 20
    """Bytes; larger request bodies get 413 (adapters may set their own bound)."""
    public_url: str = ""
    """Externally visible base URL (webhook registration, signature checks)."""
    metrics_listen: HostPort | None = None
    """Serve ``/metrics`` (and ``/healthz``, ``/readyz``) on a listener of its own instead of
    ``listen``, e.g. ``127.0.0.1:9108`` when ``listen`` faces the Internet for webhooks."""
    metrics_token: Secret | None = None
    """When set, ``/metrics`` wants ``Authorization: Bearer <token>`` (Prometheus'
    ``authorization`` / ``bearer_token_file``)."""
    fast_intake: bool = True
    """Answer a plain ``POST /v1/intake`` from the connection without aiohttp
    (``gateway/server/fastpost.py``); false: aiohttp answers every request."""


@dataclass(frozen=True, slots=True)
class EgressSection:
    """How the gateway reaches providers (gateway/server/egress.py)."""

    proxy: str = ""
    """``http://proxy:3128``: provider calls go through it; empty: the environment's
    ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY`` apply (as they do anyway)."""
    no_proxy: tuple[str, ...] = ("localhost", "127.0.0.0/8", "::1")
    """Hosts reached directly despite ``proxy``: names, ``.domain`` suffixes, addresses and
    networks."""


@dataclass(frozen=True, slots=True)
class SlaSection:
    deadlines: Mapping[str, Duration] = field(default_factory=dict)
    """Deadlines by policy (``sms_response``...), over the defaults the media declare (GB/T
    33358-2016 for the built-in five). Written ``[sla] sms_response = "3m"``: every key of
    ``[sla]`` that is a registered medium's deadline policy lands here."""
    warning_fraction: float = 0.8
    connection_target: float = 0.95
    short_abandon: Duration = Duration(0)
    """Abandons shorter than this are left out of the voice connection rate (default: none)."""


@dataclass(frozen=True, slots=True)
class IntakeSection:
    dedupe_window: Duration = Duration(7 * 86400)
    repeat_window: Duration = Duration(30 * 86400)
    max_attachment: int = 25 * 1024 * 1024


Scope = typing.Literal["intake", "read", "reply", "admin"]
"""intake: POST /v1/intake; read: consumer API reads, acks, reports; reply: replies and events;
admin: dead letters (and everything read and reply may do)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: Secret
    name: str = ""
    scopes: tuple[Scope, ...] = ("intake",)


@dataclass(frozen=True, slots=True)
class ApiSection:
    keys: tuple[ApiKey, ...] = ()
    open_to_loopback: bool = False
    """Allow ``POST /v1/intake`` without a key from 127.0.0.1 / ::1 (the no-config default)."""
    region: str = "CN"
    """Region for phone senders without a country code (sms and voice contacts: E.164);
    ``default_region`` is its old name."""


@dataclass(frozen=True, slots=True)
class RepliesSection:
    max_attempts: int = 5
    backoff: Duration = Duration(2)
    reclaim_after: Duration = Duration(60)
    """A reply held this long by an instance that stopped answering is taken over by another
    instance running the same adapter (a live sender keeps its replies held)."""


@dataclass(frozen=True, slots=True)
class PushSubscriber:
    """A case system that takes contacts (and optionally events) by signed webhook."""

    name: str
    url: str
    secret: Secret
    events: bool = False
    max_attempts: int = 8
    """Tries before an entry is parked in ``{prefix}:deadletter:<name>``."""
    backoff: Duration = Duration(1)
    max_backoff: Duration = Duration(300)
    timeout: Duration = Duration(10)


@dataclass(frozen=True, slots=True)
class PushSection:
    subscribers: tuple[PushSubscriber, ...] = ()


@dataclass(frozen=True, slots=True)
class WatcherSection:
    enabled: bool = True
    interval: Duration = Duration(0.25)
    """Longest sleep between two looks at the deadline and warning sets."""


@dataclass(frozen=True, slots=True)
class FleetSection:
    """Several instances on one Redis: what runs once per fleet runs under a lease."""

    lease_ttl: Duration = Duration(10)
    """A lease's time to live: its holder renews every third of it, and a holder that dies is
    replaced about this long after its last renewal (see docs/reliability.md)."""


@dataclass(frozen=True, slots=True)
class DashboardSection:
    enabled: bool = True
    window: Duration = Duration(86400)
    refresh: Duration = Duration(5)
    language: typing.Literal["auto", "zh", "en"] = "auto"
    """The dashboard's and ``gateway report``'s language; auto: the browser's (else Chinese)."""
    timezone: str = "Asia/Shanghai"
    """Times shown to supervisors, and where the calendar day starts."""


@dataclass(frozen=True, slots=True)
class LimitsSection:
    """Bounds against hostile peers and clumsy integrators (docs/reliability.md)."""

    sender_contacts: int = 30
    """New contacts one sender address may make per ``sender_window`` (0: no limit); counted
    in Redis for the whole fleet. A peer's retry of the same contact is not counted. A channel
    type may raise it for its adapters (chat: 120), an adapter's ``sender_contacts`` sets its
    own (docs/reliability.md: the defaults per medium)."""
    sender_window: Duration = Duration(60)
    sender_exempt: tuple[str, ...] = ()
    """Sender addresses never limited per sender, as written in contacts (``+8610...``,
    ``alerts@relay.example``): a shared sender, such as a company's SMS gateway number or an
    e-mail relay, speaking for many citizens. The adapter limit still applies."""
    adapter_contacts: int = 0
    """New contacts one adapter may take per ``adapter_window`` (0: no limit)."""
    adapter_window: Duration = Duration(1)
    json_depth: int = 32
    """Nesting of arrays and objects in any JSON a peer sends (deeper: 400)."""
    json_string: int = 1 << 20
    """Characters in one JSON string a peer sends (longer: 400)."""
    header_timeout: Duration = Duration(10)
    """HTTP: a request's head must arrive within this (slow-loris: the connection is closed)."""
    body_timeout: Duration = Duration(30)
    """HTTP: while a request body is incomplete, the longest silence from the client."""
    keepalive_timeout: Duration = Duration(30)
    """HTTP: an idle keep-alive connection is closed after this."""
    max_connections: int = 0
    """Open connections per listener (HTTP, SMTP); further ones are closed at once. 0: a
    quarter of the process's open-file limit (RLIMIT_NOFILE), at most 4096."""
    in_flight: int = 1000
    """Contacts one process (each worker) holds in flight, from submit to answer; further
    ones are refused at once, the protocol's retry-later way (HTTP 503 + Retry-After, SMTP
    451, AGI fail path), before they are parsed (``gateway/server/admission.py``). 0: no
    bound."""
    loop_lag: Duration = Duration(0.25)
    """While a process's event loop runs this late (measured every 50 ms; late at two probes
    in a row: CPU overload, more offered than its core can take), new contacts are refused
    the same way. 0: not measured."""


@dataclass(frozen=True, slots=True)
class SurgeSection:
    """Surge warning (实时舆情预警, ``gateway/cases/surge.py``): contacts well above their usual
    level."""

    enabled: bool = True
    window: Duration = Duration(600)
    """Contacts are counted over this window (whole minutes)."""
    recent: Duration = Duration(3600)
    """The usual level is at least the rate of this span before the window."""
    history_days: int = 7
    """... and at least the mean of the same window on this many past days."""
    min_rate: float = 0.1
    """... and at least this many contacts a minute."""
    min_count: int = 10
    ratio: float = 2.0
    alpha: float = 1e-6
    """A surge: at least min_count, ratio times the usual level, Poisson tail below alpha."""
    interval: Duration = Duration(5)
    warmup: Duration = Duration(3600)
    """No surge until the counters span this long (a new gateway knows no usual level)."""
    topics: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {
            "停水": ("停水", "没水", "断水", "水压低"),
            "停电": ("停电", "断电", "没电", "跳闸"),
            "燃气": ("燃气", "煤气", "天然气", "漏气"),
        }
    )
    districts: tuple[str, ...] = ()
    """District (or street, estate) names to look for in text and addresses."""
    grid: float = 0.01
    """Grid of locations, in degrees (0.01: about 1 km)."""
    sensitive: tuple[str, ...] = ()
    """Sensitive words: any contact with one raises a surge of its word."""
    repeat: int = 3
    """A citizen's contact number ``repeat`` within the repeat window raises one (0: off)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The whole validated configuration."""

    gateway: GatewaySection = field(default_factory=GatewaySection)
    redis: RedisSection = field(default_factory=RedisSection)
    http: HttpSection = field(default_factory=HttpSection)
    sla: SlaSection = field(default_factory=SlaSection)
    intake: IntakeSection = field(default_factory=IntakeSection)
    api: ApiSection = field(default_factory=ApiSection)
    replies: RepliesSection = field(default_factory=RepliesSection)
    push: PushSection = field(default_factory=PushSection)
    watcher: WatcherSection = field(default_factory=WatcherSection)
    dashboard: DashboardSection = field(default_factory=DashboardSection)
    surge: SurgeSection = field(default_factory=SurgeSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    fleet: FleetSection = field(default_factory=FleetSection)
    egress: EgressSection = field(default_factory=EgressSection)
    adapters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Raw adapter tables; each is validated by its channel type's own config class."""
    source: str = ""


@dataclass(frozen=True, slots=True)
class SendRateTable:
    """Keys every ``[adapters.NAME]`` table may carry, whatever its type: send rates
    (``server/egress.py``) and the per-sender intake limit."""

    send_rate: float | None = None
    """Replies a second through this adapter (per instance); default: the channel type's."""
    send_burst: int | None = None
    send_rate_per_recipient: float | None = None


    sender_contacts: int | None = None
    """New contacts one sender may make through this adapter per ``[limits] sender_window``
    (0: no limit); default: ``[limits] sender_contacts``, raised to the channel type's floor."""


SEND_RATE_KEYS = ("send_rate", "send_burst", "send_rate_per_recipient", "sender_contacts")


@dataclass(frozen=True, slots=True)
class AdapterGateway:
    data_dir: Path
    instance: str


@dataclass(frozen=True, slots=True)
class AdapterHttp:
    public_url: str
    max_body: int


@dataclass(frozen=True, slots=True)
class AdapterSettings:
    """What an adapter may read of the gateway's configuration (``AdapterContext.settings``):
    no secret of the core or of any other adapter, only what adapters need (its own table is
    its config object). A test walks it and fails on any ``Secret``."""

    gateway: AdapterGateway
    http: AdapterHttp
    sla: SlaSection
    intake: IntakeSection
    egress: EgressSection
    limits: LimitsSection = field(default_factory=LimitsSection)
    """Listeners of their own (SMTP) bound their connections with ``max_connections``."""
    region: str = "CN"

    @classmethod
    def of(cls, settings: Settings) -> AdapterSettings:
        return cls(
            gateway=AdapterGateway(settings.gateway.data_dir, settings.gateway.instance),
            http=AdapterHttp(settings.http.public_url, settings.http.max_body),
            sla=settings.sla,
            intake=settings.intake,
            egress=settings.egress,
            limits=settings.limits,
            region=settings.api.region,
        )


TOOL_SECRETS: frozenset[str] = frozenset({"redis"})
"""The secrets the read-only commands (tail, report, info, deadletter listing) read."""


def parse_settings(
    raw: Mapping[str, Any], source: str = "", *, secrets: Collection[str] | None = None
) -> tuple[Settings, dict[str, Any]]:
    """Validate the core sections and every adapter table; return settings and adapter configs.

    This is the one validation: ``serve`` and ``check-config`` both run it, each adapter
    type's own rules included (``ChannelType.check``), so a config ``check-config`` passes is
    one ``serve`` starts with. With ``secrets`` (top-level section names) only those sections'
    secrets are read, and adapter tables are checked only for a known ``type`` and kept raw
    (no configs are returned): the read-only commands need nothing but Redis.
    """
    from gateway.adapters import load_channel_types

    token = _SECRET_SECTIONS.set(None if secrets is None else frozenset(secrets))
    try:
        errors: list[tuple[str, str]] = []
        core = {k: v for k, v in raw.items() if k != "adapters"}
        if isinstance(core.get("sla"), dict):
            core["sla"] = _sla_table(core["sla"])
        settings = _load(Settings, core, "", errors)
        errors = [(_sla_key(key), message) for key, message in errors]
        _check_timezone(settings, errors)
        adapters_raw = raw.get("adapters", {})
        adapter_configs: dict[str, Any] = {}
        if not isinstance(adapters_raw, dict):
            errors.append(("adapters", "expected a table of adapter tables"))
            adapters_raw = {}
        channel_types = load_channel_types()
        # an adapter type's own rules read the core settings: only once those are valid
        view = AdapterSettings.of(settings) if settings is not None and not errors else None
        for name, table in adapters_raw.items():
            key = f"adapters.{name}"
            if not isinstance(table, dict):
                errors.append((key, "expected a table"))
                continue
            type_name = table.get("type")
            if type_name not in channel_types:
                known = ", ".join(sorted(channel_types)) or "none"
                errors.append(
                    (f"{key}.type", f"unknown adapter type {type_name!r} (known: {known})")
                )
                continue
            if secrets is not None:
                continue
            channel_type = channel_types[type_name]
            body = {k: v for k, v in table.items() if k != "type" and k not in SEND_RATE_KEYS}
            _load(SendRateTable, {k: table[k] for k in SEND_RATE_KEYS if k in table}, key, errors)
            before = len(errors)
            config = _load(channel_type.config, body, key, errors)
            if len(errors) == before and channel_type.check is not None and view is not None:
                try:
                    channel_type.check(config, key, view)  # rules types cannot express
                except ConfigError as exc:
                    errors.extend(exc.errors)
            adapter_configs[name] = config
    finally:
        _SECRET_SECTIONS.reset(token)
    if errors:
        raise ConfigError(errors, source)
    settings = dataclasses.replace(
        settings, adapters={k: dict(v) for k, v in adapters_raw.items()}, source=source
    )
    return settings, adapter_configs


AdapterCheck = Callable[[Any, str, AdapterSettings], None]
"""``check(config, key, settings)``: raise ConfigError naming ``key.<field>`` for what a channel
type's config fields cannot express (see ``ChannelType.check``)."""


def _sla_table(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``[sla]`` with the registered media's deadline policies gathered under ``deadlines``."""
    from gateway.adapters import load_media

    policies = load_media().rules
    table = {k: v for k, v in raw.items() if k not in policies}
    deadlines = {k: v for k, v in raw.items() if k in policies}
    if deadlines:
        table["deadlines"] = {**table.get("deadlines", {}), **deadlines}
    return table


def _sla_key(key: str) -> str:
    """A deadline's error names the key as written: ``sla.sms_response``."""
    return "sla." + key.removeprefix("sla.deadlines.") if key.startswith("sla.deadlines.") else key


def _check_timezone(settings: Settings | None, errors: list[tuple[str, str]]) -> None:
    if settings is not None and settings.dashboard is not None:
        try:
            check_timezone(settings.dashboard.timezone)
        except ValueError as exc:
            errors.append(("dashboard.timezone", str(exc)))


def load_file(
    path: str | Path, *, secrets: Collection[str] | None = None
) -> tuple[Settings, dict[str, Any]]:
    """Read and validate a TOML config file (``secrets``: see ``parse_settings``)."""
    return parse_settings(read_file(path), str(path), secrets=secrets)


def read_file(path: str | Path) -> dict[str, Any]:
    """A TOML config file as a table, not yet validated; ConfigError if it cannot be read."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([("", f"cannot read: {exc.strerror}")], str(p)) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"invalid TOML: {exc}")], str(p)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([("", "not UTF-8")], str(p)) from exc
    return raw
