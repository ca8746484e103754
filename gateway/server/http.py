"""The one HTTP server every adapter shares: health, readiness, metrics, attachments."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import StreamReader, hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.adapters import InvalidContact, RateLimited
from gateway.contact.attachments import AttachmentStore
from gateway.server.admission import Admission
from gateway.server.auth import ApiKeys, presented_key, secrets_equal
from gateway.server.config import HostPort, LimitsSection, Secret
from gateway.server.connguard import ConnectionCount, default_cap, guarded_http
from gateway.server.fastpost import FastHandler, FastPosts
from gateway.server.listeners import create_listener
from gateway.server.metrics import Metrics
from gateway.server.problems import ApiProblem, problem

log = logging.getLogger(__name__)


MALFORMED_BODY = (HttpProcessingError, ValueError)
"""What aiohttp's multipart and form readers raise for a body that does not parse (a part
header with a NUL, a bad boundary, bad percent-encoding): the peer's error, answered 400."""


async def read_capped(stream: StreamReader, limit: int) -> bytes | None:
    """Read a body stream to its end; None once it holds more than ``limit`` bytes.

    ``StreamReader.read(n)`` returns what has arrived so far, not ``n`` bytes: this loops.
    A body that came whole in one chunk (most requests) is returned as it is, not copied.
    """
    first = await stream.readany()
    if len(first) > limit:
        return None
    if stream.at_eof():
        return first
    data = bytearray(first)
    while chunk := await stream.readany():
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read a request body whole; raise 413 past ``limit`` bytes (declared or actual)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=declared)
    body = await read_capped(request.content, limit)
    if body is None:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=limit + 1)
    return body


API_PREFIX = "/v1/"


class RawResponse(web.StreamResponse):
    """An HTTP/1.1 keep-alive answer written as prebuilt bytes (``raw_answer``): no header
    multidict filled, serialized and joined per request. Only for a request that keeps its
    HTTP/1.1 connection (``can_answer_raw``); its ``headers`` are empty (the bytes hold
    them)."""

    def __init__(self, status: int, reason: str, raw: bytes) -> None:
        super().__init__(status=status, reason=reason)
        self._raw = raw

    async def prepare(self, request: web.BaseRequest) -> None:
        if self._eof_sent:
            return
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        self._keep_alive = True
        transport.write(self._raw)
        self._eof_sent = True
        self._body_length = len(self._raw)
        # back-pressure, as aiohttp's own answers have it (their write_eof drains): while the
        # client reads no answers, its next request waits here instead of being handled and
        # its answer buffered in the process
        await request.writer.drain()


def can_answer_raw(request: web.BaseRequest) -> bool:
    """The request's connection stays open after it, on HTTP/1.1 (a ``RawResponse`` says
    nothing about the connection)."""
    return request.version == HttpVersion11 and request.keep_alive


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(request: web.Request) -> str:
    """The matched route's pattern (``/v1/contacts/{id}``), ``unmatched`` for 404/405: labels
    stay few whatever paths clients try."""
    match = request.match_info
    if match.http_exception is not None:
        return "unmatched"
    resource = match.route.resource
    return resource.canonical if resource is not None else "unmatched"


