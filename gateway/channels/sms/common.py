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
from collections.abc import Awaitable, Callable, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import aiohttp
from aiohttp import web

from gateway.adapters import AdapterContext, Receipt, SendError, SendReceipt
from gateway.channels.common import cancel_all, retry_later, submit
from gateway.channels.sms.concat import Added, Assembler, Part, assembled_id
from gateway.channels.sms.segments import Segments, split, substitute
from gateway.contact.phone import mask_phone, to_e164
from gateway.records import (
    Attachment,
    Contact,
    Event,
    EventType,
    Inbound,
    Reply,
    Sender,
    short_ref,
)
from gateway.server.auth import secrets_equal
from gateway.server.config import ConfigError, Secret
from gateway.server.egress import client_session

if TYPE_CHECKING:
    from gateway.queueing.coordination import SharedState

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Deliver = Callable[[Contact, Reply], Awaitable[SendReceipt]]

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
    """The codec's canonical name, None when Python has no such text codec (``undefined``,
    which decodes nothing, and the bytes-to-bytes codecs such as ``base64`` are none)."""
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if info.name == "undefined" or not getattr(info, "_is_text_encoding", True):
        return None
    return info.name


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
    recorded is remembered in the adapter's shared state for ``REMEMBER_S``.

    The first instance handed a report claims it with the event it is about to write
    (``dlr:<contact>:<reply>:<outcome>``), and marks it ``DONE`` once written. A repeat that
    finds the event still there (the claimant is writing, or died or failed before it wrote)
    writes that same event: the events stream takes the same event once (``emit.lua``), and
    a claimant that died between its claim and its write no longer loses the report."""

    REMEMBER_S = 7 * 86400
    DONE = b"1"
    """A claim whose event is written (what every claim held before it held the event)."""

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
        event = Event(
            contact_id, kind, now, self.ctx.name,
            detail={"reply_id": reply_id, **detail},
        )
        try:  # claim with the event: of instances handed the same report, one event is written
            if not await self.ctx.state.put(key, event.to_json(), self.REMEMBER_S, only_new=True):
                claimed = await self.ctx.state.get(key)
                if claimed is None or claimed == self.DONE:
                    return True
                event = Event.from_json(claimed)  # not written yet, or its claimant died
            await self.ctx.events.emit(event)
        except Exception as exc:  # the claim keeps the event: a repeat writes it
            log.warning("delivery report for %s not recorded: %s", contact_id, exc)
            return False
        with contextlib.suppress(Exception):  # else a repeat writes it again: taken once
            await self.ctx.state.put(key, self.DONE, self.REMEMBER_S)
        return True


class SmsWebhook:
    """What the HTTP SMS providers share (Kannel, Twilio, the generic webhook): the routes of
    inbound messages and delivery reports, the sender and recipient as E.164, long messages
    joined from parts (``parts=True``), acknowledgements sent in the background, delivery
    reports recorded once, and the HTTP session replies go out on."""

    channel = "sms"
    provider: ClassVar[str]
    """``meta.provider`` of the contacts."""

    def __init__(self, ctx: AdapterContext, *, path: str, report_suffix: str, region: str,
                 parts: float | None = None, secret: Secret | None = None) -> None:
        """``parts``: the seconds a long message's parts are waited for (None: no parts);
        ``secret``: signs the references carried back by delivery reports."""
        self.name = ctx.name
        self.ctx = ctx
        self.region = region
        self.path = path.rstrip("/") or "/"
        self.status_path = self.path.rstrip("/") + report_suffix
        folder = Path(ctx.settings.gateway.data_dir) / "sms" / ctx.name
        self.assembler: Assembler | None = None
        if parts is not None:
            self.assembler = Assembler(folder / "parts", parts, ctx.clock, self.handover,
                                       state=ctx.state)
            self.assembler.load()  # parts left by an earlier run, before any request comes
        self.reports = DeliveryReports(ctx)
        self.references = References(secret, folder, ctx.state)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def route(self, methods: tuple[str, ...], receive: Handler, report: Handler) -> None:
        for method in methods:
            self.ctx.router.add_route(method, self.path, receive)
            self.ctx.router.add_route(method, self.status_path, report)

    async def start(self) -> None:
        if self.assembler is not None:
            await self.assembler.start()

    async def stop(self) -> None:
        """Stop the assembler (parts stay on disk), cancel background sends, close the session."""
        if self.assembler is not None:
            await self.assembler.stop()
        await cancel_all(self._tasks)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # ------------------------------------------------------------------ inbound

    def addresses(self, sender: str, recipient: str) -> tuple[str, str]:
        """(sender, recipient) as E.164 (or as given: short codes, alphanumeric ids);
        ``BadRequest`` for an empty sender."""
        return (phone_address(sender, self.region),
                phone_address(recipient, self.region) if recipient else "")

    async def take(self, *, external_id: str, sender: str, recipient: str, received_at: int,
                   text: str, origin_at: int | None = None,
                   attachments: tuple[Attachment, ...] = (), **meta: Any) -> Receipt:
        """Make one whole message a durable contact (``meta.provider`` set); ``Refused`` with
        the answer when it is not (gateway/channels/common.py)."""
        inbound = Inbound(
            channel="sms", adapter=self.name, external_id=external_id, sender=Sender(sender),
            recipient=recipient, received_at=received_at, text=text, origin_at=origin_at,
            attachments=attachments, meta={"provider": self.provider, **meta},
        )
        receipt = await submit(self.ctx, inbound)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("SMS from %s %s as %s", mask_phone(sender), receipt.status,
                      receipt.contact_id)
        return receipt

    async def take_part(self, part: Part) -> Added | web.Response:
        """Keep one part of a long message (what the assembler did with it), or the 503
        answer when it could not be stored."""
        assert self.assembler is not None
        try:
            return await self.assembler.add(part)
        except OSError as exc:
            log.error("SMS part from %s not stored: %s", mask_phone(part.sender), exc)
            return retry_later()

    def assembled(self, parts: list[Part], complete: bool, text: str,
                  **meta: Any) -> Inbound:
        """The contact of a long message joined from ``parts``."""
        first = parts[0]
        return Inbound(
            channel="sms",
            adapter=self.name,
            external_id=assembled_id(parts),
            sender=Sender(first.sender),
            recipient=first.recipient,
            received_at=min(p.received_at for p in parts),
            text=text,
            origin_at=min((p.origin_at for p in parts if p.origin_at is not None), default=None),
            meta={
                "provider": self.provider,
                **meta,
                "concat": {
                    "ref": first.meta.get("ref"),
                    "total": first.total,
                    "parts": [p.seq for p in parts],
                    "ids": [p.external_id for p in parts],
                },
                "incomplete": not complete,
            },
        )

    async def handover(self, parts: list[Part], complete: bool) -> Receipt:
        """Submit the parts of a long message as one contact (adapters with ``parts``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ acknowledgements

    async def stamp_ack(self, contact_id: str, via: str) -> None:
        """Record ``acknowledged``; a failure is logged (the contact itself is safe)."""
        try:
            await self.ctx.events.stamp(
                contact_id, "acknowledged", self.ctx.clock.now_us(), self.name, {"via": via}
            )
        except Exception as exc:
            log.warning("acknowledged stamp for %s not recorded: %s", contact_id, exc)

    def send_ack_later(self, contact_id: str, text: str, deliver: Deliver, via: str) -> None:
        """Send the acknowledgement ``text`` as an SMS in the background (no request is left
        to carry it), then stamp ``acknowledged``."""
        task = asyncio.get_running_loop().create_task(
            self._send_ack(contact_id, render_ack(text, contact_id), deliver, via)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_ack(self, contact_id: str, text: str, deliver: Deliver, via: str) -> None:
        contact = await self.ctx.contacts.get(contact_id)
        if contact is None:  # spooled: not in Redis yet, so nobody can be told its id there
            log.info("no acknowledgement for spooled contact %s", contact_id)
            return
        try:
            await deliver(contact, Reply(contact_id, text, id=ack_reply_id(contact_id)))
        except SendError as exc:
            log.warning("acknowledgement for %s not sent: %s", contact_id, exc)
            return
        await self.stamp_ack(contact_id, via)

    # ------------------------------------------------------------------ reports and replies

    async def report(self, contact_id: str, ref: str, kind: EventType | None,
                     detail: dict[str, Any], ok: web.Response) -> web.Response:
        """Record a delivery report; ``ok`` when done, 503 so that the provider repeats it."""
        if not await self.reports.record(contact_id, ref, kind, detail):
            return retry_later()
        return ok

    def session(self, url: str, **kwargs: Any) -> aiohttp.ClientSession:
        """The HTTP session replies go out on (made on first use)."""
        if self._session is None:
            self._session = client_session(self.ctx.settings.egress, url, **kwargs)
        return self._session

    def reply_ref(self, contact: Contact, reply: Reply) -> str:
        """The reply's own id, or one made for it."""
        return reply.id or f"{contact.id}-{self.ctx.clock.now_us()}"


def reply_segments(text: str, max_segments: int, *, gsm_substitutions: bool = False
                   ) -> tuple[str, Segments]:
    """The text of a reply as sent (with GSM substitutions when they make it fit GSM 7-bit)
    and its segments; ``SendError`` for an empty reply or one longer than ``max_segments``."""
    if not text.strip():
        raise SendError("empty reply", retryable=False)
    if gsm_substitutions and split(substitute(text)).encoding == "gsm7":
        text = substitute(text)
    segments = split(text)
    if segments.count > max_segments:
        raise SendError(f"reply needs {segments.count} segments (max_segments {max_segments})",
                        retryable=False)
    return text, segments


def local_key(folder: Path) -> str:
    """A random signing key kept in ``folder/signing.key`` (made on first use, mode 0600).

    The workers of one data folder share the file, and may make it at the same moment: it is
    written whole to a temporary file and linked into place (``link`` fails if one is there),
    so a reader never sees it empty or half written (an empty key would accept forged
    references). A file that is not a key (left by an interrupted write) is replaced.
    """
    path = folder / "signing.key"
    for _ in range(3):
        with contextlib.suppress(FileNotFoundError):
            key = path.read_text(encoding="ascii").strip()
            if re.fullmatch(r"[0-9a-f]{64}", key):
                return key
            log.warning("%s is not a signing key: replaced", path)
            path.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".signing.key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another worker's is there: read it
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    raise OSError(f"{path}: no signing key could be kept")


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
        return any(secrets_equal(tag, sign(key, contact_id, ref)) for key in keys)
