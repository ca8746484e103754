"""The AGI protocol (FastAGI and classic): header block, command quoting, replies.

Follows ``res/res_agi.c``: Asterisk writes ``agi_<key>: <value>`` lines ended by an empty line,
then reads one command per LF-terminated line (at most 8192 bytes, 128 arguments; words split on
blanks, double quotes group, a backslash escapes the next character) and answers each with
``200 result=<n>[ (<data>)][ endpos=<n>]``, ``510 ...``, ``511 ...``, a one-line ``520 ...`` or a
multi-line ``520-`` block ended by a line starting ``520 ``. When the caller hangs up it also
writes ``HANGUP`` on its own line between replies: that line is never a reply.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

MAX_COMMAND_BYTES: Final = 8192
"""``AGI_BUF_LEN`` in res_agi.c: a longer command line is cut by Asterisk."""
MAX_ARGS: Final = 128
"""``MAX_ARGS`` in res_agi.c."""
MAX_HEADER_BYTES: Final = 16 * 1024
MAX_HEADER_LINES: Final = 200
MAX_REPLY_LINES: Final = 200
MAX_REPLY_BYTES: Final = 64 * 1024

HANGUP_LINE: Final = "HANGUP"


class AgiError(Exception):
    """The peer broke the protocol, closed, or the exchange cannot go on: close the socket."""


class AgiClosed(AgiError):
    """The peer closed the connection (EOF)."""


class AgiIdle(AgiError):
    """The peer sent nothing within the read timeout (a hung or stopped Asterisk thread)."""


_HEADER_KEY = re.compile(r"agi_[A-Za-z0-9_]+\Z")


def parse_header_line(line: str) -> tuple[str, str]:
    """Split one ``agi_key: value`` line; raise ``AgiError`` when it is not one."""
    key, sep, value = line.partition(":")
    if not sep or not _HEADER_KEY.match(key):
        raise AgiError("not an AGI header line")
    return key, value.strip()


_HEADER_PAIR = re.compile(r"^(agi_[A-Za-z0-9_]+):(.*)$", re.M)
_NOT_HEADER = re.compile(r"^(?!agi_[A-Za-z0-9_]+:|\r*$)", re.M)
"""A line that is neither ``agi_key:...`` nor blank (CRs only)."""


def parse_header_block(data: bytes, *, max_lines: int = MAX_HEADER_LINES) -> dict[str, str]:
    """Parse a complete header block (lines up to, not including, the empty line).

    Bytes that are not UTF-8 are replaced (a caller name may arrive in any encoding); NUL is
    removed; the first of a repeated key wins; values are stripped. Raise ``AgiError`` on a
    line that is not ``agi_key: value`` or too many lines. (Two regular-expression passes over
    the block instead of three string operations and a match per line: a block is 20-odd
    lines on every call.)
    """
    text = data.decode("utf-8", errors="replace").replace("\x00", "")
    breaks = text.count("\n")
    if breaks >= max_lines:
        raise AgiError("too many header lines")
    pairs = _HEADER_PAIR.findall(text)
    # one pair per line: every line is a header line (the usual block), no need to look for
    # one that is not; else the blank (CR-only) lines may account for the rest
    if len(pairs) <= breaks and _NOT_HEADER.search(text):
        raise AgiError("not an AGI header line")
    return {key: value.strip() for key, value in reversed(pairs)}


class AgiStream:
    """One receive buffer over a stream: a TCP read usually carries the whole header block or
    a batch of replies, so lines are cut from the buffer instead of one read per line.

    A subclass may fill ``buffer`` by other means (the FastAGI server's connection protocol
    appends what the transport delivers): it overrides ``fill``, and has no ``reader``.
    """

    __slots__ = ("buffer", "read_timeout", "reader", "waiting_since")

    def __init__(
        self, reader: asyncio.StreamReader | None, read_timeout: float | None = None
    ) -> None:
        self.reader = reader
        self.buffer = bytearray()
        self.read_timeout = read_timeout
        """Longest wait for the peer's next bytes; ``AgiIdle`` after it. None: no bound here
        (the FastAGI server bounds it with one sweep over all its sessions instead)."""
        self.waiting_since: float | None = None
        """``time.monotonic()`` when the wait for the peer's next bytes began; None when not
        waiting."""

    async def fill(self) -> bool:
        """Read what the peer sent; False at EOF, ``AgiIdle`` when it sends nothing for
        ``read_timeout`` seconds."""
        assert self.reader is not None
        self.waiting_since = time.monotonic()
        try:
            if self.read_timeout is None:
                chunk = await self.reader.read(65536)
            else:
                async with asyncio.timeout(self.read_timeout):
                    chunk = await self.reader.read(65536)
        except TimeoutError:
            raise AgiIdle(f"peer sent nothing for {self.read_timeout:g}s") from None
        finally:
            self.waiting_since = None
        if not chunk:
            return False
        self.buffer += chunk
        return True

    async def readline(self, limit: int) -> bytes:
        """One LF-terminated line of at most ``limit`` bytes, or the partial line at EOF."""
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end >= 0:
                if end >= limit:
                    raise AgiError("line too long")
                line = bytes(self.buffer[: end + 1])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > limit:
                raise AgiError("line too long")
            start = len(self.buffer)
            if not await self.fill():
                line = bytes(self.buffer)
                self.buffer.clear()
                return line


async def read_header_block(
    source: AgiStream | asyncio.StreamReader,
    *,
    max_bytes: int = MAX_HEADER_BYTES,
    max_lines: int = MAX_HEADER_LINES,
) -> dict[str, str]:
    """Read headers up to the empty line; raise ``AgiClosed`` on EOF, ``AgiError`` otherwise.

    Each complete line is checked as soon as it arrives, so garbage closes the session at once;
    the block is bounded in bytes and lines, so a peer that never sends the empty line costs at
    most ``max_bytes`` of memory (the session timeout bounds its time).
    """
    stream = source if isinstance(source, AgiStream) else AgiStream(source)
    buf = stream.buffer
    checked = 0
    lines = 0
    while True:
        if buf[:1] == b"\n":
            del buf[:1]
            return {}
        end = buf.find(b"\n\n")
        if end >= 0:
            block = bytes(buf[:end])
            del buf[: end + 2]
            if len(block) + 2 > max_bytes:
                raise AgiError("header block too large")
            return parse_header_block(block, max_lines=max_lines)
        last = buf.rfind(b"\n")
        if last >= checked:
            for raw in bytes(buf[checked:last]).split(b"\n"):
                lines += 1
                parse_header_line(_decode(raw))
            checked = last + 1
            if lines > max_lines:
                raise AgiError("too many header lines")
        if len(buf) >= max_bytes:
            raise AgiError("header block too large")
        if not await stream.fill():
            raise AgiClosed("connection closed inside the header block")


def _decode(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="replace").replace("\x00", "")
    return text.rstrip("\r\n")


def script_name(request: str) -> str:
    """Return the routing name of ``agi_network_script``: path without query, slashes trimmed."""
    return request.partition("?")[0].strip("/ ")


def query_params(request: str) -> dict[str, str]:
    """Return the query string of ``agi_network_script`` as a mapping (first value wins)."""
    query = request.partition("?")[2]
    if not query:
        return {}
    from urllib.parse import parse_qsl

    params: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        params.setdefault(key, value)
    return params


def script_args(env: dict[str, str]) -> list[str]:
    """Return ``agi_arg_1..N`` in order, stopping at the first missing index."""
    args: list[str] = []
    while f"agi_arg_{len(args) + 1}" in env:
        args.append(env[f"agi_arg_{len(args) + 1}"])
    return args


# ------------------------------------------------------------------ commands


def quote(value: str) -> str:
    """Quote one argument for res_agi.c's ``parse_args``.

    Double quotes keep blanks inside one word, a backslash makes the next ``"`` or ``\\`` literal.
    A line break cannot travel inside a command (it ends the line), so CR and LF become spaces;
    NUL would end the C string and is removed.
    """
    cleaned = value.replace("\x00", "").replace("\r", " ").replace("\n", " ")
    escaped = cleaned.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


_VERB = re.compile(r"[A-Za-z]+( [A-Za-z]+)*\Z")


def format_command(verb: str, *args: str | int) -> bytes:
    """Encode one command line: ``verb`` as is (``SET VARIABLE``), each argument quoted.

    Raise ``ValueError`` when the line would exceed Asterisk's 8192 bytes or 128 words.
    """
    if not _VERB.match(verb):
        raise ValueError("an AGI verb is one or more ASCII words")
    words = verb.split(" ")
    if len(words) + len(args) > MAX_ARGS - 1:
        raise ValueError("too many AGI arguments")
    parts = [" ".join(words)]
    parts.extend(str(a) if isinstance(a, int) else quote(a) for a in args)
    line = (" ".join(parts) + "\n").encode("utf-8")
    if len(line) > MAX_COMMAND_BYTES:
        raise ValueError("AGI command longer than 8192 bytes")
    return line


def split_command(line: str) -> list[str]:
    """Split a command line the way res_agi.c's ``parse_args`` does (for fakes and tests)."""
    words: list[list[str]] = []
    quoted = escaped = False
    whitespace = True
    for ch in line.rstrip("\n"):
        if ch == '"' and not escaped:
            quoted = not quoted
            if quoted and whitespace:
                words.append([])
                whitespace = False
            continue
        if ch in " \t" and not quoted and not escaped:
            whitespace = True
            continue
        if ch == "\\" and not escaped:
            escaped = True
            continue
        if whitespace:
            words.append([])
            whitespace = False
        words[-1].append(ch)
        escaped = False
    return ["".join(w) for w in words]


