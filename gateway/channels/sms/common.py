"""Pieces every SMS provider shares: bounded bodies, answers, credentials, references, sending."""

from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from gateway.adapters import AdapterContext, SendError
from gateway.config import ConfigError, Secret
from gateway.phone import to_e164
from gateway.records import Event, EventType, short_ref

if TYPE_CHECKING:
    from gateway.channels.sms.concat import Assembler
    from gateway.queueing.coordination import SharedState

log = logging.getLogger(__name__)

class BadRequest(Exception):
    """The request is malformed: answer 400 with this message."""


def bad_request(message: str) -> web.Response:
    return web.Response(status=400, text=message + "\n")


def unauthorized(realm: str = "sms") -> web.Response:
    return web.Response(
        status=401, text="authentication required\n",
        headers={"WWW-Authenticate": f'Basic realm="{realm}"'},
    )


def forbidden() -> web.Response:
    return web.Response(status=403, text="forbidden\n")


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(values: tuple[str, ...], key: str) -> tuple[Network, ...]:
    """Parse ``allow_from`` entries (addresses or CIDR networks); ConfigError names the bad one."""
    parsed: list[Network] = []
    for value in values:
        try:
            parsed.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ConfigError([(key, f"not an address or network: {value!r}")]) from None
    return tuple(parsed)


def peer_in(request: web.Request, allowed: tuple[Network, ...]) -> bool:
    """True when the TCP peer (not a forwarded-for header) is in one of ``allowed``."""
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allowed)


def equal(a: str | bytes, b: str | bytes) -> bool:
    """Compare two secrets in constant time."""
    ab = a.encode("utf-8") if isinstance(a, str) else a
    bb = b.encode("utf-8") if isinstance(b, str) else b
    return hmac.compare_digest(ab, bb)


def basic_password(header: str | None) -> tuple[str, str] | None:
    """Return (user, password) from an ``Authorization: Basic`` header, or None."""
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


_E164 = re.compile(r"\+[1-9][0-9]{6,14}")
_SHORT = re.compile(r"[0-9]{1,6}")


def phone_address(raw: str, region: str) -> str:
    """Return the sender as E.164 when it is a number, else the trimmed text (alphanumeric ids).

    Numbers already in E.164 form and short codes skip the (costly) full parse.
    """
    text = raw.strip()
    if not text:
        raise BadRequest("sender is empty")
    if _E164.fullmatch(text) or _SHORT.fullmatch(text):
        return text
    return to_e164(text, region) or text[:64]


def known_charset(name: str) -> str | None:
    """The codec's canonical name, None when Python has no such codec."""
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):
        return None


def charset_errors(names: str | tuple[str, ...], key: str) -> list[tuple[str, str]]:
    """``ConfigError`` pairs for the charsets (one or several) Python does not know."""
    listed = (names,) if isinstance(names, str) else names
    return [(key, f"unknown {cs!r}") for cs in listed if cs and known_charset(cs) is None]


def render_ack(template: str, contact_id: str) -> str:
    """Fill ``{ref}`` (short reference) and ``{id}`` (full contact id) in an ack template."""
    return template.replace("{ref}", short_ref(contact_id)).replace("{id}", contact_id)


def sign(secret: str, *values: str) -> str:
    """Return a short HMAC-SHA256 tag over ``values`` (references carried through providers)."""
    msg = "\x1f".join(values).encode("utf-8")
    return hmac.new(secret.encode("utf-8"), msg, hashlib.sha256).hexdigest()[:32]


def retry_after_seconds(value: str | None, now_s: float | None = None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def check_status(status: int, headers: Mapping[str, str], body: bytes, provider: str) -> None:
    """Raise SendError for a non-2xx answer: 429 and 5xx retryable (Retry-After kept), 4xx not."""
    if 200 <= status < 300:
        return
    snippet = body[:200].decode("utf-8", "replace").strip()
    message = f"{provider} answered {status}: {snippet}"
    if status == 429 or status >= 500 or status == 408:
        raise SendError(
            message, retryable=True, retry_after_s=retry_after_seconds(headers.get("Retry-After"))
        )
    raise SendError(message, retryable=False)


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    timeout_s: float,
    provider: str,
    **kwargs: Any,
) -> tuple[int, Mapping[str, str], bytes]:
    """Make one HTTP request to a provider; timeouts and connection errors are retryable.

    Error messages never carry the URL (it may hold credentials).
    """
    try:
        async with session.request(
            method, url, timeout=aiohttp.ClientTimeout(total=timeout_s), **kwargs
        ) as resp:
            body = b""
            while len(body) < 1 << 20:
                chunk = await resp.content.read(65536)
                if not chunk:
                    break
                body += chunk
            return resp.status, dict(resp.headers), body
    except TimeoutError as exc:
        raise SendError(f"{provider} timed out after {timeout_s:g}s", retryable=True) from exc
    except aiohttp.ClientError as exc:
        raise SendError(f"{provider} unreachable: {type(exc).__name__}", retryable=True) from exc


