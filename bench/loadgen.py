"""A small HTTP/1.1 load generator on raw asyncio streams (keep-alive, no client library).

aiohttp's client costs more CPU per request than the servers under test, so on a 2-core machine
it would measure itself. This one writes prebuilt requests and reads ``Content-Length`` bodies.
Run it in its own process so the client and the server do not share a core.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