# ------------------------------------------------------------------ replies


@dataclass(frozen=True, slots=True)
class AgiReply:
    """One reply. ``result``/``data``/``endpos`` are set on 200; ``text`` holds the rest."""

    code: int
    result: str | None = None
    data: str | None = None
    endpos: int | None = None
    text: str = ""
    lines: tuple[str, ...] = ()
    extra: str = ""
    """What follows ``endpos`` (SPEECH RECOGNIZE adds ``results=<n> ...``)."""

    @property
    def ok(self) -> bool:
        return self.code == 200

    @property
    def result_int(self) -> int | None:
        """``result`` as an integer when it is one (GET DATA answers digits, too)."""
        if self.result is None:
            return None
        try:
            return int(self.result)
        except ValueError:
            return None


_STATUS = re.compile(r"(\d{3})([ -]|\Z)(.*)\Z", re.S)
_RESULT = re.compile(r"result=(\S*)(.*)\Z", re.S)
_ENDPOS = re.compile(r"endpos=(-?\d+)(?:\s+(.*))?\Z", re.S)


def parse_reply_line(line: str) -> AgiReply:
    """Parse one single-line reply; raise ``AgiError`` when it is not one.

    ``200 result=1 (ok) endpos=1234`` gives result ``"1"``, data ``"ok"``, endpos 1234. The data
    may itself hold parentheses and blanks (a variable's value): it runs from the first ``(`` to
    the last ``)``, or to the last ``) endpos=<n>`` when one follows (anything after the
    number is kept in ``extra``).
    """
    text = line.rstrip("\r\n")
    common = _COMMON_REPLIES.get(text)
    if common is not None:
        return common
    m = _STATUS.match(text)
    if not m:
        raise AgiError("not an AGI reply")
    code, sep, rest = int(m.group(1)), m.group(2), m.group(3)
    if sep == "-":
        raise AgiError("continuation line where a reply was expected")
    if code != 200:
        return AgiReply(code=code, text=rest, lines=(text,))
    r = _RESULT.match(rest)
    if not r:
        return AgiReply(code=code, text=rest, lines=(text,))
    result, tail = r.group(1), r.group(2).strip()
    data: str | None = None
    endpos: int | None = None
    extra = ""
    if tail.startswith("("):
        cut = tail.rfind(") endpos=")
        e = _ENDPOS.match(tail, cut + 2) if cut >= 0 else None
        if e:
            data, endpos, extra = tail[1:cut], int(e.group(1)), e.group(2) or ""
        else:
            data = tail[1:-1] if tail.endswith(")") else tail
    elif tail:
        e = _ENDPOS.match(tail)
        if e:
            endpos, extra = int(e.group(1)), e.group(2) or ""
        else:
            data = tail
    return AgiReply(
        code=200, result=result, data=data, endpos=endpos, text=rest, lines=(text,), extra=extra
    )


