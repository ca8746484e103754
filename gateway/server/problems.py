"""HTTP errors as ``application/problem+json`` (RFC 9457)."""

from __future__ import annotations

from http import HTTPStatus

import orjson
from aiohttp import web


class ApiProblem(Exception):
    """An error to answer as ``application/problem+json`` (see :func:`problem`)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def response(self) -> web.Response:
        return problem(self.status, self.detail, self.headers)


def problem_body(status: int, detail: str) -> bytes:
    """The ``application/problem+json`` body of ``problem``."""
    return orjson.dumps({"status": status, "title": HTTPStatus(status).phrase, "detail": detail})


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """Return an ``application/problem+json`` response."""
    return web.Response(
        status=status,
        body=problem_body(status, detail),
        content_type="application/problem+json",
        headers=headers,
    )