class ApiGuard:
    """What every request goes through (one layer, not one per concern: each layer is a
    coroutine and a call per request on the intake path): as the application's one
    middleware (``middleware``), and around the direct routes (``add_direct``), which skip
    the router and the middleware chain.

    Errors: every error under ``/v1/`` is ``application/problem+json`` (aiohttp's own 404,
    405 and 413 included), a contact over its rate is a 429 problem, one Intake cannot encode
    a 400 problem, and an unhandled exception anywhere is a 500 problem, logged and counted in
    ``gateway_api_requests`` (operation ``unhandled``): a 500 is a bug, never plain text.

    With ``metrics``: counts every request by route pattern, method and status (499 when the
    client went away first, nginx's code for it), and times it. The label children are kept
    (few: route patterns x methods x statuses), ``labels()`` costs more.
    """

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self._series: dict[tuple[object, str, int], tuple[Any, Any]] = {}

    def count(
        self, method: str, route: object, pattern: str | None, status: int, started: float,
        request: web.BaseRequest | None = None,
    ) -> None:
        """Count a request and its time under ``route`` (``pattern`` its label; None: looked
        up from ``request``'s match)."""
        metrics = self.metrics
        assert metrics is not None
        if method not in _METHODS:
            method = "other"
        children = self._series.get((route, method, status))
        if children is None:
            if pattern is None:
                assert isinstance(request, web.Request)
                pattern = route_of(request)
            children = self._series[(route, method, status)] = (
                metrics.deferred_counter(
                    metrics.http_requests.labels(pattern, method, str(status))
                ),
                metrics.deferred_histogram(metrics.http_duration.labels(pattern)),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - started)

    def error_problem(
        self, exc: Exception, method: str, path: str
    ) -> tuple[int, str, dict[str, str] | None]:
        """How an error a handler raised is answered, as ``problem``'s arguments: a contact
        over its rate 429, one Intake cannot encode 400 (logged), anything else 500 (logged
        with its traceback and counted: a bug)."""
        if isinstance(exc, RateLimited):  # a sender or adapter over its rate: slow down
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            return 429, "too many contacts, slow down", {"Retry-After": retry}
        if isinstance(exc, InvalidContact):  # the peer's bad input, on every route: 400
            log.info("http: %s %s: contact refused: %s", method, path[:200], exc)
            return 400, str(exc), None
        log.error("http: unhandled error in %s %s", method, path[:200], exc_info=exc)
        if self.metrics is not None:
            self.metrics.api_requests.labels("unhandled", "500").inc()
        return 500, "internal error", None

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """The application's middleware: ``run`` with the matched route."""

        @web.middleware
        def middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            # keyed by the matched route object (no pattern to look up per request); a
            # 404/405's route is made per request, so those share the key None ("unmatched").
            # A plain function returning run's coroutine: no layer of its own to await.
            match = request.match_info
            route = match.route if match.http_exception is None else None
            return self.run(request, handler, route, None)

        return middleware

    async def run(
        self,
        request: web.BaseRequest,
        handler: Callable[[Any], Awaitable[web.StreamResponse]],
        route: object,
        pattern: str | None,
    ) -> web.StreamResponse:
        """``handler(request)`` with the errors answered and the request counted under
        ``route`` (``pattern`` its label, None: looked up from the request's match)."""
        started = time.perf_counter()
        status = 500
        try:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                status = exc.status
                if exc.status < 400 or not request.path.startswith(API_PREFIX):
                    raise
                headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
                response = problem(exc.status, exc.reason, headers or None)
            except asyncio.CancelledError:
                status = 499  # the client went away first
                raise
            except Exception as exc:
                response = problem(*self.error_problem(exc, request.method, request.path))
            status = response.status
            return response
        finally:
            if self.metrics is not None:
                self.count(request.method, route, pattern, status, started, request)


DirectHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Direct:
    """Routes answered without aiohttp's router and middleware chain (``add_direct``)."""

    def __init__(self, guard: ApiGuard) -> None:
        self.guard = guard
        self.routes: dict[tuple[str, str], DirectHandler] = {}
        """Handlers by method and exact path (the path is also the request's route and label)."""
        self.fast: dict[str, FastHandler] = {}
        """``POST`` routes also answered from the connection, by path (``fastpost``)."""

    def dispatcher(
        self, fallback: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        """The server's request handler: a direct route's handler under the guard when the
        method and the raw path are exactly a direct route's and nothing asks for more
        (``Expect``), else ``fallback`` (the application: router, middleware)."""
        routes = self.routes
        run = self.guard.run

        def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            path = request.raw_path
            found = routes.get((request.method, path))
            if found is None or hdrs.EXPECT in request.headers:
                return fallback(request)
            return run(request, found, path, path)

        return dispatch


DIRECT = web.AppKey("direct", Direct)


def add_direct(
    app: web.Application, method: str, path: str, handler: DirectHandler,
    fast: FastHandler | None = None,
) -> None:
    """Route ``method path`` to ``handler`` in ``app``'s router, and with ``HttpServer``
    also straight from the connection (``Direct``): the router's lookup, the match's
    freezing and the middleware chain cost a contact more than its handler's own checks.
    The direct way is taken only for exactly ``path`` (no query, no other spelling) and
    without ``Expect``; everything else goes through the router to the same handler. The
    handler must not read ``request.match_info`` or ``request.app``; its requests are counted
    and their errors answered as every other's (``ApiGuard``).

    ``fast`` (a ``POST``): the same route answered without aiohttp when the request is the
    plain case (``gateway/server/fastpost.py``); it must answer what ``handler`` answers,
    and decline what it would refuse before doing anything."""
    app.router.add_route(method, path, handler)
    direct = app[DIRECT]
    direct.routes[(method, path)] = handler
    if fast is not None:
        if method != "POST":
            raise ValueError("only a POST route is answered from the connection")
        direct.fast[path] = fast


def build_app(max_body: int, metrics: Metrics | None = None) -> web.Application:
    """Create the application; adapters add their routes to ``app.router`` before it starts
    (or with ``add_direct``)."""
    guard = ApiGuard(metrics)
    app = web.Application(client_max_size=max_body, middlewares=[guard.middleware()])
    app[DIRECT] = Direct(guard)
    return app


class CoreRoutes:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/attachments/{sha256}``."""

    def __init__(
        self,
        ready: Callable[[], Awaitable[tuple[bool, dict[str, object]]]],
        metrics: Callable[[], Awaitable[bytes]],
        attachments: AttachmentStore,
        keys: ApiKeys,
        metrics_token: Secret | None = None,
    ) -> None:
        self._ready = ready
        self._metrics = metrics
        self.attachments = attachments
        self.keys = keys
        self.metrics_token = metrics_token

    def register(self, router: web.UrlDispatcher, *, with_metrics: bool = True) -> None:
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        if with_metrics:
            router.add_get("/metrics", self.metrics)
        router.add_get("/v1/attachments/{sha256}", self.attachment)

    def register_probes(self, router: web.UrlDispatcher) -> None:
        """The metrics listener's routes: ``/metrics``, ``/healthz``, ``/readyz``."""
        router.add_get("/healthz", self.healthz)
        router.add_get("/readyz", self.readyz)
        router.add_get("/metrics", self.metrics)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ok, detail = await self._ready()
        return web.json_response(
            {"status": "ready" if ok else "unready", **detail}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_token:
            given = presented_key(request)
            if given is None or not secrets_equal(given, self.metrics_token.reveal()):
                return web.Response(
                    status=401, text="metrics token required\n",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
        body = await self._metrics()
        return web.Response(
            body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def attachment(self, request: web.Request) -> web.StreamResponse:
        try:
            self.keys.authorize(request, "read")
        except ApiProblem as exc:
            return exc.response()
        try:
            path = self.attachments.path_for(request.match_info["sha256"])
        except ValueError:
            return problem(400, "not a sha256 digest")
        # never rendered by a browser on our origin
        headers = {"Content-Disposition": "attachment", "X-Content-Type-Options": "nosniff"}
        if not path.is_file():  # a small mail's file may be written just after its 250
            held = await self.attachments.held(path.name)
            if held is not None:
                return web.Response(body=held[0], headers={"Content-Type": held[1], **headers})
            if not path.is_file():  # not written and let go between the two looks
                return problem(404, "no such attachment")
        return web.FileResponse(
            path, headers={"Content-Type": self.attachments.content_type(path), **headers}
        )


SHUTDOWN_TIMEOUT = 20.0
"""How long a stop waits for the HTTP requests in hand, all of them: a third of the process
manager's 60 s (deploy/), the rest for Intake's flush, the spool and the embedded server."""


class HttpServer:
    """Runs the application on the gateway's loop (AppRunner), every connection guarded:
    a cap per listener, the request head and a silent body bounded in time (``[limits]``)."""

    def __init__(
        self,
        app: web.Application,
        listen: HostPort,
        limits: LimitsSection | None = None,
        admission: Admission | None = None,
    ) -> None:
        self.app = app
        self.admission = admission
        """While it is ``busy``, requests that bring contacts are refused before parsing."""
        self.listen = listen
        self.limits = limits or LimitsSection()
        self.port = 0
        self.connections = ConnectionCount(default_cap(self.limits.max_connections))
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.fast: FastPosts | None = None
        """The routes answered from the connection (``fastpost``), while the server runs."""
        self.shutdown_timeout = SHUTDOWN_TIMEOUT

    async def start(self) -> None:
        limits = self.limits
        if "_shutdown_timeout" not in web.BaseRunner.__slots__:  # an aiohttp stop does not know
            raise RuntimeError("aiohttp's runner has no _shutdown_timeout")
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=float(limits.keepalive_timeout),
            shutdown_timeout=self.shutdown_timeout,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        direct = self.app.get(DIRECT)
        if direct is not None and direct.routes:
            server.request_handler = direct.dispatcher(server.request_handler)
        if direct is not None and direct.fast:
            self.fast = FastPosts(direct.guard, direct.fast)
        admission = self.admission
        factory = guarded_http(
            server,
            self.connections,
            float(limits.header_timeout),
            float(limits.body_timeout),
            busy=(lambda: admission.busy) if admission is not None else None,
            refused=admission.refuse if admission is not None else None,
            fast=self.fast,
        )
        self._server = await create_listener(
            factory, self.listen.host, self.listen.port, reuse_address=True, backlog=1024
        )
        sockets = list(self._server.sockets)
        self.port = sockets[0].getsockname()[1] if sockets else self.listen.port
        log.info("http: listening on %s:%d", self.listen.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        # one bound for both waits: the requests taken from their connections first
        # (aiohttp's shutdown takes those connections for idle ones), then aiohttp's own
        deadline = asyncio.get_running_loop().time() + self.shutdown_timeout
        fast, self.fast = self.fast, None
        if fast is not None:
            await fast.drain(self.shutdown_timeout)
        runner, self._runner = self._runner, None
        if runner is not None:
            # aiohttp waits up to its timeout for a handler, then as long again for the
            # connection's task; and 0 is no bound at all to it
            left = deadline - asyncio.get_running_loop().time()
            runner._shutdown_timeout = max(0.05, left / 2)
            await runner.cleanup()
