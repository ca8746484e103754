"""What the web channels share: bounded body reads, a contact's event history."""

from __future__ import annotations

from typing import Any

from aiohttp import BodyPartReader

from gateway.attachments import AttachmentTooLarge
from gateway.clock import Micros


async def read_part(part: BodyPartReader, limit: int) -> bytes:
    """Read one multipart part; raise AttachmentTooLarge past ``limit`` bytes."""
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise AttachmentTooLarge(f"{part.filename or part.name}: more than {limit} bytes")
    return bytes(data)


async def contact_history(contacts: Any, contact_id: str) -> dict[str, Micros]:
    """When each event type last happened to the contact, if the lookup can tell.

    ``ContactLookup`` promises only ``get``; a lookup that also offers ``events(contact_id)``
    (the contact's events, oldest first) lets status lookups say ``responded`` and ``closed``.
    """
    lookup = getattr(contacts, "events", None)
    if lookup is None:
        return {}
    out: dict[str, Micros] = {}
    for event in await lookup(contact_id):
        kind = str(getattr(event, "type", ""))
        at = int(getattr(event, "at", 0))
        out[kind] = max(out.get(kind, at), at)
    return out
