"""E-mail: an SMTP listener (and the Postfix pipe) for inbound mail, replies through a relay."""

TYPES: tuple[str, ...] = ("gateway.channels.email.adapter:CHANNEL",)

MEDIUM: str = "gateway.channels.email.medium:MEDIUM"
"""The medium of this folder's types: its deadlines and report rows."""
