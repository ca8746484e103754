"""What the two test carriers (the SMSC for SMPP, the ISMG for CMPP) share: a TCP server on a
free port, one reader per connection cutting the stream into frames by their length word,
``drop`` (a carrier's restart), and requests of our own whose answers are awaited by sequence
number. Each carrier decodes the frames itself (smpplib, or the CMPP layouts)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from typing import Any, TypeVar

T = TypeVar("T")


class CarrierServer:
    HEADER_SIZE = 16
    port: int

    def __post_init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.link_up = asyncio.Event()
        """Set once a bind/connect is accepted, cleared by ``drop``."""

    async def start(self: Any) -> Any:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def drop(self) -> None:
        """Cut every link (as a carrier's restart does)."""
        self.link_up.clear()
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    @property
    def connections(self) -> int:
        return len(self._writers)

    async def frame(self, writer: asyncio.StreamWriter, head: bytes, body: bytes) -> None:
        """One frame from the gateway (``head`` is ``HEADER_SIZE`` octets)."""
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readexactly(self.HEADER_SIZE)
                length = struct.unpack(">I", head[:4])[0]
                await self.frame(writer, head, await reader.readexactly(length - self.HEADER_SIZE))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(ValueError):
                self._writers.remove(writer)
            writer.close()

    async def exchange(self, data: bytes, seq: int, waiting: dict[int, asyncio.Future[T]]) -> T:
        """Send ``data`` on the newest link; wait for the answer registered under ``seq``."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        waiting[seq] = future
        writer = self._writers[-1]
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            return await future