ACK_PREFIX = "ack-"
"""Reply id of an automatic acknowledgement (``ack-<contact id>``): its delivery is no response."""


def ack_reply_id(contact_id: str) -> str:
    return ACK_PREFIX + contact_id


class DeliveryReports:
    """Turns a provider's final delivery report into a ``delivered`` or ``failed`` event, once
    per (reply, outcome): providers repeat callbacks, to any instance of a fleet. What was
    recorded is remembered in the adapter's shared state for ``REMEMBER_S``."""

    REMEMBER_S = 7 * 86400

    def __init__(self, ctx: AdapterContext) -> None:
        self.ctx = ctx

    async def record(
        self, contact_id: str, reply_id: str, kind: EventType | None, detail: dict[str, Any]
    ) -> bool:
        """Record the outcome (None: not final, nothing to do). False when the event could not
        be written: answer the provider so that it retries."""
        if kind is None:
            return True
        now = self.ctx.clock.now_us()
        if kind == "delivered" and not reply_id.startswith(ACK_PREFIX):
            # A fast provider reports delivery before its answer to our send reached us, so
            # before the reply router stamped ``responded``: stamp it here first (once per
            # contact, whoever is first), so ``delivered`` never precedes ``responded``.
            try:
                await self.ctx.events.stamp(
                    contact_id, "responded", now, self.ctx.name, {"reply_id": reply_id}
                )
            except Exception as exc:
                log.warning("delivery report for %s not recorded: %s", contact_id, exc)
                return False
        key = f"dlr:{contact_id}:{reply_id}:{kind}"
        try:  # claim first: of two instances handed the same report, one writes the event
            if not await self.ctx.state.put(key, "1", self.REMEMBER_S, only_new=True):
                return True
        except Exception as exc:
            log.warning("delivery report for %s not recorded: %s", contact_id, exc)
            return False
        event = Event(
            contact_id, kind, now, self.ctx.name,
            detail={"reply_id": reply_id, **detail},
        )
        try:
            await self.ctx.events.emit(event)
        except Exception as exc:
            log.warning("delivery report for %s not recorded: %s", contact_id, exc)
            with contextlib.suppress(Exception):
                await self.ctx.state.pop(key)
            return False
        return True


class PartsLifecycle:
    """Start and stop of an SMS adapter that joins long messages from parts and sends replies
    on its own HTTP session with background tasks (Kannel, the generic webhook)."""

    assembler: Assembler
    _session: aiohttp.ClientSession | None
    _tasks: set[asyncio.Task[None]]

    async def start(self) -> None:
        await self.assembler.start()

    async def stop(self) -> None:
        """Stop the assembler (parts stay on disk), cancel background sends, close the session."""
        await self.assembler.stop()
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def local_key(folder: Path) -> str:
    """A random signing key kept in ``folder/signing.key`` (made on first use, mode 0600)."""
    path = folder / "signing.key"
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(key)
        return key


class References:
    """Signs the (contact, reply) reference an SMS provider carries back in its delivery
    reports, and checks it when it comes back: with the adapter's secret, or, when it has
    none (``auth = "none"``, ``insecure_no_auth``), with a random key, never a guessable one
    such as the adapter's name. That key lives in the adapter's shared state, so a report that
    comes back to another instance of the fleet is still ours; while Redis is away the key
    kept in the adapter's data folder signs, and both are accepted."""

    SHARED_KEY_TTL_S = 10 * 365 * 86400

    def __init__(self, secret: Secret | None, folder: Path, state: SharedState) -> None:
        self._secret = secret
        self._folder = folder
        self._state = state
        self._local: str | None = None
        self._shared: str | None = None

    async def _keys(self) -> list[str]:
        """The keys a reference may be signed with, the one to sign with first."""
        if self._secret:
            return [self._secret.reveal()]
        if self._local is None:
            self._local = local_key(self._folder)
        if self._shared is None:
            try:
                await self._state.put(
                    "signing-key", secrets.token_hex(32), self.SHARED_KEY_TTL_S, only_new=True
                )
                shared = await self._state.get("signing-key")
                self._shared = shared.decode() if shared else None
            except Exception as exc:
                log.warning("shared signing key unavailable (%s): the local one signs", exc)
        return [self._local] if self._shared is None else [self._shared, self._local]

    async def tag(self, contact_id: str, ref: str) -> str:
        """The signature of one reference."""
        return sign((await self._keys())[0], contact_id, ref)

    async def valid(self, contact_id: str, ref: str, tag: str) -> bool:
        """True when ``tag`` is ours for (contact, reply); compared in constant time."""
        keys = await self._keys()
        return any(equal(tag, sign(key, contact_id, ref)) for key in keys)
