"""aiosmtpd's lines of each command (``mail.log``, debug and info) are asked of the logger
before their arguments are masked: logged as the library logs them when the level is on, no
work at all when it is off (the gateway's own setting, WARNING)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import aiosmtpd.smtp
import pytest

import gateway.channels.email.smtp  # noqa: F401  (installs the gateway's sanitized_log)

LOG = logging.getLogger("mail.log")


@pytest.fixture
def mail_log() -> Iterator[logging.Logger]:
    level = LOG.level
    yield LOG
    LOG.setLevel(level)


def test_lines_logged_when_the_level_is_on_are_the_librarys(
    mail_log: logging.Logger, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.DEBUG, logger="mail.log")
    aiosmtpd.smtp.sanitized_log(mail_log.debug, "readline: %r", b"AUTH PLAIN c2VjcmV0\r\n")
    aiosmtpd.smtp.sanitized_log(mail_log.info, "%r >> %r", ("192.0.2.1", 25), b"NOOP\r\n")
    assert [r.getMessage() for r in caplog.records] == [
        "readline: b'AUTH PLAIN ********\\r\\n'",  # the library's masking
        "('192.0.2.1', 25) >> b'NOOP\\r\\n'",
    ]


def test_nothing_is_masked_for_a_line_not_logged(
    mail_log: logging.Logger, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    masked: list[bytes] = []
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda text: masked.append(text) or text)
    caplog.set_level(logging.WARNING, logger="mail.log")
    aiosmtpd.smtp.sanitized_log(mail_log.debug, "readline: %r", b"MAIL FROM:<a@b>\r\n")
    aiosmtpd.smtp.sanitized_log(mail_log.info, "%r >> %r", ("192.0.2.1", 25), b"NOOP\r\n")
    assert masked == []
    assert caplog.records == []
    aiosmtpd.smtp.sanitized_log(mail_log.warning, "%r", b"RCPT TO:<a@b>\r\n")  # other levels
    assert masked == [b"RCPT TO:<a@b>\r\n"]
    assert len(caplog.records) == 1



def test_the_librarys_own_function_is_wrapped_once():
    """The wrapper holds aiosmtpd's own function (a second import of the module takes that
    one from it, so a line is never checked twice)."""
    wrapped = aiosmtpd.smtp.sanitized_log.__wrapped__
    assert wrapped.__module__ == "aiosmtpd.smtp" and not hasattr(wrapped, "__wrapped__")
