"""Check on a live Asterisk that ``EXEC MSet`` sets what ``SET VARIABLE`` sets.

    python -m tools.agi_mset_check --port 4599 [--transcript live_mset.transcript]

Serves FastAGI script ``mset-check`` on 127.0.0.1:PORT. Point a dialplan at it
(``AGI(agi://127.0.0.1:PORT/mset-check)``) and place a call. For each value of ``VALUES`` the
session sets ``S_<i>`` with ``SET VARIABLE`` and ``M_<i>`` through the gateway's own
``set_variables(..., mset=True)`` (one ``EXEC MSet``), then reads every variable back with
``GET VARIABLE`` and prints where the two differ from the value or from each other. With
``--transcript`` it writes the session's bytes, one protocol line per line: ``A: `` what Asterisk
sent (the header block and replies), ``G: `` what the gateway sent. The tests replay that file
(tests/channels/voice/test_live_captures.py). Exit status 0 when every value came back exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from gateway.channels.voice.agi import AgiChannel, AgiStream, read_header_block
from gateway.channels.voice.intake import mset_argument, set_variables

VALUES: tuple[str, ...] = (
    "hotline",
    "",
    "a,b,,c",
    'say "hi"',
    "back\\slash\\",
    '\\"',
    "(open",
    "close)",
    "[x",
    "y]",
    "f(a,b)[c]",
    "a=b=c",
    "  blanks around  ",
    "tab\there",
    "热线 12345",
    "Müller €",
    "semi;colon|pipe'single'{brace}",
    "%s %d",
    "x" * 1000,
)
"""Values set both ways. A value with ``$`` is not among them: the gateway never sends one
through MSet (``mset_argument``), since ``AGIEXECFULL`` would expand it."""


class Recorder:
    """The session's bytes, in order, by direction."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._partial = {"A": b"", "G": b""}

    def add(self, side: str, data: bytes) -> None:
        data = self._partial[side] + data
        *whole, self._partial[side] = data.split(b"\n")
        self.lines.extend(f"{side}: {line.decode('utf-8')}" for line in whole)


class RecordingStream(AgiStream):
    def __init__(self, reader: asyncio.StreamReader, recorder: Recorder) -> None:
        super().__init__(reader, 10.0)
        self.recorder = recorder

    async def fill(self) -> bool:
        before = len(self.buffer)
        more = await super().fill()
        self.recorder.add("A", bytes(self.buffer[before:]))
        return more


class RecordingWriter:
    def __init__(self, writer: asyncio.StreamWriter, recorder: Recorder) -> None:
        self.writer = writer
        self.recorder = recorder

    def write(self, data: bytes) -> None:
        self.recorder.add("G", data)
        self.writer.write(data)

    async def drain(self) -> None:
        await self.writer.drain()


async def check(channel: AgiChannel, values: tuple[str, ...] = VALUES) -> list[str]:
    """Set every value both ways on the channel, read both back; the differences found."""
    for i, value in enumerate(values):
        await channel.command("SET VARIABLE", f"S_{i}", value)
    together = [(f"M_{i}", value) for i, value in enumerate(values)]
    assert mset_argument(together) is not None
    await set_variables(channel, together, mset=True)
    problems: list[str] = []
    for i, value in enumerate(values):
        got = {}
        for prefix in ("S", "M"):
            reply = await channel.command("GET VARIABLE", f"{prefix}_{i}")
            got[prefix] = reply.data if reply.ok and reply.result == "1" else None
        if got["S"] != value or got["M"] != value:
            problems.append(f"{value[:40]!r}: SET VARIABLE gave {got['S']!r:.60}, "
                            f"MSet gave {got['M']!r:.60}")
    return problems


async def serve(port: int) -> tuple[list[str], list[str]]:
    """Serve until one call has run the check; its differences and its transcript lines."""
    done: asyncio.Future[tuple[list[str], list[str]]] = (
        asyncio.get_running_loop().create_future())

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        recorder = Recorder()
        stream = RecordingStream(reader, recorder)
        try:
            env = await read_header_block(stream)
            print(f"call {env.get('agi_uniqueid')} on Asterisk {env.get('agi_version')}")
            problems = await check(AgiChannel(stream, RecordingWriter(writer, recorder)))  # type: ignore[arg-type]
        finally:
            writer.close()
        if not done.done():
            done.set_result((problems, recorder.lines))

    server = await asyncio.start_server(session, "127.0.0.1", port)
    print(f"FastAGI mset-check on 127.0.0.1:{port}; waiting for one call")
    async with server:
        return await done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--transcript", type=Path)
    args = parser.parse_args()
    problems, lines = asyncio.run(serve(args.port))
    if args.transcript is not None:
        args.transcript.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for problem in problems:
        print("DIFFERS", problem)
    print(f"{len(VALUES)} values set both ways: {len(problems)} differ")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
