"""Channel adapters, one folder per medium, all of one shape (docs/adapters.md):

- the folder's ``__init__.py`` registers its channel types in ``TYPES`` (``module:attribute``,
  each attribute a ``gateway.adapters.ChannelType``);
- a channel type's adapter lives in the module named after its provider or protocol
  (``sms/kannel.py``, ``chat/telegram.py``), or in ``adapter.py`` when the medium has one type
  whose adapter joins several protocol modules (``email/``, ``voice/``);
- what several modules of the folder share is in its ``common.py``; a wire protocol spoken by
  several providers has its own module (``sms/link.py``, ``chat/officialaccount.py``);
- what every medium shares is in ``gateway/channels/common.py`` (the HTTP submit path).

``BUILTIN`` lists the built-in channel types of every folder and ``BUILTIN_MEDIA`` their media
(each folder's ``MEDIUM``); other packages register more through the ``gateway.channels``
entry-point group.
"""

from gateway.channels import chat, email, sms, voice, web

BUILTIN: tuple[str, ...] = (*chat.TYPES, *web.TYPES, *email.TYPES, *sms.TYPES, *voice.TYPES)

BUILTIN_MEDIA: tuple[str, ...] = (voice.MEDIUM, sms.MEDIUM, chat.MEDIUM, web.MEDIUM, email.MEDIUM)
"""The built-in media (``gateway.contact.media.Medium``), in the order of the report's rows; a
channel type of another medium declares it as ``ChannelType.medium``."""
