"""Real ``gateway serve`` processes with an ``asterisk`` adapter, sharing the test's Redis: for
the faults only a process has (kill -9, SIGSTOP)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from gateway.testing import eventually
from tests.harness import free_ports


@dataclass
class ServedGateway:
    """One ``gateway serve`` process: its FastAGI and HTTP ports."""

    config: Path
    agi_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        proc = self.proc

        def listening() -> bool:
            assert proc.poll() is None, "gateway serve exited"
            try:
                socket.create_connection(("127.0.0.1", self.agi_port), 0.2).close()
                return True
            except OSError:
                return False

        await eventually(listening, timeout_s=30)  # gateway serve listens for FastAGI

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    async def agi_sessions(self) -> tuple[float, float]:
        """FastAGI sessions accepted so far and open now (``/metrics``)."""
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
        found = {"gateway_sessions_total": 0.0, "gateway_sessions_active": 0.0}
        for line in text.splitlines():
            name, _, value = line.partition("{")
            if name in found and 'protocol="agi"' in line:
                found[name] = float(value.rsplit(" ", 1)[1])
        return found["gateway_sessions_total"], found["gateway_sessions_active"]

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def configure(
    folder: Path,
    n: int,
    redis_url: str,
    prefix: str,
    adapter: str = "",
    extra: str = "",
    ports: tuple[int, int] | None = None,
) -> ServedGateway:
    """Write instance ``n``'s config (data in ``folder/var<n>``); ``adapter``: more lines of
    the ``asterisk`` table, ``extra``: more sections; ``ports``: its FastAGI and HTTP ports
    (two free ones by default). Instances configured before any of them listens take their
    ports from one ``free_ports`` call: picked apart, two could get the same port."""
    agi_port, http_port = ports or free_ports(2)
    config = folder / f"gateway{n}.toml"
    config.write_text(f"""
[gateway]
data_dir = "{folder / f"var{n}"}"
instance = "gw{n}"
workers = 1  # one process: the signals of these tests reach the gateway itself
[redis]
url = "{redis_url}"
prefix = "{prefix}"
write_timeout = "500ms"
[http]
listen = "127.0.0.1:{http_port}"
[adapters.asterisk]
type = "asterisk"
agi_listen = "127.0.0.1:{agi_port}"
{adapter}
{extra}
""")
    return ServedGateway(config, agi_port, http_port)


@contextlib.asynccontextmanager
async def served_gateways(
    folder: Path, redis_url: str, prefix: str, count: int = 1, adapter: str = ""
) -> AsyncIterator[list[ServedGateway]]:
    """Start ``count`` instances of one fleet (one Redis, one prefix); stop them all after."""
    ports = free_ports(2 * count)
    gateways = [
        configure(folder, n, redis_url, prefix, adapter, ports=(ports[2 * n - 2], ports[2 * n - 1]))
        for n in range(1, count + 1)
    ]
    try:
        for gw in gateways:
            await gw.start()
        yield gateways
    finally:
        for gw in gateways:
            gw.stop()
