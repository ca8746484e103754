"""Chat channels: Telegram, WeChat Official Accounts and Weibo fan service private messages."""
