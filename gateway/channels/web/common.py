"""What the web channels share: bounded multipart parts, a contact's event history."""

from __future__ import annotations

from aiohttp import BodyPartReader

from gateway.adapters import ContactLookup
from gateway.contact.attachments import AttachmentTooLarge
from gateway.contact.clock import Micros


async def read_part(part: BodyPartReader, limit: int) -> bytes:
    """Read one multipart part; raise AttachmentTooLarge past ``limit`` bytes."""
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise AttachmentTooLarge(f"{part.filename or part.name}: more than {limit} bytes")
    return bytes(data)


async def contact_history(contacts: ContactLookup, contact_id: str) -> dict[str, Micros]:
    """When each event type last happened to the contact."""
    out: dict[str, Micros] = {}
    for event in await contacts.events(contact_id):
        out[event.type] = max(out.get(event.type, event.at), event.at)
    return out
