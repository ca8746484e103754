"""Connection bounds for the gateway's listeners: a cap on open connections, and for HTTP a
time limit on the request head and on silence while a body is still arriving (slow-loris).

aiohttp closes idle keep-alive connections (``keepalive_timeout``) but never a request whose
head or body trickles in; asyncio servers accept connections until the process runs out of
file descriptors. The guard wraps each connection's protocol without touching its parser; it
is also where a request of a route answered without aiohttp (``fastpost``) is taken.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from gateway.server.fastpost import one_request
from gateway.server.problems import problem_body

if TYPE_CHECKING:
    from gateway.server.fastpost import FastPosts

log = logging.getLogger(__name__)


def default_cap(configured: int) -> int:
    """``configured`` if set, else a quarter of the open-file limit (at most 4096)."""
    if configured > 0:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 4096
    return max(16, min(4096, soft // 4))


class ConnectionCount:
    """Open connections of one listener, against its cap."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.open = 0
        self.refused = 0

    def take(self) -> bool:
        if self.open >= self.cap:
            self.refused += 1
            if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                log.warning("listener at its cap of %d connections: %d refused so far",
                            self.cap, self.refused)
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


_OVERLOADED = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\n\r\n"
    b"overloaded, retry in 5 seconds\n"
)
_PROBLEM_BODY = problem_body(503, "overloaded")
"""What ``problems.problem(503, "overloaded")`` answers."""
_OVERLOADED_PROBLEM = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nConnection: close\r\n"
    b"Content-Type: application/problem+json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_PROBLEM_BODY), _PROBLEM_BODY)
)
_NEVER_REFUSED = (b"/healthz", b"/readyz", b"/metrics", b"/dashboard")
"""Paths served even while contacts are refused: probes, metrics, the wallboard."""
_DECISIVE = (b"/v1/intake", b"/v1/", *_NEVER_REFUSED)
"""The path prefixes ``overload_answer`` decides by."""


def overload_answer(data: bytes) -> bytes | None:
    """What a request starting with ``data`` is answered while the process refuses contacts
    (``Admission.busy``), before aiohttp parses it; None for requests that are served all the
    same: probes, metrics, the wallboard and the case systems' API (``/v1/`` other than
    ``/v1/intake``: reads, replies and events bring no new contact)."""
    _, _, rest = data[:64].partition(b" ")
    if any(len(rest) < len(p) and p.startswith(rest) for p in _DECISIVE):
        return None  # a first chunk cut before its path says which: parsed, refused at submit
    if rest.startswith(b"/v1/intake"):
        return _OVERLOADED_PROBLEM
    if rest.startswith(b"/v1/") or rest.startswith(_NEVER_REFUSED):
        return None
    return _OVERLOADED