_COMMON_REPLIES: dict[str, AgiReply] = {}
_COMMON_REPLIES.update(
    (text, parse_reply_line(text))
    for text in ("200 result=0", "200 result=1", "200 result=-1")
)
"""What ``SET VARIABLE``, ``EXEC`` and most commands answer, parsed once (replies are frozen)."""


def parse_reply(lines: Sequence[str]) -> AgiReply:
    """Parse a complete reply: one line, or a ``520-`` block ended by ``520 ...``."""
    if not lines:
        raise AgiError("empty reply")
    first = lines[0].rstrip("\r\n")
    if first.startswith("520-"):
        last = lines[-1].rstrip("\r\n")
        if len(lines) < 2 or not last.startswith("520 "):
            raise AgiError("unterminated 520 block")
        body = [ln.rstrip("\r\n") for ln in lines[1:-1]]
        return AgiReply(
            code=520,
            text="\n".join([first[4:], *body]),
            lines=tuple(ln.rstrip("\r\n") for ln in lines),
        )
    if len(lines) != 1:
        raise AgiError("extra lines after a single-line reply")
    return parse_reply_line(first)


class ReplyAssembler:
    """Turns reply lines into replies, skipping unsolicited ``HANGUP`` lines.

    Feed lines one at a time; ``feed`` returns a reply when one is complete, else None.
    """

    __slots__ = ("_block", "hangups")

    def __init__(self) -> None:
        self._block: list[str] = []
        self.hangups = 0

    def feed(self, line: str) -> AgiReply | None:
        text = line.rstrip("\r\n")
        if self._block:
            if len(self._block) >= MAX_REPLY_LINES:
                raise AgiError("520 block too long")
            self._block.append(text)
            if text.startswith("520 "):
                block, self._block = self._block, []
                return parse_reply(block)
            return None
        if text == HANGUP_LINE:
            self.hangups += 1
            return None
        if text.startswith("520-"):
            self._block = [text]
            return None
        return parse_reply_line(text)


