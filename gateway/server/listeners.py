"""The gateway's listening sockets, and how a worker of ``gateway serve --workers N`` gets them.

Every listener (HTTP, SMTP, FastAGI, an adapter's own) opens its server with
:func:`create_listener` instead of ``loop.create_server``. In a single process that is the same
call. In a worker (``gateway/server/workers.py``) the parent has already opened each listener
address once per worker slot with ``SO_REUSEPORT`` and handed this worker its slot's sockets
(inherited file descriptors, bound but not listening, announced in the ``GATEWAY_WORKER``
environment variable): the worker listens on those, so the kernel spreads new connections over
the workers and a port given as ``0`` is the same port in every worker. An address the parent
did not open (an adapter with a listener key the parent does not know) is bound here with
``SO_REUSEPORT``, so N workers can still share it.

An inherited socket serves one listener: a second listener configured on the same address gets
``EADDRINUSE``, as it would in a single process (the event loop cannot serve one socket twice:
uvloop fails with "the handler is closed", asyncio's selector loop silently steals it).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Mapping
from typing import Any

_inherited: dict[tuple[str, int], list[socket.socket]] = {}
_taken: set[tuple[str, int]] = set()
"""Inherited addresses a listener of this process already serves."""
_shared_by_workers = False


def adopt(sockets: Mapping[str, list[int]]) -> None:
    """Take the sockets a worker inherited: ``{"host:port": [fd, ...]}`` (called once, by the
    worker, before any listener starts)."""
    global _shared_by_workers
    _shared_by_workers = True
    for address, fds in sockets.items():
        host, _, port = address.rpartition(":")
        _inherited[(host.strip("[]"), int(port))] = [socket.socket(fileno=fd) for fd in fds]


def shared_by_workers() -> bool:
    """True in a worker of ``gateway serve --workers N``."""
    return _shared_by_workers


def inherited(host: str, port: int) -> list[socket.socket]:
    """The listening sockets handed over for ``host:port`` (none outside a worker)."""
    return _inherited.get((host, port), [])


async def create_listener(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, **kwargs: Any
) -> asyncio.Server:
    """``loop.create_server(factory, host, port, **kwargs)``, on the inherited sockets when
    this process is a worker and the parent opened ``host:port``."""
    loop = asyncio.get_running_loop()
    sockets = inherited(host, port)
    if sockets:
        if (host, port) in _taken:
            raise OSError(
                errno.EADDRINUSE,
                f"error while attempting to bind on address {(host, port)!r}: "
                "address already in use by another listener of this gateway",
            )
        _taken.add((host, port))
        kwargs.pop("reuse_address", None)
        sock = sockets[0]
        sock.listen(kwargs.pop("backlog", 1024))
        sock.setblocking(False)
        return await loop.create_server(factory, sock=sock, **kwargs)
    if _shared_by_workers:
        kwargs["reuse_port"] = True
    return await loop.create_server(factory, host, port, **kwargs)


def bind_slots(host: str, port: int, slots: int) -> list[socket.socket]:
    """Bind ``host:port`` ``slots`` times with ``SO_REUSEPORT``, one socket per worker slot (on
    the first address ``host`` resolves to), not listening yet: a worker listens when it
    serves. Port 0 picks one free port, the same for every slot."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    opened: list[socket.socket] = []
    try:
        for _ in range(slots):
            s = socket.socket(family, kind, proto)
            opened.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((address[0], port, *address[2:]))
            port = s.getsockname()[1]  # port 0: the first bind picked it, the others share it
    except BaseException:
        for s in opened:
            s.close()
        raise
    return opened
