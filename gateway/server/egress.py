"""Outbound HTTP: one factory for every provider client (proxy, user agent) and send rates.

Every adapter that calls a provider (Kannel sendsms, Twilio, the generic SMS webhook, WeChat,
Weibo, Telegram) and the push webhooks get their HTTP client here, so one place decides how the
gateway reaches the outside:

- the standard proxy variables ``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``
  are honoured (aiohttp ``trust_env``; python-telegram-bot's httpx does the same);
- ``[egress] proxy`` sends provider calls through a proxy without touching the environment,
  except to hosts in ``[egress] no_proxy`` (names, ``.suffix`` domains, addresses or networks).

``SendLimiter`` spaces replies per adapter: ``send_rate`` per second overall (a token bucket of
``send_burst``) and ``send_rate_per_recipient`` per citizen address; channel types declare their
provider's documented limits as defaults (Telegram: 30 messages a second per bot, one a second
per chat). The rates are per instance; each of N workers of one instance sends at 1/N of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp

from gateway import __version__

if TYPE_CHECKING:  # config imports the adapter registry, which needs SendRate from here
    from gateway.server.config import EgressSection

USER_AGENT = f"intake-gateway/{__version__}"


def bypassed(host: str, no_proxy: tuple[str, ...]) -> bool:
    """True when ``host`` matches a ``no_proxy`` entry: ``*``, a name, a ``.suffix`` (or a
    name's subdomains), an address or a CIDR network."""
    host = host.strip("[]").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in no_proxy:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        suffix = entry.lstrip(".")
        if host == suffix or host.endswith("." + suffix):
            return True
    return False


def proxy_for(egress: EgressSection, url: str) -> str | None:
    """The configured proxy for ``url``, or None: direct, or the environment's proxy."""
    if not egress.proxy:
        return None
    host = urlsplit(url).hostname or ""
    return None if bypassed(host, egress.no_proxy) else egress.proxy


def client_session(
    egress: EgressSection, base_url: str = "", **kwargs: Any
) -> aiohttp.ClientSession:
    """An aiohttp session for calls to ``base_url``'s host (or to many hosts without it: then
    only the environment's proxy variables apply)."""
    headers = {"User-Agent": USER_AGENT, **kwargs.pop("headers", {})}
    proxy = proxy_for(egress, base_url) if base_url else None
    return aiohttp.ClientSession(trust_env=True, proxy=proxy, headers=headers, **kwargs)


@dataclass(frozen=True, slots=True)
class SendRate:
    """How fast an adapter may send: 0 means no limit."""

    per_second: float = 0.0
    burst: int = 1
    per_recipient: float = 0.0
    """Sends a second to one citizen address (one chat)."""

    def shared(self, processes: int) -> SendRate:
        """One process's part when ``processes`` send through the adapter together (the workers
        of ``gateway serve --workers N``, each taking any reply): rates and burst divided, so
        the provider sees at most the configured rate from the host."""
        if processes <= 1:
            return self
        return SendRate(
            self.per_second / processes,
            max(1, self.burst // processes),
            self.per_recipient / processes,
        )


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved; ``take`` waits for one."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp: float | None = None
        self._lock = asyncio.Lock()

    async def take(self) -> float:
        """Wait for a token; return the seconds waited."""
        loop = asyncio.get_running_loop()
        async with self._lock:  # first come, first served
            now = loop.time()
            if self.stamp is not None:
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return 0.0
            wait = (1 - self.tokens) / self.rate
            await asyncio.sleep(wait)
            self.tokens = 0.0
            self.stamp = loop.time()
            return wait


class SendLimiter:
    """The send rate of one adapter (per gateway instance)."""

    MAX_RECIPIENTS = 10_000
    """Per-recipient buckets kept (least recently used dropped)."""

    def __init__(self, rate: SendRate) -> None:
        self.rate = rate
        self.overall = TokenBucket(rate.per_second, rate.burst) if rate.per_second > 0 else None
        self._recipients: OrderedDict[str, TokenBucket] = OrderedDict()

    async def wait(self, recipient: str) -> float:
        """Wait until one more send to ``recipient`` fits both rates; return the seconds waited."""
        waited = 0.0
        if self.rate.per_recipient > 0:
            bucket = self._recipients.pop(recipient, None) or TokenBucket(
                self.rate.per_recipient, 1
            )
            self._recipients[recipient] = bucket
            while len(self._recipients) > self.MAX_RECIPIENTS:
                self._recipients.popitem(last=False)
            waited += await bucket.take()
        if self.overall is not None:
            waited += await self.overall.take()
        return waited


def send_rate_of(table: dict[str, Any], default: SendRate) -> SendRate:
    """The adapter table's ``send_rate``, ``send_burst``, ``send_rate_per_recipient`` over the
    channel type's default (validated by ``parse_settings``)."""
    per_second = float(table.get("send_rate", default.per_second))
    burst = int(table.get("send_burst", default.burst if "send_rate" not in table else 1))
    per_recipient = float(table.get("send_rate_per_recipient", default.per_recipient))
    return SendRate(per_second, max(1, burst), per_recipient)