class AgiWriter(Protocol):
    """What ``AgiChannel`` writes commands through (an ``asyncio.StreamWriter`` has it)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class AgiChannel:
    """Commands and replies over one AGI stream pair (a FastAGI socket)."""

    def __init__(self, stream: AgiStream | asyncio.StreamReader, writer: AgiWriter) -> None:
        self.stream = stream if isinstance(stream, AgiStream) else AgiStream(stream)
        self.writer = writer
        self._assembler = ReplyAssembler()

    @property
    def hung_up(self) -> bool:
        """True once Asterisk has written ``HANGUP``: the caller is gone."""
        return self._assembler.hangups > 0

    async def command(self, verb: str, *args: str | int) -> AgiReply:
        """Send one command and return its reply."""
        self.writer.write(format_command(verb, *args))
        await self.writer.drain()
        while True:
            raw = await self.stream.readline(MAX_REPLY_BYTES)
            if not raw.endswith(b"\n"):
                raise AgiClosed("connection closed while a reply was awaited")
            reply = self._assembler.feed(_decode(raw))
            if reply is not None:
                return reply

    async def commands(
        self, commands: Iterable[tuple[str, Sequence[str | int]]]
    ) -> list[AgiReply]:
        """Run commands one after the other, each after the previous reply.

        Never two at once: res_agi.c reads the socket through a stdio ``FILE`` but waits for
        the next command by polling the descriptor, so a second command that arrived with the
        first sits in the ``FILE`` buffer unread until more bytes come, and the call stalls.
        """
        return [await self.command(verb, *args) for verb, args in commands]
