"""Bounded reads of request bodies and multipart parts for the web channels."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from gateway.attachments import AttachmentTooLarge


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """Read the whole body; None when it is longer than ``limit`` bytes.

    ``StreamReader.read(n)`` returns what has arrived so far, not ``n`` bytes: loop to the end.
    """
    data = bytearray()
    while chunk := await request.content.readany():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def read_part(part: BodyPartReader, limit: int) -> bytes:
    """Read one multipart part; raise AttachmentTooLarge past ``limit`` bytes."""
    data = bytearray()
    while chunk := await part.read_chunk(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise AttachmentTooLarge(f"{part.filename or part.name}: more than {limit} bytes")
    return bytes(data)
