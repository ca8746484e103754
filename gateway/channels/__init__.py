"""Channel adapters, one folder per medium.

``BUILTIN`` lists the built-in channel types as ``module:attribute``; each attribute is a
``gateway.adapters.ChannelType``. Other packages register more through the
``gateway.channels`` entry-point group.
"""

BUILTIN: tuple[str, ...] = (
    "gateway.channels.chat.telegram:CHANNEL",
    "gateway.channels.chat.wechat:CHANNEL",
    "gateway.channels.chat.weibo:CHANNEL",
    "gateway.channels.web.app:CHANNEL",
    "gateway.channels.web.open311:CHANNEL",
    "gateway.channels.email.adapter:CHANNEL",
    "gateway.channels.sms.generic:CHANNEL",
    "gateway.channels.sms.kannel:CHANNEL",
    "gateway.channels.sms.smpp:CHANNEL",
    "gateway.channels.sms.cmpp:CHANNEL",
    "gateway.channels.sms.twilio:CHANNEL",
    "gateway.channels.voice.adapter:CHANNEL",
)
