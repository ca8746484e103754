"""API keys and shared secrets, always compared in constant time."""

from __future__ import annotations

import functools
import hmac
import ipaddress

from aiohttp import web

from gateway.server.config import ApiKey, ApiSection
from gateway.server.problems import ApiProblem


def secrets_equal(given: str | bytes, expected: str | bytes) -> bool:
    """Compare two secrets in constant time (for equal lengths)."""
    # a header value that is not UTF-8 arrives with surrogates (aiohttp decodes with
    # surrogateescape): its own bytes again, not an error
    a = given.encode("utf-8", "surrogateescape") if isinstance(given, str) else given
    b = expected.encode("utf-8", "surrogateescape") if isinstance(expected, str) else expected
    return hmac.compare_digest(a, b)


@functools.lru_cache(maxsize=1024)
def _loopback(remote: str) -> bool:
    """Parsing the address costs more than the rest of a key check: peers are few, keep it."""
    try:
        return ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def presented_key(request: web.Request) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    headers = request.headers
    return key_in(headers.get("Authorization", ""), headers.get("X-API-Key"))


def key_in(authorization: str, api_key: str | None) -> str | None:
    """The key of a request's ``Authorization`` (``""`` if none) and ``X-API-Key`` headers."""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return api_key


class ApiKeys:
    """The configured API keys and their scopes."""

    def __init__(self, section: ApiSection) -> None:
        self.keys = section.keys
        self.open_to_loopback = section.open_to_loopback

    def match(self, token: str) -> ApiKey | None:
        """Return the key equal to ``token``; every key is compared, so timing tells nothing."""
        found = None
        for key in self.keys:
            if secrets_equal(token, key.key.reveal()) and found is None:
                found = key
        return found

    def authorize(self, request: web.Request, scope: str) -> ApiKey | None:
        """Return the caller's key, or raise ``ApiProblem`` 401 (no or unknown key) / 403 (scope).

        ``admin`` grants every scope. With ``open_to_loopback`` a loopback caller without a key
        is let in (the no-config try-it-here setup) and None is returned.
        """
        return self.check(presented_key(request), request.remote, scope)

    def check(self, token: str | None, remote: str | None, scope: str) -> ApiKey | None:
        """``authorize`` for the key ``token`` presented from the address ``remote``."""
        if token is None:
            if self.open_to_loopback and _loopback(remote or ""):
                return None
            raise ApiProblem(
                401, "missing API key", {"WWW-Authenticate": 'Bearer realm="gateway"'}
            )
        key = self.match(token)
        if key is None:
            raise ApiProblem(
                401,
                "unknown API key",
                {"WWW-Authenticate": 'Bearer realm="gateway", error="invalid_token"'},
            )
        if scope not in key.scopes and "admin" not in key.scopes:
            raise ApiProblem(
                403,
                f"this key lacks the {scope!r} scope",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )
        return key


def source_of(key: ApiKey | None) -> str:
    """Who acted through the API: ``api:<key name>``, or ``api`` (adapter, event source)."""
    return f"api:{key.name}" if key is not None and key.name else "api"
