"""SMS channel: Kannel, Twilio, a generic webhook, SMPP and CMPP carrier links, with shared
segments and concatenation."""

TYPES: tuple[str, ...] = (
    "gateway.channels.sms.generic:CHANNEL",
    "gateway.channels.sms.kannel:CHANNEL",
    "gateway.channels.sms.smpp:CHANNEL",
    "gateway.channels.sms.cmpp:CHANNEL",
    "gateway.channels.sms.twilio:CHANNEL",
)

MEDIUM: str = "gateway.channels.sms.medium:MEDIUM"
"""The medium of this folder's types: its deadlines and report rows."""
