"""Voice: Asterisk FastAGI intake, AMI answer timing, missed-call callbacks, classic AGI."""

TYPES: tuple[str, ...] = ("gateway.channels.voice.adapter:CHANNEL",)

MEDIUM: str = "gateway.channels.voice.medium:MEDIUM"
"""The medium of this folder's types: its deadlines and report rows."""
