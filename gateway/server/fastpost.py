"""Requests answered from the connection, without aiohttp: the contact intake's hot path.

aiohttp's own machinery (its parser's message objects, a ``web.Request`` with its stream
reader and writer, a task and a coroutine chain per request, the response's preparation)
costs about as many instructions as everything the gateway does for a contact but the write
(docs/performance.md). A route registered with ``add_direct(..., fast=handler)`` is answered
by the connection's guard (``HttpGuard``) straight from the bytes when its request is the
plain case, and by aiohttp otherwise:

- taken: ``POST <path> HTTP/1.1`` for exactly a registered path, head and body whole in the
  chunk that brought the head (the rest of the chunk, pipelined requests, waits its turn),
  every header line well formed (RFC 9112: a token, a colon, visible characters), one
  ``Host`` (aiohttp refuses HTTP/1.1 without), one ``Content-Length``, none of the headers
  aiohttp refuses twice said twice, no ``Transfer-Encoding``, ``Content-Encoding``,
  ``Expect``, ``Upgrade``, nor ``Connection`` other than ``keep-alive``; and the handler
  takes it;
- left to aiohttp, as the bytes came: everything else, and every request the handler
  declines. A handler declines whatever it would refuse before writing anything (a bad key,
  a body over the bound, a body that does not parse), so every such error is aiohttp's own
  answer, the same bytes as before this path existed, and this module writes only answers of
  requests it has done: the success, and the errors of the write itself.

The connection's further bytes wait while its request is in hand (answers in order);
aiohttp's keep-alive clock is moved as if aiohttp had answered; the server's stop waits for
the requests in hand before it closes connections (``HttpServer.stop``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS

from gateway.server.problems import problem_body

if TYPE_CHECKING:
    from gateway.server.http import ApiGuard


@dataclass(frozen=True, slots=True)
class Post:
    """A request taken from the connection: the headers a handler may read, and the body."""

    body: bytes
    remote: str | None
    """The peer's address (aiohttp's ``request.remote``)."""
    authorization: str
    """``Authorization``, ``""`` if absent (decoded as aiohttp decodes header values)."""
    api_key: str | None
    """``X-API-Key``."""


Answer = tuple[int, bytes]
"""A status and the whole answer's bytes (``raw_answer``)."""
FastHandler = Callable[[Post], Awaitable[Answer] | None]
"""Takes a request (an awaitable of its answer: the request's work from there on) or
declines it (None: aiohttp answers it). Whatever it does before it returns must be free of
effects: a declined request is handled again from the start."""

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb":[\t\x20-\x7e\x80-\xff]*\r\n)*")
"""Header lines as RFC 9112 has them (no obs-fold, no control characters, CRLF)."""
_FIELD = re.compile(rb"(" + _TOKEN + rb"):[\t ]*([\t\x20-\x7e\x80-\xff]*?)[\t ]*\r\n")
_DECLINED = frozenset((
    b"transfer-encoding", b"content-encoding", b"expect", b"upgrade",
))
"""Headers that make aiohttp do more than read a body of ``Content-Length`` bytes."""
_ONCE = frozenset((
    b"host", b"content-length", b"connection", b"authorization", b"x-api-key",
    *(name.encode() for name in SINGLETON_HEADERS),
))
"""Headers read here, and those aiohttp refuses twice: one of them twice is aiohttp's."""


def split_post(data: bytes, line: int) -> tuple[dict[bytes, bytes], int, int] | None:
    """The headers this path reads (lower-case names), where the body starts and ends in
    ``data``, whose first ``line`` bytes are the request line; None: not the plain case."""
    end = data.find(b"\r\n\r\n", line - 2)
    if end < 0 or _FIELDS.fullmatch(data, line, end + 2) is None:
        return None
    read: dict[bytes, bytes] = {}
    for name, value in _FIELD.findall(data, line, end + 2):
        name = name.lower()
        if name in _DECLINED:
            return None
        if name in _ONCE:
            if name in read:
                return None  # said twice: aiohttp's to judge
            read[name] = value
    length = read.get(b"content-length")
    if b"host" not in read or length is None or not length.isdigit() or len(length) > 12:
        return None
    connection = read.get(b"connection")
    if connection is not None and connection.lower() != b"keep-alive":
        return None
    start = end + 4
    stop = start + int(length)
    if len(data) < stop:
        return None  # the body comes in later chunks
    return read, start, stop


_date_line: tuple[int, bytes] = (-1, b"")


def raw_answer(status_line: bytes, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole answer: ``status_line`` (``b"HTTP/1.1 202 Accepted"``), the headers aiohttp
    would send (``extra``'s lines, ``Content-Type``, ``Content-Length``, ``Date``,
    ``Server``) and ``body``."""
    global _date_line
    now = int(time.time())
    second, line = _date_line
    if second != now:
        line = b"Date: %s\r\nServer: %s\r\n" % (
            rfc822_formatted_time().encode(), SERVER_SOFTWARE.encode()
        )
        _date_line = (now, line)
    return b"%s\r\n%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status_line, extra, content_type, len(body), line, body
    )


def problem_answer(status: int, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """``problems.problem`` as a whole answer's bytes (``raw_answer``)."""
    extra = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in (headers or {}).items())
    line = b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())
    return raw_answer(line, b"application/problem+json", problem_body(status, detail), extra)


class FastPosts:
    """The server's routes answered from the connection, and their requests in hand."""

    def __init__(self, guard: ApiGuard, routes: dict[str, FastHandler]) -> None:
        self.guard = guard
        self.routes = {
            b"POST %s HTTP/1.1\r\n" % path.encode(): (path, handler)
            for path, handler in routes.items()
        }
        self.tasks: set[asyncio.Task[None]] = set()
        self.taken = 0
        """Requests taken from the connection so far (the rest went to aiohttp)."""
        self.closing = False
        """The server is stopping: every request goes to aiohttp, which refuses them."""

    def take(
        self, data: bytes, remote: Callable[[], str | None]
    ) -> tuple[Awaitable[Answer], int] | None:
        """The work of the request at the start of ``data`` and where it ends in ``data``, or
        None (aiohttp's to answer)."""
        if self.closing:
            return None
        line = data.find(b"\r\n") + 2
        found = self.routes.get(data[:line])
        if found is None:
            return None
        split = split_post(data, line)
        if split is None:
            return None
        started = time.perf_counter()
        read, start, stop = split
        authorization = read.get(b"authorization")
        api_key = read.get(b"x-api-key")
        post = Post(
            data[start:stop],
            remote(),
            authorization.decode("utf-8", "surrogateescape") if authorization else "",
            api_key.decode("utf-8", "surrogateescape") if api_key is not None else None,
        )
        path, handler = found
        try:
            work = handler(post)
        except Exception:
            return None  # aiohttp's path answers it as the error it is
        if work is None:
            return None
        self.taken += 1
        return self._run(work, path, started), stop

    async def _run(self, work: Awaitable[Answer], path: str, started: float) -> Answer:
        """``work``'s answer, with what ``ApiGuard.run`` does around a handler: an error of
        its answered as a problem, the request counted."""
        guard = self.guard
        status = 500
        try:
            try:
                status, answer = await work
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception as exc:
                status, detail, headers = guard.error_problem(exc, "POST", path)
                answer = problem_answer(status, detail, headers)
            return status, answer
        finally:
            if guard.metrics is not None:
                guard.count("POST", path, path, status, started)

    async def drain(self, within: float) -> None:
        """Refuse further requests; wait up to ``within`` seconds for those in hand."""
        self.closing = True
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=within)
