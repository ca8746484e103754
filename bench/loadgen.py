"""Small load generators with no client library: HTTP/1.1 on raw asyncio streams (``run_load``:
keep-alive, closed or open loop), and lean protocol clients for HTTP, SMTP and FastAGI (``Pool``,
``HttpConnection``, ``SmtpConnection``, ``AgiCall``: callbacks, no coroutine per request).

aiohttp's client costs more CPU per request than the servers under test, so on a 2-core machine
it would measure itself. These write prebuilt requests and read ``Content-Length`` bodies.
Run them in a process of their own so the client and the server do not share a core.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast


@dataclass
class LoadResult:
    ok: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_us: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        ordered = sorted(self.latencies_us)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def build_request(
    host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str]
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return head.encode() + b"\r\n" + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def run_load(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    *,
    connections: int,
    seconds: float,
    rate: float | None = None,
    expect: int = 200,
) -> LoadResult:
    """Closed loop (as fast as each connection can) or open loop at ``rate`` requests/s."""
    result = LoadResult()
    counter = iter(range(10**12))
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + seconds
    interval = connections / rate if rate else 0.0

    async def worker(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        next_at = start + (interval * n / connections if rate else 0.0)
        try:
            while loop.time() < end:
                if rate:
                    delay = next_at - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval
                t0 = time.perf_counter_ns()
                writer.write(make_request(next(counter)))
                status = await _read_response(reader)
                if status == expect:
                    result.ok += 1
                    result.latencies_us.append((time.perf_counter_ns() - t0) // 1000)
                else:
                    result.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(connections)))
    result.seconds = loop.time() - start
    return result


# ---------------------------------------------------------------- lean clients, no coroutines
# Each request below is one ``transport.write`` and a few ``data_received`` callbacks: no task,
# no stream reader, no await per request, so a load generator process spends its core on the
# peers' wire formats and little else (bench/soak_mixed.py reports its CPU per contact).

Done = Callable[[int, bytes], None]
"""Called once per request: (status or reply code, body or reply line); 0 when the
connection failed or closed first, ``TIMED_OUT`` when the pool's ``timeout`` passed first."""

TIMED_OUT = -1
"""The status ``done`` gets when a request had no answer within the pool's ``timeout``: the
client gave up and closed the connection, as a peer does (its answer, if any, is lost)."""


class Pool:
    """Up to ``size`` keep-alive connections of one protocol to ``host:port``, one request at
    a time on each; requests find a free connection or wait in a queue of at most ``waiting``
    (``submit`` returns False beyond it: the caller counts the request as not sent)."""

    def __init__(
        self,
        host: str,
        port: int,
        factory: Callable[[Pool], PooledConnection],
        size: int,
        waiting: int,
        timeout: float | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        """Seconds a request waits for its answer once sent (None: for ever)."""
        self.factory = factory
        self.size = size
        self.waiting = waiting
        self.free: list[PooledConnection] = []
        self.queue: deque[tuple[Any, Done]] = deque()
        self.count = 0
        """Connections open or opening."""

    def submit(self, payload: Any, done: Done) -> bool:
        if self.free:
            self.free.pop().send(payload, done)
            return True
        if len(self.queue) >= self.waiting:
            return False
        self.queue.append((payload, done))
        if self.count < self.size:
            self._open()
        return True

    def _open(self) -> None:
        self.count += 1
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: self.factory(self), self.host,
                                                       self.port))
        task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self.count -= 1
            if self.queue:  # one waiting request fails with it, so a dead port drains
                self.queue.popleft()[1](0, b"")

    def ready(self, conn: PooledConnection) -> None:
        """``conn`` can take a request (connected, or its answer read)."""
        if self.queue:
            payload, done = self.queue.popleft()
            conn.send(payload, done)
        else:
            self.free.append(conn)

    def lost(self, conn: PooledConnection) -> None:
        self.count -= 1
        if conn in self.free:
            self.free.remove(conn)
        if self.queue and self.count < self.size:
            self._open()

    def close(self) -> None:
        for conn in self.free:
            conn.close()


class PooledConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.done: Done | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def send(self, payload: Any, done: Done) -> None:
        raise NotImplementedError

    def finish(self, code: int, body: bytes) -> None:
        done, self.done = self.done, None
        self.pool.ready(self)
        if done is not None:
            done(code, body)

    def connection_lost(self, exc: Exception | None) -> None:
        done, self.done = self.done, None
        self.pool.lost(self)
        if done is not None:
            done(0, b"")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class HttpConnection(PooledConnection):
    """HTTP/1.1 keep-alive: ``send`` a prebuilt request (``build_request``), the answer's
    status and ``Content-Length`` body handed to ``done``; with the pool's ``timeout``, a
    request not answered in time is given up (``TIMED_OUT``) and its connection closed."""

    timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.pool.ready(self)

    def send(self, payload: bytes, done: Done) -> None:
        assert self.transport is not None
        self.done = done
        self.transport.write(payload)
        if self.pool.timeout is not None:
            self.timer = asyncio.get_running_loop().call_later(self.pool.timeout, self._late)

    def _late(self) -> None:
        self.timer = None
        done, self.done = self.done, None
        if self.transport is not None:
            self.transport.abort()  # connection_lost tells the pool; no second done
        if done is not None:
            done(TIMED_OUT, b"")

    def finish(self, code: int, body: bytes) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().finish(code, body)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buffer[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        length = 0
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        if len(buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        body = bytes(buffer[end + 4 : end + 4 + length])
        del buffer[: end + 4 + length]
        if b"\r\nconnection: close" in head and self.transport is not None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.transport.close()  # connection_lost tells the pool; no second done
            done, self.done = self.done, None
            if done is not None:
                done(status, body)
            return
        self.finish(status, body)


class SmtpConnection(PooledConnection):
    """An SMTP client session kept open for message after message, as an MTA's connection
    cache does; the envelope is pipelined (RFC 2920, the gateway announces PIPELINING):
    ``send((mail_from, rcpt_to, message))`` writes MAIL, RCPT and DATA at once, the message
    after the 354, and hands ``done`` the final reply's code and line."""

    EHLO = b"EHLO loadgen.example.org\r\n"

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.state = "greeting"
        self.replies: list[bytes] = []
        self.message = b""

    def send(self, payload: tuple[bytes, bytes, bytes], done: Done) -> None:
        assert self.transport is not None
        mail_from, rcpt_to, self.message = payload
        self.done = done
        self.state = "envelope"
        self.replies.clear()
        self.transport.write(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (mail_from, rcpt_to))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[: end + 1])
            del buffer[: end + 1]
            if line[3:4] == b"-":
                continue  # a multi-line reply goes on
            self._reply(line)

    def _reply(self, line: bytes) -> None:
        assert self.transport is not None
        if self.state == "greeting":
            self.state = "ehlo"
            self.transport.write(self.EHLO)
        elif self.state == "ehlo":
            self.state = "idle"
            self.pool.ready(self)
        elif self.state == "envelope":
            self.replies.append(line)
            if len(self.replies) < 3:
                return
            if self.replies[2][:3] == b"354":
                self.state = "data"
                self.transport.write(self.message)
                return
            self.transport.close()  # refused before DATA: this session is done
            done, self.done = self.done, None
            if done is not None:
                bad = next(r for r in self.replies if r[:1] not in (b"2", b"3"))
                done(int(bad[:3]), bad.rstrip())
        elif self.state == "data":
            self.state = "idle"
            self.finish(int(line[:3]), line.rstrip())


class AgiCall(asyncio.Protocol):
    """One FastAGI session as Asterisk's res_agi plays it: the header block, then each
    command the gateway sends answered ``200 result=1`` (``GET ...`` with a value), until the
    gateway closes; ``done`` gets the variables it set (``SET VARIABLE`` and ``EXEC MSet``)."""

    def __init__(self, header: bytes, done: Callable[[dict[bytes, bytes] | None], None]) -> None:
        self.header = header
        self.done: Callable[[dict[bytes, bytes] | None], None] | None = done
        self.variables: dict[bytes, bytes] = {}
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    CONNECT_TIMEOUT_S = 2.0
    """How long res_agi waits for a FastAGI connection (``MAX_AGI_CONNECT``, 2000 ms) before
    the call takes the dialplan's fail path."""

    @classmethod
    def start(
        cls, host: str, port: int, header: bytes, done: Callable[[dict[bytes, bytes] | None], None]
    ) -> None:
        """Connect and play the call; ``done(None)`` when no connection was made within
        ``CONNECT_TIMEOUT_S`` (as Asterisk gives up) or it failed."""
        loop = asyncio.get_running_loop()
        task = loop.create_task(loop.create_connection(lambda: cls(header, done), host, port))
        timer = loop.call_later(cls.CONNECT_TIMEOUT_S, task.cancel)

        def opened(task: asyncio.Task[Any]) -> None:
            timer.cancel()
            if task.cancelled() or task.exception() is not None:
                done(None)

        task.add_done_callback(opened)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        transport.write(self.header)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buffer = self.buffer
        buffer += data
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[: end + 1]
            if line.startswith(b"SET VARIABLE "):
                name, _, value = line[13:].partition(b" ")
                self.variables[name.strip(b'"')] = value.strip().strip(b'"')
                self.transport.write(b"200 result=1\n")
            elif line[:5].upper() == b"EXEC " and (
                    (app := line[5:].partition(b" "))[0].strip(b'"').lower() == b"mset"):
                # the gateway quotes each word: EXEC "MSet" "A=1,B=2" (plain values here)
                for pair in app[2].strip().strip(b'"').split(b","):
                    name, _, value = pair.partition(b"=")
                    self.variables[name] = value
                self.transport.write(b"200 result=0\n")  # what pbx_exec of MSet returns
            elif line.startswith(b"GET "):
                self.transport.write(b"200 result=1 (1795594483.0)\n")
            else:
                self.transport.write(b"200 result=1\n")

    def connection_lost(self, exc: Exception | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(self.variables)
