"""Chat channels: Telegram, WeChat Official Accounts and Weibo fan service private messages."""

TYPES: tuple[str, ...] = (
    "gateway.channels.chat.telegram:CHANNEL",
    "gateway.channels.chat.wechat:CHANNEL",
    "gateway.channels.chat.weibo:CHANNEL",
)
