"""How a worker of ``gateway serve --workers N`` listens on the sockets its parent bound
(``gateway/server/listeners.py``)."""

from __future__ import annotations

import asyncio
import errno

import pytest

from gateway.server import listeners


class Accepting(asyncio.Protocol):
    def __init__(self, accepted: list[str], name: str) -> None:
        self.accepted, self.name = accepted, name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.append(self.name)
        transport.close()


async def test_a_second_listener_on_an_inherited_address_gets_address_in_use(monkeypatch):
    """Two listeners configured on one address (HTTP and FastAGI on one port, say): in a worker
    the second failed inside uvloop ("unable to perform operation on <TCPServer closed=True>;
    the handler is closed") or, on asyncio's own loop, took the socket over unseen. It gets
    EADDRINUSE, as in a single process, and the first listener keeps serving."""
    monkeypatch.setattr(listeners, "_inherited", {})
    monkeypatch.setattr(listeners, "_taken", set(), raising=False)
    monkeypatch.setattr(listeners, "_shared_by_workers", False)
    (sock,) = listeners.bind_slots("127.0.0.1", 0, 1)
    port = sock.getsockname()[1]
    listeners.adopt({f"127.0.0.1:{port}": [sock.detach()]})
    accepted: list[str] = []
    first = await listeners.create_listener(
        lambda: Accepting(accepted, "first"), "127.0.0.1", port
    )
    try:
        with pytest.raises(OSError) as raised:
            await listeners.create_listener(
                lambda: Accepting(accepted, "second"), "127.0.0.1", port
            )
        assert raised.value.errno == errno.EADDRINUSE
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read() == b""  # accepted and closed by the first listener
        writer.close()
        assert accepted == ["first"]
    finally:
        first.close()
        await first.wait_closed()
