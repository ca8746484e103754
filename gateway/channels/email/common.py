"""Configuration of the ``smtp`` channel type (``[adapters.NAME]`` with ``type = "smtp"``)."""

from __future__ import annotations

import codecs
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from gateway.server.config import ConfigError, Duration, HostPort, Secret


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """The SMTP relay that carries replies and acknowledgements out."""

    host: str = ""
    """Empty: no outbound mail (replies fail with a permanent error)."""
    port: int = 587
    tls: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: Secret | None = None
    ca_file: Path | None = None
    """Trust this CA bundle for the relay's certificate instead of the system store."""
    validate_certs: bool = True
    timeout: Duration = Duration(30)
    attempts: int = 3
    """Tries per send while the relay answers 4xx or cannot be reached."""
    backoff: Duration = Duration(1)
    """First wait between tries; doubles each time."""
    helo: str = ""


@dataclass(frozen=True, slots=True)
class AckConfig:
    """The automatic acknowledgement.

    Templates take ``$reference`` (the contact id's last 10 hex digits, as quoted by the SMS
    channel), ``$contact_id``, ``$subject``, ``$mailbox`` and ``$due`` (the response deadline).
    """

    enabled: bool = False
    subject: str = "Re: $subject [$reference]"
    text: str = (
        "您的来信已收到，编号 $reference。我们将在 $due 前答复。\n"
        "Your message has been received, reference $reference. We will answer by $due.\n"
    )
    per_sender_limit: int = 3
    """At most this many acknowledgements to one address per ``per_sender_window``."""
    per_sender_window: Duration = Duration(3600)
    timezone: str = "UTC"
    """Zone in which ``$due`` is written, e.g. ``Asia/Shanghai``."""


@dataclass(frozen=True, slots=True)
class EmailConfig:
    """``[adapters.NAME]`` with ``type = "smtp"``."""

    listen: HostPort = HostPort("127.0.0.1", 2525)
    hostname: str = ""
    """Name in the banner and EHLO answer; default: the host's FQDN."""
    mailboxes: tuple[str, ...] = ()
    """Addresses accepted (``local+tag@domain`` is accepted for ``local@domain``)."""
    domains: tuple[str, ...] = ()
    """Domains whose every address is accepted."""
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 50
    max_line_length: int = 8192
    """Octets per line; RFC 5321 says 1000, real mailers send longer lines."""
    idle_timeout: Duration = Duration(300)
    max_session_time: Duration = Duration(1800)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_tls: bool = False
    regional_fallback: str = "gb18030"
    """Charset tried after UTF-8 for undeclared 8-bit text (cp1252 for Western mail)."""
    max_text_chars: int = 500_000
    reply_from: str = ""
    """From of replies, e.g. ``"市长信箱 <12345@hotline.example.gov.cn>"``; default: mailbox."""
    reply_subject: str = "Re: $subject"
    relay: RelayConfig = field(default_factory=RelayConfig)
    ack: AckConfig = field(default_factory=AckConfig)

    def check(self, key: str) -> None:
        """Raise ConfigError for values the loader's types cannot rule out."""
        errors: list[tuple[str, str]] = []
        if not self.mailboxes and not self.domains:
            errors.append((f"{key}.mailboxes", "set mailboxes or domains (never an open relay)"))
        for i, box in enumerate(self.mailboxes):
            if box.count("@") != 1 or box.startswith("@") or box.endswith("@"):
                errors.append((f"{key}.mailboxes[{i}]", f"not an address: {box!r}"))
        try:
            codecs.lookup(self.regional_fallback)
        except LookupError:
            errors.append(
                (f"{key}.regional_fallback", f"unknown charset {self.regional_fallback!r}")
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            errors.append((f"{key}.tls_cert", "set both tls_cert and tls_key"))
        if self.require_tls and self.tls_cert is None:
            errors.append((f"{key}.require_tls", "needs tls_cert and tls_key"))
        if self.max_message_size <= 0 or self.max_recipients <= 0 or self.max_line_length < 1000:
            errors.append((key, "max_message_size, max_recipients > 0; max_line_length >= 1000"))
        try:
            zoneinfo.ZoneInfo(self.ack.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            errors.append((f"{key}.ack.timezone", f"unknown time zone {self.ack.timezone!r}"))
        if self.ack.enabled and not self.relay.host:
            errors.append((f"{key}.ack.enabled", "acknowledgements need relay.host"))
        if errors:
            raise ConfigError(errors)
