"""Structured logs (plain or JSON) with phone numbers and e-mail addresses masked."""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

from gateway.server.config import KNOWN_SECRETS

_PHONE = re.compile(
    r"(?<![0-9A-Za-z.-])(\+|%2[Bb])?(\d[\d\- ]{2,})(\d{4})(?!\d|[.-]\d)"
)
"""Digits that may be a phone number. Not when a ``.`` or a ``-<digit>`` follows or a ``.``
precedes: Asterisk unique ids (``1732981234.17``) and stream ids (``1732981234567-0``)."""
FIELDS = ("adapter", "contact_id", "event", "worker")
"""Structured fields a log call may pass as ``extra={...}``; JSON lines carry them as keys."""
_EMAIL = re.compile(r"([A-Za-z0-9])[A-Za-z0-9._%+\-]*@([A-Za-z0-9.\-]+\.[A-Za-z]{2,})")


def mask(text: str) -> str:
    """Redact known secrets, mask phone numbers (keep the last four digits) and e-mail users."""
    for secret in KNOWN_SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    text = _PHONE.sub(
        lambda m: (m.group(1) or "") + re.sub(r"\d", "*", m.group(2)) + m.group(3), text
    )
    return _EMAIL.sub(lambda m: f"{m.group(1)}***@{m.group(2)}", text)


class MaskingFilter(logging.Filter):
    """Rewrites each record's message with :func:`mask` before any handler sees it.

    It never raises: a log call whose arguments do not fit its format (a peer's value of an
    unexpected type reaching ``%d``) is logged as its format and arguments, masked, instead of
    turning the caller's request into an error.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        formatted = True
        try:
            message = record.getMessage()
        except Exception:
            formatted = False
            message = f"{_text(record.msg)} (arguments not matching: {_text(record.args)})"
        masked = mask(message)
        if masked != message or record.args or not formatted:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            try:
                record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
            except Exception:
                record.exc_text = "(exception not formattable)"
        return True


def _text(value: object) -> str:
    try:
        return repr(value) if not isinstance(value, str) else value
    except Exception:
        return object.__repr__(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["exception"] = mask(self.formatException(record.exc_info))
        return orjson.dumps(entry).decode()


def setup_logging(fmt: str = "plain", level: str = "INFO", worker: int | None = None) -> None:
    """Configure the root logger once: masking filter on the handler, plain or JSON lines;
    a worker of ``serve --workers N`` marks its lines (``w<K>``, JSON ``worker``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskingFilter())
    if worker is not None:
        handler.addFilter(_WorkerField(worker))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        mark = "" if worker is None else f" w{worker}"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s{mark} %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name, library_level in library_levels(root.level).items():
        logging.getLogger(name).setLevel(library_level)


class _WorkerField(logging.Filter):
    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def library_levels(root_level: int) -> dict[str, int]:
    """The levels ``setup_logging`` gives libraries' loggers that would write what the
    gateway keeps out of its logs (httpx logs each request URL, a Telegram bot token in it;
    the access log, query strings): WARNING, whatever the gateway's own level."""
    levels = {"aiohttp.access": logging.WARNING}
    for chatty in ("httpx", "httpcore", "telegram.ext.ExtBot"):
        levels[chatty] = max(logging.WARNING, root_level)
    return levels