class HttpGuard(asyncio.Protocol):
    """Wraps one aiohttp ``RequestHandler``: refuses the connection over the cap (503), closes
    it when a request head takes longer than ``header_timeout`` or the client is silent for
    ``body_timeout`` while its request body is incomplete; while ``busy()`` (the process holds
    its bound of contacts in flight) a new request that would bring a contact is answered 503
    + ``Retry-After`` and the connection closed, before it is parsed (``overload_answer``).

    With ``fast``: a request of a route answered from the connection is taken before aiohttp
    sees it (``fastpost``) when aiohttp is between requests (``_between``) and the client
    reads its answers (the transport's writing not paused); while it is in hand the
    connection's further bytes wait (their answers come after its own), past ``HELD`` bytes
    with the reading paused, and aiohttp's keep-alive clock is moved as its own answers
    move it."""

    HELD = 256 * 1024
    TURNS = 3
    """Turns of the loop a request waits for aiohttp to pass from one request to the next
    (seen: two, a request read as aiohttp's task for the one before was made)."""

    def __init__(
        self,
        inner: Any,
        count: ConnectionCount,
        header_timeout: float,
        body_timeout: float,
        busy: Callable[[], bool] | None = None,
        refused: Callable[[], None] | None = None,
        fast: FastPosts | None = None,
    ) -> None:
        self.inner = inner
        self.count = count
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.busy = busy
        self.refused = refused
        self.transport: asyncio.Transport | None = None
        self._counted = False
        self._partial = False
        """The parser holds the first bytes of a request head (the next chunk continues it)."""
        self._refused = False
        """Answered 503 before parsing: what else arrives is discarded until the close."""
        self._loop = asyncio.get_running_loop()
        self._head_started: float | None = None
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        # a quarter of the shortest clock; a request in hand moves aiohttp's keep-alive clock
        # at each tick (``_keep_alive``), so it is one of them
        clocks = [header_timeout, body_timeout, inner.keepalive_timeout or header_timeout]
        self._tick = max(0.05, min(1.0, min(clocks) / 4))
        self.fast = fast
        self._held: list[bytes] | None = None
        """While a request taken from the connection is in hand, or a request waits a turn
        for aiohttp to be between requests (``_between``: None): the bytes come since."""
        self._held_size = 0
        self._reading_paused = False
        self._writing_paused = False
        self._at_boundary = True
        """Every chunk aiohttp was given was exactly one whole request (``_between``)."""
        self._turns = 0
        """Turns the bytes in ``_held`` have waited for aiohttp (``_between``: None)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses
        self.transport = transport
        if not self.count.take():
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\n"
                b"Connection: close\r\nContent-Length: 0\r\n\r\n"
            )
            transport.close()
            return
        self._counted = True
        now = self._loop.time()
        self._head_started = now  # a connection that sends nothing is a head not arriving
        self._last_data = now
        self.inner.connection_made(transport)
        self._timer = self._loop.call_later(self._tick, self._check)

    def _busy(self) -> bool:
        """The parser holds a whole request head (queued or being handled): aiohttp 3.x's
        ``RequestHandler`` state (``guarded_http`` checks the attributes are there)."""
        inner = self.inner
        return inner._current_request is not None or bool(inner._messages)

    def _idle(self) -> bool:
        return not self._busy()

    def data_received(self, data: bytes) -> None:
        if not self._counted or self._refused:
            return
        if self._held is not None:
            self._hold(data)
            return
        if (self.busy is not None and not self._partial and self.busy() and not self._busy()
                and (answer := overload_answer(data)) is not None):
            # a new request while contacts are refused: answered before it is parsed (its
            # body may follow in later chunks, so the connection ends with the answer)
            if self.refused is not None:
                self.refused()
            # the answer, then our side of the connection closed; the rest of the request is
            # read and dropped until the peer closes or the next tick of ``_check`` (closing
            # with unread bytes would reset the connection, and the peer might lose the 503)
            transport = self.transport
            assert transport is not None
            self._refused = True
            transport.write(answer)
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
            return
        self._last_data = self._loop.time()
        if (self.fast is not None and not self._partial and not self._writing_paused
                and (route := self.fast.route(data)) is not None):
            between = self._between()
            if between and self.fast.take(data, route, self):
                self._turns = 0
                self._took()
                return
            if between is None and self._turns < self.TURNS:
                # aiohttp passes from one request to the next
                self._turns += 1
                self._held = [data]
                self._held_size = len(data)
                self._loop.call_soon(self._release)  # a look again next turn
                return
        self._turns = 0
        if self._at_boundary and self.fast is not None:
            self._at_boundary = one_request(data)
        self.inner.data_received(data)
        # one look at the parser per chunk: a whole head (or a request in hand) ends the head
        # clock; otherwise the bytes began or continued a head, timed from its first chunk
        if self._busy():
            self._head_started = None
            self._partial = False
        else:
            self._partial = True
            if self._head_started is None:
                self._head_started = self._last_data

    def _between(self) -> bool | None:
        """True: aiohttp waits for a request, with no byte of one begun: its loop parked on
        its waiter (nothing queued, in hand or being answered; flags such as
        ``_current_request`` are not all set at every moment of that), and every chunk it was
        given was exactly one whole request (``fastpost.one_request``: its parser holds no
        head or body begun, so it reads no body's rest either). None: aiohttp passes from one
        request to the next, for a turn of the loop (its task made, not yet started; or done,
        its loop not yet back on the waiter), or leaves its loop to close. False: it has a
        request queued or in hand, or a chunk it was given was not one request."""
        if not self._at_boundary:
            return False
        inner = self.inner
        waiter = inner._waiter
        if waiter is not None:
            return not waiter.done()
        if inner._messages or inner._current_request is not None or inner._request_in_progress:
            return False
        return None

    def _release(self) -> None:
        """The bytes held are the connection's next (the reading, if ``_hold`` paused it,
        resumed first: whoever takes them, aiohttp or the fast path, bounds it again)."""
        held, self._held = self._held, None
        transport = self.transport
        if self._reading_paused and transport is not None:
            self._reading_paused = False
            transport.resume_reading()
        if held and self._counted:
            self.data_received(b"".join(held))

    def peer(self) -> str | None:
        """The peer's address as aiohttp's ``request.remote`` has it (from the handler's
        cached ``peername``)."""
        peer = self.inner.peername
        if peer is None:
            return None
        return str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer)

    def _took(self) -> None:
        """``fast`` took the request that was the chunk: what comes next waits for it."""
        self._head_started = None
        self._partial = False
        self._held = []
        self._held_size = 0
        self._keep_alive()

    def send(self, answer: bytes) -> None:
        transport = self.transport
        if self._counted and transport is not None and not transport.is_closing():
            transport.write(answer)

    def answered(self) -> None:
        """The request taken is answered: the bytes come since are the connection's next."""
        self._keep_alive()
        self._release()

    def abandon(self) -> None:
        """No answer: our side of the connection ended, what comes is read and dropped until
        the peer closes or the next tick of ``_check`` (as for the overload refusal: closing
        with unread bytes would reset the connection, and the peer might lose answers still
        on their way)."""
        self._held = None
        self._refused = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()

    def _hold(self, data: bytes) -> None:
        assert self._held is not None
        self._last_data = self._loop.time()
        self._held.append(data)
        self._held_size += len(data)
        if self._held_size > self.HELD and not self._reading_paused:
            transport = self.transport
            if transport is not None:
                self._reading_paused = True
                transport.pause_reading()

    def _keep_alive(self) -> None:
        """Move aiohttp's keep-alive clock as its own answers do (it closes a connection idle
        for ``keepalive_timeout`` as it sees it: here while a request is in hand too)."""
        inner = self.inner
        timeout = inner.keepalive_timeout
        if timeout:
            inner._next_keepalive_close_time = self._loop.time() + timeout

    def _check(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._refused:
            transport.close()
            return
        now = self._loop.time()
        if self._held is not None:
            self._keep_alive()
        request = getattr(self.inner, "_current_request", None)
        if self._head_started is not None and self._idle():
            if now - self._head_started >= self.header_timeout:
                log.info("http: request head not complete in %.0f s: connection closed",
                         self.header_timeout)
                transport.abort()
                return
        elif request is not None and not request.content.is_eof():
            if now - self._last_data >= self.body_timeout:
                log.info("http: request body silent for %.0f s: connection closed",
                         self.body_timeout)
                transport.abort()
                return
        self._timer = self._loop.call_later(self._tick, self._check)

    def eof_received(self) -> bool | None:
        if self._refused:
            return None  # the transport closes itself
        return self.inner.eof_received() if self._counted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.count.release()
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._counted:
            self.inner.resume_writing()


def guarded_http(
    factory: Callable[[], Any],
    count: ConnectionCount,
    header_timeout: float,
    body_timeout: float,
    busy: Callable[[], bool] | None = None,
    refused: Callable[[], None] | None = None,
    fast: FastPosts | None = None,
) -> Callable[[], HttpGuard]:
    """A protocol factory for ``loop.create_server``: aiohttp's handlers, guarded."""
    from aiohttp.web_protocol import RequestHandler

    slots = set(getattr(RequestHandler, "__slots__", ())) | set(vars(RequestHandler))
    known = {
        "_current_request", "_messages", "_request_in_progress", "_waiter",
        "_next_keepalive_close_time", "keepalive_timeout", "peername",
    }
    if not known <= slots:  # an aiohttp this guard does not know
        raise RuntimeError(f"aiohttp's RequestHandler lacks one of {sorted(known)}")
    return lambda: HttpGuard(
        factory(), count, header_timeout, body_timeout, busy, refused, fast
    )
