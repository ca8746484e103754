"""Bearer tokens with scopes for the consumer API; every refusal is ``application/problem+json``."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import ApiKeys, is_loopback, presented_key
from gateway.config import ApiKey


class ApiProblem(Exception):
    """An error answered as ``application/problem+json``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def authorize(keys: ApiKeys, request: web.Request, scope: str) -> ApiKey | None:
    """Return the caller's key, or raise 401 (no or unknown token) / 403 (scope missing).

    ``admin`` grants every scope. With ``[api] open_to_loopback`` a loopback caller without a
    token is let in (the no-config try-it-here setup) and None is returned.
    """
    token = presented_key(request)
    if token is None:
        if keys.open_to_loopback and is_loopback(request):
            return None
        raise ApiProblem(
            401, "missing bearer token", {"WWW-Authenticate": 'Bearer realm="gateway"'}
        )
    key = keys.match(token)
    if key is None:
        raise ApiProblem(
            401,
            "unknown token",
            {"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'},
        )
    if scope not in key.scopes and "admin" not in key.scopes:
        raise ApiProblem(
            403,
            f"this token lacks the {scope!r} scope",
            {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
        )
    return key


def source_of(key: ApiKey | None) -> str:
    """The ``source`` written on events caused through the API."""
    return f"api:{key.name}" if key is not None and key.name else "api"
