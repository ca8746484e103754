"""Requests answered from the connection, without aiohttp: the contact intake's hot path.

aiohttp's own machinery (its parser's message objects, a ``web.Request`` with its stream
reader and writer, a task and a coroutine chain per request, the response's preparation)
costs about as many instructions as everything the gateway does for a contact but the write
(docs/performance.md). A route registered with ``add_direct(..., fast=handler)`` is answered
by the connection's guard (``HttpGuard``) straight from the bytes when its request is the
plain case, and by aiohttp otherwise:

- taken: a chunk that is exactly one ``POST <path> HTTP/1.1`` for a registered path, head
  and body whole, in the plain case (``frame``: header lines as RFC 9112 writes them within
  aiohttp's bounds, one ``Host``, one ``Content-Length``, none of the headers aiohttp
  refuses twice said twice, no ``Transfer-Encoding``, ``Content-Encoding``, ``Expect``,
  ``Upgrade``, nor ``Connection`` but ``keep-alive``), arriving while aiohttp waits for a
  request with no byte of one begun (``HttpGuard._between``), and the handler takes it;
- left to aiohttp, as the bytes came: everything else, and every request the handler
  declines. A handler declines whatever it would refuse before writing anything (a bad key,
  a body over the bound, a body that does not parse), so every such error is aiohttp's own
  answer, the same bytes as before this path existed, and this module writes only answers of
  requests it has done: the success, and the errors of the write itself.

The connection's further bytes wait while its request is in hand (answers in order);
aiohttp's keep-alive clock is moved as if aiohttp had answered; the server's stop waits for
the requests in hand before it closes connections (``HttpServer.stop``). A test feeds
generated heads to ``frame`` and to aiohttp's parser: whatever this path takes, aiohttp
reads as the same one request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS

from gateway.server.metrics import DeferredCounter
from gateway.server.problems import problem_body

log = logging.getLogger(__name__)

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

_FIELD = re.compile(rb"\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):([\t\x20-\x7e\x80-\xff]*)\r")
"""A header line as RFC 9112 has it (a token, a colon, visible characters and blanks; no
obs-fold, no control character), read from the LF before it to its CR."""
_DECLINE, _ONCE = 0, 1
_HEADERS = {
    **{name.encode(): _ONCE for name in SINGLETON_HEADERS},
    # read here
    b"host": _ONCE, b"content-length": _ONCE, b"connection": _ONCE,
    b"authorization": _ONCE, b"x-api-key": _ONCE,
    # they make aiohttp do more than read a body of Content-Length bytes
    b"transfer-encoding": _DECLINE, b"content-encoding": _DECLINE, b"expect": _DECLINE,
    b"upgrade": _DECLINE,
}
"""The headers this path looks at: those it declines a request for, and those it reads or
aiohttp refuses twice (either said twice: aiohttp's to judge)."""


MAX_HEAD = 8190
"""Header bytes a head may have here (aiohttp refuses a field over 8190 bytes)."""
MAX_FIELDS = 100
"""Header lines a head may have here (aiohttp refuses more than 128)."""
_REQUEST_LINE = re.compile(rb"(?:GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) [!-~]+ HTTP/1\.1\r\n")
"""A request line whose message aiohttp frames by its headers alone (not ``CONNECT``: its
parser takes what follows that head for a tunnel, whatever ``Content-Length`` says)."""


def frame(data: bytes, line: int) -> tuple[dict[bytes, bytes], int, int] | None:
    """One HTTP/1.1 request as aiohttp reads it, at the start of ``data`` (whose first ``line``
    bytes are its request line): the headers this path reads (lower-case names) and where its
    body starts and ends; None when the head is not whole in ``data``, not plain (every
    header line as RFC 9112 writes it, within ``MAX_HEAD`` bytes and ``MAX_FIELDS`` lines,
    one ``Host``, at most one ``Content-Length``, none of the headers aiohttp refuses twice
    said twice, no ``Transfer-Encoding``, ``Content-Encoding``, ``Expect``, ``Upgrade``, no
    ``Connection`` but ``keep-alive``), or its body is not whole in ``data``."""
    end = data.find(b"\r\n\r\n", line - 2, line + MAX_HEAD)
    if end < 0:
        return None
    # every line between the request line's LF and the last header line's CR is a header
    # line: as many of them as LFs and as CRs there (no bare CR or LF, no line that is not
    # one). The value's class has no CR: the match never looks back (linear in the head).
    fields = _FIELD.findall(data, line - 1, end + 1)
    lines = len(fields)
    if (lines > MAX_FIELDS or data.count(b"\n", line - 1, end + 1) != lines
            or data.count(b"\r", line, end + 1) != lines):
        return None
    read: dict[bytes, bytes] = {}
    for name, value in fields:
        name = name.lower()
        kind = _HEADERS.get(name)
        if kind is None:
            continue
        if kind == _DECLINE or name in read:
            return None
        read[name] = value.strip(b" \t")
    if b"host" not in read:
        return None
    connection = read.get(b"connection")
    if connection is not None and connection.lower() != b"keep-alive":
        return None
    start = end + 4
    length = read.get(b"content-length")
    if length is None:
        return read, start, start
    if not length.isdigit() or len(length) > 12:
        return None
    stop = start + int(length)
    if len(data) < stop:
        return None  # the body comes in later chunks
    return read, start, stop


def split_post(data: bytes, line: int) -> tuple[dict[bytes, bytes], int, int] | None:
    """``frame`` of a request with a ``Content-Length`` (the plain case of a ``POST``)."""
    framed = frame(data, line)
    if framed is None or b"content-length" not in framed[0]:
        return None
    return framed


def one_request(data: bytes) -> bool:
    """``data`` is exactly one whole plain HTTP/1.1 request (``frame``): after it a parser
    that was between requests is between requests again."""
    line = data.find(b"\r\n") + 2
    if line < 2 or _REQUEST_LINE.fullmatch(data, 0, line) is None:
        return False
    framed = frame(data, line)
    return framed is not None and framed[2] == len(data)


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


Route = tuple[str, FastHandler, tuple[DeferredCounter, DeferredCounter] | None]
"""A route's path, its handler, and its counters (taken, failed) when there are metrics."""


class Connection(Protocol):
    """The connection a request was taken from (``connguard.HttpGuard``)."""

    def peer(self) -> str | None:
        """The peer's address, as aiohttp's ``request.remote``."""

    def send(self, answer: bytes) -> None:
        """Write the answer of the request taken, unless the connection is gone."""

    def answered(self) -> None:
        """The request taken is answered: the bytes received since are the connection's next."""

    def abandon(self) -> None:
        """The request taken has no answer: close the connection, and drop what came since."""


class FastPosts:
    """The server's routes answered from the connection, and their requests in hand."""

    def __init__(self, api: ApiGuard, routes: dict[str, FastHandler]) -> None:
        self.api = api
        metrics = api.metrics
        self.routes: dict[bytes, Route] = {
            b"POST %s HTTP/1.1\r\n" % path.encode(): (
                path, handler,
                (metrics.deferred_counter(metrics.http_fast.labels(path, "taken")),
                 metrics.deferred_counter(metrics.http_fast.labels(path, "failed")))
                if metrics is not None else None,
            )
            for path, handler in routes.items()
        }
        self.tasks: set[asyncio.Task[None]] = set()
        """The requests in hand."""
        self.taken = 0
        """Requests taken from the connection so far (the rest went to aiohttp)."""
        self.failed = 0
        """Requests whose handler raised when taking them (aiohttp answered them)."""
        self.closing = False
        """The server is stopping: no request is taken (aiohttp has them until it stops)."""

    def route(self, data: bytes) -> Route | None:
        """The route of ours whose request line ``data`` begins with, while the server runs."""
        if self.closing:
            return None
        return self.routes.get(data[:data.find(b"\r\n") + 2])

    def take(self, data: bytes, route: Route, conn: Connection) -> bool:
        """Take the request of ``route`` that is the whole of ``data``, which ``conn``
        received (its work under way, ``conn`` answers it); False: aiohttp's."""
        path, handler, counts = route
        split = split_post(data, data.find(b"\r\n") + 2)
        if split is None:
            return False
        read, start, stop = split
        if stop != len(data):
            return False  # pipelined requests in one chunk: aiohttp's, all of them
        started = time.perf_counter()
        authorization = read.get(b"authorization")
        api_key = read.get(b"x-api-key")
        post = Post(
            data[start:],
            conn.peer(),
            authorization.decode("utf-8", "surrogateescape") if authorization else "",
            api_key.decode("utf-8", "surrogateescape") if api_key is not None else None,
        )
        try:
            work = handler(post)
        except Exception:
            # aiohttp's path answers the request (as the error it is there, if it is one);
            # here it is a bug of the handler's fast side: said, and counted
            self.failed += 1
            if counts is not None:
                counts[1].inc()
            if self.failed in (1, 10, 100) or self.failed % 1000 == 0:
                log.exception("http: POST %s: the fast path failed (%d so far), aiohttp "
                              "answered", path, self.failed)
            return False
        if work is None:
            return False
        self.taken += 1
        if counts is not None:
            counts[0].inc()
        task = asyncio.get_running_loop().create_task(self._answer(conn, work, path, started))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return True

    async def _answer(
        self, conn: Connection, work: Awaitable[Answer], path: str, started: float
    ) -> None:
        """``work``'s answer sent, with what ``ApiGuard.run`` does around a handler: an error
        of its answered as a problem, the request counted."""
        api = self.api
        status = 500
        sent = False
        try:
            try:
                status, answer = await work
            except asyncio.CancelledError:
                status = 499
                raise
            except Exception as exc:
                status, detail, headers = api.error_problem(exc, "POST", path)
                answer = problem_answer(status, detail, headers)
            conn.send(answer)
            sent = True
        finally:
            if sent:
                conn.answered()
            else:  # what came after it must not be answered in its place
                conn.abandon()
            if api.metrics is not None:
                api.count("POST", path, path, status, started)

    async def drain(self, within: float) -> None:
        """Take no further request (aiohttp has them, until the server stops); wait up to
        ``within`` seconds for those in hand, then cancel what is left (counted 499, its
        connection closed unanswered with what came after it: a contact it brought may be
        written, and the client's retry is deduplicated)."""
        self.closing = True
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=within)
            for task in late:
                task.cancel()
            if late:
                log.warning("http: %d requests still in hand at stop: cancelled", len(late))
                await asyncio.wait(late, timeout=1.0)
