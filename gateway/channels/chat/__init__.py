"""Chat channels: Telegram, WeChat Official Accounts and Weibo fan service private messages."""

TYPES: tuple[str, ...] = (
    "gateway.channels.chat.telegram:CHANNEL",
    "gateway.channels.chat.wechat:CHANNEL",
    "gateway.channels.chat.weibo:CHANNEL",
)

SENDER_CONTACTS = 120
"""The chat types' floor for ``[limits] sender_contacts`` (a minute): one citizen's chat is many
short messages, and each photo of an album is an update of its own (Telegram: up to 10); a
refused WeChat push is retried three times within about 15 s and then dropped by WeChat, so a
chat limit must stop floods only, never a person typing (docs/reliability.md)."""

MEDIUM: str = "gateway.channels.chat.medium:MEDIUM"
"""The medium of this folder's types: its deadlines and report rows."""
