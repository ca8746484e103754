"""The ``smtp`` channel type: the gateway is the public mailbox's own SMTP server.

Inbound: listener (smtp.py) -> normalize.py -> raw message and files kept (held in Redis up to
64 KiB, their files written after the answer; larger ones written first) -> Intake, and 250
only after the receipt. Outbound: replies and optional acknowledgements go through
the configured relay (relay.py) with threading headers and a Reply-To carrying the contact id.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import zoneinfo
from datetime import datetime
from string import Template
from typing import Any

from gateway.adapters import AdapterContext, ChannelType, Receipt, SendError, SendReceipt
from gateway.channels.email.common import EmailConfig
from gateway.channels.email.normalize import Envelope, Normalized, Options, normalize
from gateway.channels.email.relay import (
    OutFile,
    Relay,
    build_message,
    own_message_id,
    reply_subject,
    tagged_address,
)
from gateway.channels.email.smtp import Handler, Listener, masked, trace_headers
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.clock import MICROS_PER_SECOND
from gateway.records import Attachment, Contact, Inbound, Reply, short_ref
from gateway.server.admission import busy, refuse
from gateway.server.config import AdapterSettings, ConfigError

log = logging.getLogger(__name__)

INLINE_PARSE_LIMIT = 64 * 1024
"""Messages up to this size, with few MIME parts, are parsed on the event loop: ~0.2 ms for
2 KB; the most hostile 64 KB found takes ~80 ms. Larger ones go to a thread."""
INLINE_PARSE_PARTS = 32


class EmailAdapter:
    """One public mailbox: SMTP listener in, relay out."""

    channel = "email"

    def __init__(self, ctx: AdapterContext, config: EmailConfig) -> None:
        self.name = ctx.name
        self.ctx = ctx
        self.config = config
        self.options = Options(config.regional_fallback, config.max_text_chars)
        self.handler = Handler(
            config, self.accept, busy=lambda: busy(ctx.intake), refused=lambda: refuse(ctx.intake)
        )
        self.listener = Listener(
            config, self.handler, ctx.metrics, ctx.settings.limits.max_connections
        )
        self.relay = Relay(config.relay, self.listener.hostname)
        self.port = 0
        self.default_mailbox = (
            config.mailboxes[0] if config.mailboxes else f"postmaster@{config.domains[0]}"
        )
        self._acks: set[asyncio.Task[None]] = set()
        self._ack_times: dict[str, collections.deque[float]] = {}
        self._zone = zoneinfo.ZoneInfo(config.ack.timezone)

    async def start(self) -> None:
        await self.listener.start()
        self.port = self.listener.port
        log.info("smtp %s listening on %s:%d", self.name, self.config.listen.host, self.port)

    async def stop(self) -> None:
        await self.listener.stop()
        if self._acks:
            _, pending = await asyncio.wait(set(self._acks), timeout=10)
            for task in pending:
                task.cancel()

    # ------------------------------------------------------------------ inbound

    async def accept(self, raw: bytes, envelope: Envelope) -> str:
        """Make one received message durable; return its contact id (raises IntakeUnavailable)."""
        received_at = self.ctx.clock.now_us()
        raw = trace_headers(envelope, self.listener.hostname, received_at) + raw
        # The raw message and the files of a small mail go into Redis with the contact (one
        # durable write) and to their own files after the 250; larger ones are written first
        # (the store's group commit: a thread, one round of fsync for the files of concurrent
        # sessions), see AttachmentStore.plan. Parsing stays on the loop unless the message is
        # large: a parsing thread would hold the GIL for whole switch intervals and stall
        # every other session.
        store = self.ctx.attachments
        raw_item = (raw, "message.eml", "message/rfc822")
        if len(raw) > INLINE_PARSE_LIMIT or raw.count(b"\n--") > INLINE_PARSE_PARTS:
            result = await asyncio.to_thread(normalize, raw, envelope, self.options)
        else:
            result = normalize(raw, envelope, self.options)
        plan = store.plan([raw_item, *((p.data, p.name, p.content_type) for p in result.parts)])
        raw_result, *stored = await store.write_first(plan)
        if isinstance(raw_result, Exception):
            raise raw_result
        raw_file = raw_result
        files: list[tuple[str | None, bool, Attachment]] = []
        skipped: list[str] = []
        for part, outcome in zip(result.parts, stored, strict=True):
            if isinstance(outcome, AttachmentTooLarge):  # the raw message still holds it
                skipped.append(f"{part.name}: too large for the attachment store")
            elif isinstance(outcome, Exception):
                raise outcome
            else:
                files.append((part.content_id, part.inline, outcome))
        meta: dict[str, Any] = {
            "smtp": {
                "mail_from": envelope.mail_from,
                "rcpt_to": list(envelope.rcpt_tos),
                "peer": envelope.peer,
                "helo": envelope.helo,
            },
            "raw": {"ref": raw_file.ref, "sha256": raw_file.sha256, "size": raw_file.size},
            **result.meta,
        }
        inline = {cid: a.sha256 for cid, is_inline, a in files if cid and is_inline}
        if inline:
            meta["inline"] = inline
        if skipped:
            meta["skipped_files"] = skipped
        inbound = Inbound(
            channel="email",
            adapter=self.name,
            external_id=result.external_id,
            sender=result.sender,
            recipient=result.recipient,
            received_at=received_at,
            text=result.text,
            subject=result.subject,
            language=result.language,
            attachments=tuple(a for _, _, a in files),
            thread=result.thread,
            origin_at=result.origin_at,
            meta=meta,
        )
        try:
            receipt = await self.ctx.intake.submit(inbound, held=plan.held)
        except BaseException:  # refused: what may have reached Redis is written and let go
            await store.settle(plan, in_redis=True)
            raise
        await store.settle(plan, receipt.status == "enqueued")
        if result.parse_error:
            log.warning(
                "smtp: message %s stored unparsed: %s", receipt.contact_id, result.parse_error
            )
        if receipt.status != "duplicate" and self._should_acknowledge(result):
            task = asyncio.get_running_loop().create_task(self._acknowledge(receipt, result))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)
        return receipt.contact_id

    # ------------------------------------------------------------------ outbound

    @staticmethod
    def _reply_address(meta: dict[str, Any], sender: str) -> str:
        candidate = meta.get("reply_to")
        address = candidate if isinstance(candidate, str) and candidate else sender
        if "@" not in address or any(c in address for c in "\r\n<>,; "):
            return ""
        return address

    def _mailbox_for(self, recipient: str) -> str:
        return recipient if self.handler.policy.accepts(recipient) else self.default_mailbox

    def _should_acknowledge(self, result: Normalized) -> bool:
        ack = self.config.ack
        if not ack.enabled or result.auto_generated or result.parse_error:
            return False
        to = self._reply_address(result.meta, result.sender.address)
        if not to or self.handler.policy.accepts(to):
            return False  # never answer ourselves: that is how loops start
        return True

    async def _admit(self, to: str) -> bool:
        """At most ``per_sender_limit`` acknowledgements to one address per window, counted in
        shared state by every instance of the fleet (and across restarts); only while Redis is
        away does each process count on its own."""
        ack = self.config.ack
        address = to.lower()
        try:
            return await self.ctx.state.admit(
                f"ack:{await self.ctx.state.private(address)}",  # no address in key names
                ack.per_sender_limit,
                float(ack.per_sender_window),
            )
        except Exception as exc:
            log.info("smtp: acknowledgement limit counted locally (%s)", type(exc).__name__)
        now = asyncio.get_running_loop().time()
        times = self._ack_times.setdefault(address, collections.deque())
        while times and now - times[0] > ack.per_sender_window:
            times.popleft()
        if len(times) >= ack.per_sender_limit:
            return False
        times.append(now)
        if len(self._ack_times) > 10_000:
            self._ack_times = {k: v for k, v in self._ack_times.items() if v}
        return True

    async def _acknowledge(self, receipt: Receipt, result: Normalized) -> None:
        ack = self.config.ack
        contact_id = receipt.contact_id
        to = self._reply_address(result.meta, result.sender.address)
        if not await self._admit(to):
            log.info("smtp: acknowledgement to %s skipped (per-sender limit)", masked(to))
            return
        mailbox = self._mailbox_for(result.recipient)
        due = datetime.fromtimestamp(receipt.deadline.due_at / MICROS_PER_SECOND, self._zone)
        fields = {
            "reference": short_ref(contact_id),
            "contact_id": contact_id,
            "subject": result.subject or "",
            "mailbox": mailbox,
            "due": due.strftime("%Y-%m-%d %H:%M %Z"),
        }
        message_id = own_message_id("ack", contact_id, mailbox.rpartition("@")[2])
        threading = _threading(result.external_id, result.meta.get("references"))
        message = build_message(
            sender=self.config.reply_from or mailbox,
            to=to,
            subject=reply_subject(Template(ack.subject).safe_substitute(fields)),
            text=Template(ack.text).safe_substitute(fields),
            message_id=message_id,
            reply_to=tagged_address(mailbox, contact_id),
            date_us=self.ctx.clock.now_us(),
            in_reply_to=_message_id(threading, result.external_id),
            references=threading,
            auto_replied=True,
        )
        try:
            # RFC 3834: automatic answers go out with the null sender, so they never bounce back.
            await self.relay.deliver(message, sender="", recipient=to)
        except SendError as exc:
            log.warning("smtp: acknowledgement of %s not sent: %s", contact_id, exc)
            return
        try:
            await self.ctx.events.stamp(
                contact_id,
                "acknowledged",
                self.ctx.clock.now_us(),
                self.name,
                {"message_id": message_id},
            )
        except Exception as exc:
            log.warning("smtp: acknowledgement of %s not stamped: %s", contact_id, exc)

    async def send(self, contact: Contact, reply: Reply) -> SendReceipt:
        """Mail ``reply`` to the citizen, threaded under their message."""
        to = self._reply_address(contact.meta, contact.sender.address)
        if not to:
            raise SendError("contact has no usable reply address", retryable=False)
        files: list[OutFile] = []
        for a in reply.attachments:
            try:
                data = await self.ctx.attachments.load(a.sha256)
            except (OSError, ValueError) as exc:
                raise SendError(f"attachment {a.sha256[:12]} unavailable", retryable=False) from exc
            files.append(OutFile(a.name, a.content_type, data))
        mailbox = self._mailbox_for(contact.recipient)
        message_id = own_message_id("reply", contact.id, mailbox.rpartition("@")[2])
        threading = _threading(contact.external_id, contact.meta.get("references"))
        subject = Template(self.config.reply_subject).safe_substitute(
            subject=contact.subject or "", reference=short_ref(contact.id), contact_id=contact.id
        )
        message = build_message(
            sender=self.config.reply_from or mailbox,
            to=to,
            subject=reply_subject(subject),
            text=reply.text,
            message_id=message_id,
            reply_to=tagged_address(mailbox, contact.id),
            date_us=self.ctx.clock.now_us(),
            in_reply_to=_message_id(threading, contact.external_id),
            references=threading,
            files=tuple(files),
        )
        await self.relay.deliver(message, sender=mailbox, recipient=to)
        return SendReceipt(external_id=message_id, detail={"to": masked(to)})


def _threading(external_id: str, references: object) -> tuple[str, ...]:
    """References for an answer: the message's own, then its Message-ID (RFC 5322 3.6.4)."""
    refs = [r for r in references if isinstance(r, str)] if isinstance(references, list) else []
    if external_id.startswith("<") and external_id.endswith(">"):
        refs.append(external_id)
    return tuple(refs[-10:])


def _message_id(threading: tuple[str, ...], external_id: str) -> str | None:
    return external_id if threading and threading[-1] == external_id else None


def _check(config: EmailConfig, key: str, settings: AdapterSettings) -> None:
    config.check(key)
    if config.max_message_size > settings.intake.max_attachment:
        raise ConfigError(
            [(f"{key}.max_message_size", "larger than [intake] max_attachment: raw messages "
              "that size could not be kept (raise max_attachment too)")]
        )


CHANNEL: ChannelType[EmailConfig] = ChannelType(
    name="smtp",
    channel="email",
    config=EmailConfig,
    factory=EmailAdapter,
    check=_check,
    example={"listen": "127.0.0.1:0", "mailboxes": ["12345@hotline.example.gov.cn"]},
)
