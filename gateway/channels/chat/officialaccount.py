"""What WeChat Official Accounts and Weibo fan service share.

Both platforms verify the callback URL with a GET (``signature`` = sha1 of the sorted and
joined secret, timestamp and nonce; ``echostr`` echoed back), push messages by POST with the
same signature, wait a few seconds for an answer and retry, and take replies through a
customer-service message API with an access token. This module holds those pieces, and the
adapter skeleton built on them; ``wechat.py`` and ``weibo.py`` only decode and encode.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
import string
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from xml.etree.ElementTree import Element, ParseError

import aiohttp
import orjson
from aiohttp import web
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring as _defused_fromstring

from gateway.adapters import AdapterContext, Receipt, SendError
from gateway.channels.common import Refused, Unavailable, retry_later, submit
from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.contact.language import guess_language
from gateway.records import Attachment, Inbound, Sender, clean_text
from gateway.server.config import Duration
from gateway.server.egress import client_session
from gateway.server.http import read_body, read_capped
from gateway.server.supervise import Backoff, retry

if TYPE_CHECKING:
    from gateway.queueing.coordination import SharedState

log = logging.getLogger(__name__)

MAX_BODY: Final = 64 * 1024
"""Push bodies are small (a text message is < 2 KB); anything larger is refused with 413."""


class PayloadError(ValueError):
    """A push body that cannot be decoded (malformed, oversize, forbidden XML constructs)."""


class SignatureError(ValueError):
    """A missing or wrong signature, or a timestamp outside the accepted window."""


# ---------------------------------------------------------------- signatures


def sha1_signature(*parts: str) -> str:
    """Return sha1 hex of the parts sorted and joined, as both platforms sign."""
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()  # noqa: S324


def signature_matches(given: str, *parts: str) -> bool:
    """Compare ``given`` with the expected signature in constant time."""
    expected = sha1_signature(*parts)
    return hmac.compare_digest(given.strip().lower().encode("ascii", "replace"), expected.encode())


def timestamp_within(timestamp: str, now_us: Micros, window_s: float) -> bool:
    """Tell whether ``timestamp`` (Unix seconds, or milliseconds) is within ``window_s`` of now."""
    try:
        value = int(timestamp)
    except ValueError:
        return False
    if value > 100_000_000_000:  # milliseconds
        value //= 1000
    return abs(now_us / MICROS_PER_SECOND - value) <= window_s


def check_push(
    query: Mapping[str, str], secret: str, now_us: Micros, window_s: float, *extra: str
) -> None:
    """Check ``signature`` over secret, timestamp, nonce (and ``extra``); raise SignatureError."""
    signature = query.get("signature", "")
    timestamp = query.get("timestamp", "")
    nonce = query.get("nonce", "")
    if not signature or not timestamp:
        raise SignatureError("missing signature or timestamp")
    if not signature_matches(signature, secret, timestamp, nonce, *extra):
        raise SignatureError("signature mismatch")
    if window_s > 0 and not timestamp_within(timestamp, now_us, window_s):
        raise SignatureError("timestamp outside the window")


# ---------------------------------------------------------------- XML


def parse_xml(data: bytes, max_bytes: int = MAX_BODY) -> dict[str, Any]:
    """Parse a flat WeChat-style ``<xml>`` document into ``{tag: text}``; raise PayloadError.

    No DTD, no entities, no external references (defusedxml), and a size bound. A child with
    children of its own becomes a nested mapping (``ScanCodeInfo``, ``SendLocationInfo``).
    """
    if len(data) > max_bytes:
        raise PayloadError("body too large")
    try:
        root = _defused_fromstring(
            data, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except (ParseError, DefusedXmlException, ValueError, SyntaxError) as exc:
        raise PayloadError(f"malformed XML: {type(exc).__name__}") from None
    if root.tag != "xml":
        raise PayloadError("root element is not <xml>")
    return _flatten(root, 0)


def _flatten(elem: Element, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in elem:
        if len(child) and depth < 3:
            out[child.tag] = _flatten(child, depth + 1)
        else:
            out[child.tag] = (child.text or "").strip()
    return out


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


def text_reply_xml(to_user: str, from_user: str, create_time: int, content: str) -> str:
    """Build a passive text reply as both platforms take it."""
    return (
        f"<xml><ToUserName>{_cdata(to_user)}</ToUserName>"
        f"<FromUserName>{_cdata(from_user)}</FromUserName>"
        f"<CreateTime>{create_time}</CreateTime>"
        f"<MsgType>{_cdata('text')}</MsgType>"
        f"<Content>{_cdata(content)}</Content></xml>"
    )


# ---------------------------------------------------------------- safe mode (AES)


class MessageCrypto:
    """WeChat's message encryption (safe and compatible mode).

    ``EncodingAESKey`` is 43 base64 characters; the AES-256 key is its decoding (with one ``=``)
    and the CBC IV its first 16 bytes. Plaintext is 16 random bytes, the message length (4 bytes,
    network order), the message, then the AppID, padded PKCS#7 to a 32-byte multiple.
    ``msg_signature`` is sha1 of the sorted token, timestamp, nonce and ciphertext.
    """

    BLOCK: Final = 32

    def __init__(self, token: str, encoding_aes_key: str, app_id: str) -> None:
        try:
            key = base64.b64decode(encoding_aes_key + "=", validate=True)
        except ValueError:
            key = b""
        if len(encoding_aes_key) != 43 or len(key) != 32:
            raise ValueError("EncodingAESKey must be 43 base64 characters")
        self.token = token
        self.key = key
        self.app_id = app_id
        self._app_id = app_id.encode()
        self._cipher_obj = Cipher(algorithms.AES(key), modes.CBC(key[:16]))

    def _cipher(self) -> Cipher[modes.CBC]:
        return self._cipher_obj  # a fresh encryptor/decryptor context is made per message

    def decrypt(self, encrypted: str) -> bytes:
        """Return the plaintext message; raise PayloadError (bad base64, padding, length) or
        SignatureError (encrypted for another AppID: not ours to take, refused 403)."""
        try:
            data = base64.b64decode(encrypted, validate=True)
        except ValueError:
            raise PayloadError("Encrypt is not base64") from None
        if not data or len(data) % 16:
            raise PayloadError("Encrypt is not whole AES blocks")
        decryptor = self._cipher().decryptor()
        plain = decryptor.update(data) + decryptor.finalize()
        pad = plain[-1]
        if not 1 <= pad <= self.BLOCK or len(plain) < 20 + pad:
            raise PayloadError("bad padding")
        content = plain[16:-pad]
        (length,) = struct.unpack(">I", content[:4])
        if length > len(content) - 4:
            raise PayloadError("bad message length")
        message = content[4 : 4 + length]
        app_id = content[4 + length :]
        if not hmac.compare_digest(app_id, self._app_id):
            raise SignatureError("AppID mismatch: encrypted for another account")
        return message

    def encrypt(self, message: bytes, random16: bytes | None = None) -> str:
        """Return the base64 ciphertext of ``message``."""
        prefix = random16 if random16 is not None else _random_alnum(16)
        body = prefix + struct.pack(">I", len(message)) + message + self.app_id.encode()
        pad = self.BLOCK - len(body) % self.BLOCK
        body += bytes([pad]) * pad
        encryptor = self._cipher().encryptor()
        return base64.b64encode(encryptor.update(body) + encryptor.finalize()).decode("ascii")

    def msg_signature(self, timestamp: str, nonce: str, encrypted: str) -> str:
        """Return ``msg_signature`` for an encrypted message."""
        return sha1_signature(self.token, timestamp, nonce, encrypted)

    def encrypted_reply(self, xml: str, timestamp: str, nonce: str) -> str:
        """Wrap a passive reply for safe mode."""
        encrypted = self.encrypt(xml.encode("utf-8"))
        signature = self.msg_signature(timestamp, nonce, encrypted)
        return (
            f"<xml><Encrypt>{_cdata(encrypted)}</Encrypt>"
            f"<MsgSignature>{_cdata(signature)}</MsgSignature>"
            f"<TimeStamp>{timestamp}</TimeStamp><Nonce>{_cdata(nonce)}</Nonce></xml>"
        )


_ALNUM = (string.ascii_letters + string.digits).encode()


def _random_alnum(n: int) -> bytes:
    return bytes(_ALNUM[b % len(_ALNUM)] for b in os.urandom(n))


# ---------------------------------------------------------------- access token


class TokenError(Exception):
    """The platform would not give an access token."""


TOKEN_KEY: Final = "access_token"  # noqa: S105 (a key name)
REJECTED_KEY: Final = "access_token:rejected"
CLAIM_KEY: Final = "access_token:fetching"
CLAIM_TTL_S: Final = 15.0
"""How long one process may take to fetch before another may try (the API call's own timeout
is 10 s)."""
LOCAL_CACHE_S: Final = 60.0
"""How long a process keeps the fleet's token in memory before reading it again (WeChat keeps
a replaced token working for 5 minutes)."""
WAIT_FOR_FETCH_S: Final = 2 * CLAIM_TTL_S


@dataclass(slots=True)
class AccessToken:
    """Fetches, caches and refreshes a platform access token, once for the whole fleet.

    WeChat gives one valid token per AppID: every ``cgi-bin/token`` call (and a forced
    ``stable_token``) replaces the last, which keeps working 5 minutes more. So the token lives
    in the fleet's shared state (``state``, scoped to the AppID), and a process that finds it
    missing claims the fetch (``SET NX`` with a short TTL); the others wait and read what it
    stored. The shared copy expires ``margin_s`` before the token does, so the next caller
    fetches in time; each process keeps it in memory at most ``LOCAL_CACHE_S``.

    ``fetch(force)`` returns ``(token, expires_in_s)``; ``force`` asks for a new token even if
    the platform still holds one (WeChat's ``force_refresh``): set when the shared token is one a
    process was told is invalid (``invalidate``). Without ``state``, or while Redis is away, the
    process fetches for itself as a single process would.
    """

    fetch: Callable[[bool], Awaitable[tuple[str, float]]]
    state: SharedState | None = None
    margin_s: float = 300.0
    _token: str = ""
    _expires_at: float = 0.0
    _rejected: str = ""
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> str:
        if self._token and time.monotonic() < self._expires_at:
            return self._token
        async with self._lock:
            if self._token and time.monotonic() < self._expires_at:
                return self._token
            if self.state is not None:
                try:
                    return await self._shared(self.state)
                except (TokenError, SendError):
                    raise
                except Exception as exc:  # Redis away: fetched as a single process would
                    log.warning(
                        "access token: shared state away (%s); fetching locally",
                        type(exc).__name__,
                    )
            token, expires_in = await self.fetch(self._token == self._rejected != "")
            self._keep(token, self._lifetime(expires_in), local_only=True)
            return token

    def _lifetime(self, expires_in: float) -> float:
        return max(expires_in - self.margin_s, expires_in / 2)

    def _keep(self, token: str, lifetime_s: float, *, local_only: bool = False) -> None:
        self._token = token
        limit = lifetime_s if local_only else min(lifetime_s, LOCAL_CACHE_S)
        self._expires_at = time.monotonic() + limit

    async def _shared(self, state: SharedState) -> str:
        give_up = time.monotonic() + WAIT_FOR_FETCH_S
        claim = f"{os.getpid()}/{secrets.token_hex(4)}"
        while True:
            shared, rejected = await self._read_shared(state)
            if isinstance(shared, str):
                return shared
            if await state.put(CLAIM_KEY, claim, CLAIM_TTL_S, only_new=True):
                try:
                    # Read again under the claim: another process may have stored its token
                    # and let its claim go between our read and our claim, and a second fetch
                    # would replace the token it has just shared.
                    shared, rejected = await self._read_shared(state)
                    if isinstance(shared, str):
                        return shared
                    return await self._fetch_shared(state, shared, rejected)
                finally:
                    # ours only while it holds our value: expired (a fetch past CLAIM_TTL_S)
                    # and taken again, it is another process's claim and stays
                    await state.remove_if(CLAIM_KEY, claim)
            if time.monotonic() > give_up:
                raise TokenError("another process did not finish fetching the token")
            await asyncio.sleep(0.05)

    async def _read_shared(self, state: SharedState) -> tuple[str | bool, bytes | None]:
        """The fleet's token if it is usable (kept here too), else whether a rejected one is
        stored (the next fetch must force); and the rejected token."""
        shared = _parse_token(await state.get(TOKEN_KEY))
        rejected = await state.get(REJECTED_KEY)
        if shared is None:
            return False, rejected
        token, until = shared
        if rejected is not None and token == rejected.decode():
            return True, rejected
        self._keep(token, until - time.time())
        return token, rejected

    async def _fetch_shared(self, state: SharedState, force: bool, rejected: bytes | None) -> str:
        token, expires_in = await self.fetch(force)
        if not force and rejected is not None and token == rejected.decode():
            token, expires_in = await self.fetch(True)  # the platform gave the rejected one back
        lifetime = self._lifetime(expires_in)
        await state.put(TOKEN_KEY, f"{time.time() + lifetime:.3f} {token}", lifetime)
        self._keep(token, lifetime)
        return token

    async def invalidate(self, token: str) -> None:
        """The platform called ``token`` invalid: forget it here and tell the fleet, so the
        next fetch (by whichever process) forces a new one."""
        if token == self._token:
            self._expires_at = 0.0
        self._rejected = token
        if self.state is not None:
            try:
                await self.state.put(REJECTED_KEY, token, CLAIM_TTL_S * 40)
            except Exception as exc:  # Redis away: the others find out from the platform
                log.warning("access token: rejection not shared (%s)", type(exc).__name__)


def _parse_token(raw: bytes | None) -> tuple[str, float] | None:
    """``(token, valid until in Unix seconds)`` from the shared value, None if absent."""
    if raw is None:
        return None
    until, _, token = raw.decode().partition(" ")
    try:
        return (token, float(until)) if token else None
    except ValueError:
        return None


# ---------------------------------------------------------------- decoded pushes


@dataclass(frozen=True, slots=True)
class PushMessage:
    """One decoded push, the same for both platforms.

    ``kind`` is the platform's message type (``text``, ``image``, ``location``, ``event``...);
    ``event`` the event name for events. ``external_id`` is what Intake dedupes on.
    """

    kind: str
    sender: str
    recipient: str
    external_id: str
    created_at: int | None
    text: str = ""
    event: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def to_inbound(
    msg: PushMessage,
    *,
    adapter: str,
    scheme: str,
    received_at: Micros,
    attachments: tuple[Attachment, ...] = (),
) -> Inbound:
    """Turn a decoded push into the contact handed to Intake (thread = the citizen)."""
    text = clean_text(msg.text)
    meta = {"type": msg.kind, **msg.meta}
    if msg.event is not None:
        meta["event"] = msg.event
    address = f"{scheme}:{msg.sender}"
    return Inbound(
        channel="chat",
        adapter=adapter,
        external_id=msg.external_id,
        sender=Sender(address),
        recipient=msg.recipient,
        received_at=received_at,
        text=text,
        language=guess_language(text) if text else None,
        attachments=attachments,
        thread=address,
        origin_at=None if msg.created_at is None else msg.created_at * MICROS_PER_SECOND,
        meta=meta,
    )


WINDOW: Final = Duration(300)
REPLAY_MEMORY_S: Final = 86400.0
"""How long a signed query is remembered when no timestamp window is configured."""
"""Default accepted distance between a push's timestamp and our clock."""

ANSWER_WITHIN_S: Final = 4.0
"""Both platforms wait 5 s for an answer; have one (durable, or given up) before that."""

PLATFORM_WAIT_S: Final = 5.5
"""A push that could not be made durable is answered only after this long: both platforms
retry (three times, same message id) a push left unanswered for 5 s, while an error answer
shows the citizen an error prompt and is not documented to be retried."""


async def submit_within(ctx: AdapterContext, inbound: Inbound, limit_s: float) -> Receipt | None:
    """Submit ``inbound``; None when it is not durable within ``limit_s`` (``Refused`` for a
    contact over the rate or one Intake cannot take).

    Unavailability is retried with back-off inside the limit (a Redis failover or a spool
    hiccup often passes in a second). Intake bounds its own Redis wait and falls back to the
    spool, so giving up is rare; the platform's retry (same message id) then dedupes.
    """
    try:
        return await retry(
            lambda: submit(ctx, inbound), on=Unavailable, backoff=Backoff(0.1, 1.0),
            within=limit_s,
        )
    except (TimeoutError, Unavailable):
        return None


_MAX_API_ANSWER: Final = 1 << 20


async def call_json(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    json: Any = None,
    data: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Call a platform API and return its JSON object; raise SendError for transport failures.

    ``json`` is sent as UTF-8 without escapes (WeChat shows ``\\uXXXX`` escapes literally).
    """
    headers = {}
    body: Any = data
    if json is not None:
        body = orjson.dumps(json)
        headers["Content-Type"] = "application/json; charset=utf-8"
    try:
        async with session.request(
            method,
            url,
            params=params,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            status = resp.status
            raw = await read_capped(resp.content, _MAX_API_ANSWER)
            if raw is None:
                raise SendError("answer too large", retryable=False)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SendError(f"transport: {type(exc).__name__}", retryable=True) from None
    if status == 429 or status >= 500:
        raise SendError(f"HTTP {status}", retryable=True)
    try:
        result = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SendError(f"HTTP {status}: not JSON", retryable=False) from None
    if not isinstance(result, dict):
        raise SendError(f"HTTP {status}: not a JSON object", retryable=False)
    return result


# ---------------------------------------------------------------- the adapter skeleton


@dataclass(frozen=True, slots=True)
class Decoded:
    """A verified and decoded push: the message (None: ignore) and how to reply passively."""

    message: PushMessage | None
    passive: Callable[[str], web.Response]


@dataclass(frozen=True, slots=True, kw_only=True)
class PushConfig:
    """The keys of ``[adapters.NAME]`` both platforms' push adapters have."""

    path: str = ""
    """Webhook path on the gateway's HTTP server; default ``/chat/<type>/<name>``."""
    verify: bool = True
    """Check signatures; turn off only behind a proxy that already does."""
    timestamp_window: Duration = WINDOW
    auto_ack: str = ""
    """A passive text reply sent with every accepted message (stamps ``acknowledged``)."""
    event_contacts: bool = True
    """Subscribe / follow events (and their opposites) become contacts (``meta.event``)."""
    api_base: str = ""
    """The platform's API host (its calls go through ``[egress] proxy`` unless bypassed)."""


class PushAdapter:
    """The webhook half both platforms share: URL verification, signed pushes, passive replies.

    Subclasses set ``scheme`` (the sender address prefix), implement ``decode`` (verify and
    decode one POST) and ``send`` (customer-service message API).
    """

    channel = "chat"
    scheme = ""
    events: frozenset[str] = frozenset()
    """Event names that become contacts (others are answered and ignored)."""

    def __init__(self, ctx: AdapterContext, config: PushConfig, *, secret: str,
                 max_body: int = MAX_BODY) -> None:
        self.ctx = ctx
        self.api_base = config.api_base
        self.name = ctx.name
        path = config.path or f"/chat/{self.scheme}/{ctx.name}"
        self.path = path
        self.secret = secret
        self.verify = config.verify
        self.window_s = float(config.timestamp_window)
        self.auto_ack = config.auto_ack
        self.event_contacts = config.event_contacts
        self.max_body = max_body
        self._session: aiohttp.ClientSession | None = None
        ctx.router.add_route("GET", path, self.handle_verify)
        ctx.router.add_route("POST", path, self.handle_push)

    async def start(self) -> None:
        """Nothing to listen on: the routes are on the gateway's server."""

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = client_session(self.ctx.settings.egress, self.api_base)
        return self._session

    def check(self, query: Mapping[str, str], *extra: str) -> None:
        """Check the push signature and timestamp unless verification is off."""
        if self.verify:
            check_push(query, self.secret, self.ctx.clock.now_us(), self.window_s, *extra)

    async def handle_verify(self, request: web.Request) -> web.Response:
        """Answer the platform's URL verification: ``echostr`` back when the signature holds."""
        try:
            check_push(request.query, self.secret, self.ctx.clock.now_us(), self.window_s)
        except SignatureError as exc:
            log.warning("%s: URL verification refused: %s", self.name, exc)
            return web.Response(status=403, text="forbidden")
        return web.Response(text=request.query.get("echostr", ""))

    def decode(self, query: Mapping[str, str], body: bytes) -> Decoded:
        """Verify and decode one push; raise SignatureError or PayloadError."""
        raise NotImplementedError

    def signs_query_only(self, query: Mapping[str, str]) -> bool:
        """True when the push's signature covers the query (secret, timestamp, nonce) but not
        the body: Weibo, and WeChat's plain mode. Such a push is checked before its body is
        read and its signed query is bound to the first body seen with it."""
        return True

    async def first_body(self, query: Mapping[str, str], body: bytes) -> bool:
        """Bind the signed query to ``body`` in the fleet's shared state; False when it was
        seen before with another body (a captured query replayed with a forged body).

        The same query with the same body passes: the platform's own retries. The binding is
        kept as long as the timestamp window accepts the query. While Redis is away the check
        cannot be made and the push is taken (logged): the intake would be spooling anyway.
        """
        signed = "\n".join(query.get(k, "") for k in ("signature", "timestamp", "nonce"))
        key = "replay:" + hashlib.sha256(signed.encode("utf-8", "replace")).hexdigest()
        digest = hashlib.sha256(body).hexdigest()
        ttl_s = 2 * self.window_s + 60 if self.window_s > 0 else REPLAY_MEMORY_S
        try:
            if await self.ctx.state.put(key, digest, ttl_s, only_new=True):
                return True
            seen = await self.ctx.state.get(key)
        except Exception as exc:  # Redis away: taken, see above
            log.warning("%s: replay check skipped: %s", self.name, type(exc).__name__)
            return True
        return seen is None or seen.decode() == digest

    async def fetch_attachments(self, msg: PushMessage) -> tuple[Attachment, ...]:
        """Fetch the message's media into the attachment store (none by default)."""
        return ()

    def success(self) -> web.Response:
        """The platform's plain 'received, no reply' answer."""
        return web.Response(text="success")

    async def handle_push(self, request: web.Request) -> web.Response:
        """Take one push: durable before answering, within the platform's time limit."""
        received_at = self.ctx.clock.now_us()
        loop = asyncio.get_running_loop()
        started = loop.time()
        query_only = self.verify and self.signs_query_only(request.query)
        if query_only:  # authenticated before the body is read
            try:
                self.check(request.query)
            except SignatureError as exc:
                log.warning("%s: push refused: %s", self.name, exc)
                return web.Response(status=403, text="forbidden")
        body = await read_body(request, self.max_body)
        if query_only and not await self.first_body(request.query, body):
            log.warning("%s: push refused: signed query replayed with another body", self.name)
            return web.Response(status=403, text="forbidden")
        try:
            decoded = self.decode(request.query, body)
        except SignatureError as exc:
            log.warning("%s: push refused: %s", self.name, exc)
            return web.Response(status=403, text="forbidden")
        except PayloadError as exc:
            log.warning("%s: malformed push: %s", self.name, exc)
            return web.Response(status=400, text="bad request")
        msg = decoded.message
        if msg is None:
            return self.success()
        if msg.event is not None and (not self.event_contacts or msg.event not in self.events):
            log.info("%s: event %r not taken as a contact", self.name, msg.event)
            return self.success()
        attachments = await self.fetch_attachments(msg)
        inbound = to_inbound(
            msg,
            adapter=self.name,
            scheme=self.scheme,
            received_at=received_at,
            attachments=attachments,
        )
        # one 4 s budget for everything before the answer (media download included)
        budget = max(ANSWER_WITHIN_S - (loop.time() - started), 0.5)
        try:
            receipt = await submit_within(self.ctx, inbound, budget)
        except Refused as exc:
            return exc.answer()
        if receipt is None:
            log.warning("%s: push not durable in time; letting the platform time out", self.name)
            await asyncio.sleep(max(0.0, started + PLATFORM_WAIT_S - loop.time()))
            return retry_later()
        if self.auto_ack and msg.event not in ("unsubscribe", "unfollow"):
            await self.ctx.events.stamp(
                receipt.contact_id,
                "acknowledged",
                self.ctx.clock.now_us(),
                self.name,
                {"via": "passive_reply"},
            )
            return decoded.passive(self.auto_ack)
        return self.success()


__all__ = [
    "ANSWER_WITHIN_S",
    "MAX_BODY",
    "PLATFORM_WAIT_S",
    "WINDOW",
    "AccessToken",
    "Decoded",
    "MessageCrypto",
    "PayloadError",
    "PushAdapter",
    "PushConfig",
    "PushMessage",
    "SignatureError",
    "TokenError",
    "call_json",
    "check_push",
    "parse_xml",
    "sha1_signature",
    "signature_matches",
    "submit_within",
    "text_reply_xml",
    "timestamp_within",
    "to_inbound",
]
