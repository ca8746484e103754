"""HTTP errors as ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """Return an ``application/problem+json`` response."""
    return web.Response(
        status=status,
        body=orjson.dumps({"status": status, "title": HTTPStatus(status).phrase, "detail": detail}),
        content_type="application/problem+json",
        headers=headers,
    )
