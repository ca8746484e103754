"""Outbound mail: replies and acknowledgements through the configured SMTP relay."""

from __future__ import annotations

import logging
import re
import secrets
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formataddr, formatdate, parseaddr

import aiosmtplib

from gateway.adapters import SendError
from gateway.channels.email.common import RelayConfig
from gateway.contact.clock import MICROS_PER_SECOND, Micros
from gateway.server.supervise import Backoff, retry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OutFile:
    """A file to attach to an outgoing message."""

    name: str
    content_type: str
    data: bytes


def own_message_id(kind: str, contact_id: str, domain: str) -> str:
    """Return a Message-ID that names the contact, so answers to it thread back (normalize.py)."""
    return f"<{kind}.{contact_id}.{secrets.token_hex(6)}@{domain}>"


def tagged_address(mailbox: str, contact_id: str) -> str:
    """Return ``local+<contact id>@domain`` for a mailbox ``local@domain``."""
    local, _, domain = mailbox.rpartition("@")
    local = local.split("+", 1)[0]
    return f"{local}+{contact_id}@{domain}"


_RE_PREFIX = re.compile(r"^(?:\s*(?:re|aw|回复|答复)\s*[:：]\s*)+", re.IGNORECASE)


def reply_subject(template_result: str) -> str:
    """Collapse repeated reply prefixes: ``Re: Re: x`` -> ``Re: x``."""
    match = _RE_PREFIX.match(template_result)
    if match and match.end() < len(template_result):
        return "Re: " + template_result[match.end() :]
    return template_result.strip() or "Re:"


def build_message(
    *,
    sender: str,
    to: str,
    subject: str,
    text: str,
    message_id: str,
    reply_to: str,
    date_us: Micros,
    in_reply_to: str | None = None,
    references: tuple[str, ...] = (),
    auto_replied: bool = False,
    files: tuple[OutFile, ...] = (),
) -> EmailMessage:
    """Compose one outgoing message (UTF-8 text, optional attachments)."""
    msg = EmailMessage(policy=policy.SMTP)
    name, addr = parseaddr(sender)
    msg["From"] = formataddr((name, addr)) if name else addr
    msg["To"] = to
    msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")[:900]
    msg["Date"] = formatdate(date_us / MICROS_PER_SECOND, usegmt=True)
    msg["Message-ID"] = message_id
    msg["Reply-To"] = Address(addr_spec=reply_to)
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
    if references:
        msg["References"] = " ".join(references)
    if auto_replied:
        msg["Auto-Submitted"] = "auto-replied"
        msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(text, charset="utf-8")
    for f in files:
        maintype, _, subtype = f.content_type.partition("/")
        if not subtype or maintype == "multipart":
            maintype, subtype = "application", "octet-stream"
        msg.add_attachment(f.data, maintype=maintype, subtype=subtype, filename=f.name)
    return msg


_ADDRESS = re.compile(r"([^\s<>@\"':;,]+)@([^\s<>@\"':;,]+)")


def scrub(text: str) -> str:
    """Mask e-mail addresses in a relay's answer before it reaches logs and events."""
    return _ADDRESS.sub(lambda m: f"{m.group(1)[:1]}***@{m.group(2)}", text)


def _code(exc: BaseException) -> int | None:
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        return min(codes) if codes else None
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code
    return None


class _Transient(Exception):
    """A try that failed in a way another try may not (its reason, scrubbed)."""


class Relay:
    """Sends through one SMTP relay; retries 4xx and network errors with backoff."""

    def __init__(self, config: RelayConfig, local_hostname: str | None = None) -> None:
        self.config = config
        self.local_hostname = config.helo or local_hostname

    @property
    def configured(self) -> bool:
        return bool(self.config.host)

    async def deliver(self, message: EmailMessage, sender: str, recipient: str) -> None:
        """Send ``message``; raise SendError, retryable unless the relay answered 5xx."""
        if not self.configured:
            raise SendError("no SMTP relay configured", retryable=False)
        c = self.config
        attempts = max(1, c.attempts)
        backoff = Backoff(float(c.backoff), float("inf"), jitter=0.0)

        def note(attempt: int, exc: BaseException, pause: float) -> None:
            log.info("relay: attempt %d/%d failed (%s)", attempt, attempts, exc)

        try:
            await retry(lambda: self._attempt(message, sender, recipient), on=_Transient,
                        backoff=backoff, attempts=attempts, note=note)
        except _Transient as exc:
            log.info("relay: attempt %d/%d failed (%s)", attempts, attempts, exc)
            raise SendError(f"relay unavailable: {exc}", retryable=True,
                            retry_after_s=backoff.nth(attempts)) from exc

    async def _attempt(self, message: EmailMessage, sender: str, recipient: str) -> None:
        """One try: ``SendError`` when the relay refuses for good, ``_Transient`` (a 4xx, a
        timeout, no connection) when another try may pass."""
        try:
            await self._send_once(message, sender, recipient)
        except aiosmtplib.SMTPException as exc:
            code = _code(exc)
            text = scrub(str(getattr(exc, "message", "")))[:300]
            reason = f"{code} {text}" if code else type(exc).__name__
            if code is not None and 500 <= code < 600:
                raise SendError(f"relay refused: {reason}", retryable=False) from exc
            if isinstance(exc, aiosmtplib.SMTPNotSupported) or (
                code is None and "not supported" in str(exc).lower()
            ):  # no STARTTLS, AUTH or SMTPUTF8 there: trying again cannot help
                raise SendError(f"relay cannot: {scrub(str(exc))}", retryable=False) from exc
            raise _Transient(reason) from exc
        except (TimeoutError, OSError) as exc:
            raise _Transient(type(exc).__name__) from exc

    async def _send_once(self, message: EmailMessage, sender: str, recipient: str) -> None:
        c = self.config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=c.tls == "tls",
            start_tls=c.tls == "starttls",
            validate_certs=c.validate_certs,
            cert_bundle=str(c.ca_file) if c.ca_file else None,
            timeout=float(c.timeout),
            local_hostname=self.local_hostname,
            username=c.username or None,
            password=c.password.reveal() if c.password else None,
        )
        async with client:
            await client.send_message(message, sender=sender, recipients=[recipient])
