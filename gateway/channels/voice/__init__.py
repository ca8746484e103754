"""Voice: Asterisk FastAGI intake, AMI answer timing, missed-call callbacks, classic AGI."""

TYPES: tuple[str, ...] = ("gateway.channels.voice.adapter:CHANNEL",)
