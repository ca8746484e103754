"""Asterisk Manager Interface client: our own CRLF frame reader, login, reconnect with backoff.

The wire (``main/manager.c``): a greeting line ``Asterisk Call Manager/<version>``, then frames
of ``Key: Value`` lines ended by CRLF, each frame ended by an empty line. Values are UTF-8 but a
TCP read may end inside a character, so decoding is incremental across reads.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Final

from gateway.server.config import Secret
from gateway.server.metrics import AdapterMetrics
from gateway.server.supervise import Backoff

log = logging.getLogger(__name__)

Frame = dict[str, str]

MAX_FRAME_BYTES: Final = 256 * 1024
MAX_LINE_CHARS: Final = 64 * 1024


class AmiError(Exception):
    """The manager link broke or answered nonsense: reconnect."""


class AmiAuthError(AmiError):
    """Login refused (``Response: Error``): wrong user or secret."""


class FrameReader:
    """Incremental AMI decoder: feed bytes, get complete frames.

    Repeated keys (``Output``, ``ChanVariable``) are joined with ``\\n``. A frame larger than
    ``max_frame`` characters raises ``AmiError``; the first line may be the greeting, returned
    as ``{"Greeting": ...}``.
    """

    def __init__(self, *, max_frame: int = MAX_FRAME_BYTES, greeting: bool = True) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._lines: list[str] = []
        self._size = 0
        self._max = max_frame
        self._greeting = greeting

    def feed(self, data: bytes) -> list[Frame]:
        """Decode ``data`` and return the frames it completed.

        The complete lines are split off the buffer at once: taking them one at a time copied
        the rest of the buffer for every line, quadratic in a read's size (a 64 KB read of
        events, as under a burst, cost twice as much a frame as reads of one segment)."""
        buffer = self._buffer + self._decoder.decode(data)
        end = buffer.rfind("\n")
        self._buffer = buffer[end + 1 :]
        if len(self._buffer) > MAX_LINE_CHARS:
            raise AmiError("AMI line too long")
        frames: list[Frame] = []
        if end < 0:
            return frames
        for line in buffer[:end].split("\n"):
            line = line.rstrip("\r")
            if self._greeting:
                self._greeting = False
                if not line.startswith("Asterisk Call Manager/"):
                    raise AmiError("not an Asterisk manager greeting")
                frames.append({"Greeting": line})
                continue
            if line == "":
                if self._lines:
                    frames.append(_frame(self._lines))
                    self._lines = []
                    self._size = 0
                continue
            self._size += len(line)
            if self._size > self._max:
                raise AmiError("AMI frame too large")
            self._lines.append(line)
        return frames


def _frame(lines: list[str]) -> Frame:
    frame: Frame = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        value = value[1:] if value.startswith(" ") else value
        frame[key] = f"{frame[key]}\n{value}" if key in frame else value
    return frame


def format_action(fields: dict[str, str]) -> bytes:
    """Encode an action; CR and LF inside values would split the frame, so they are removed."""
    out = []
    for key, value in fields.items():
        clean = str(value).replace("\r", "").replace("\n", "")
        out.append(f"{key}: {clean}\r\n")
    out.append("\r\n")
    return "".join(out).encode("utf-8")


EventCallback = Callable[[Frame], Awaitable[None]]
ConnectCallback = Callable[[], Awaitable[None]]
ChannelsCallback = Callable[[dict[str, Frame]], Awaitable[None]]

STATUS_VARIABLES = "GATEWAY_CONTACT_ID,GATEWAY_ARRIVED"
"""Asked for with every channel in the ``Status`` list after a (re)connect."""


class AmiClient:
    """Keeps one logged-in manager session and hands every event to ``on_event``.

    Reconnects forever with jittered exponential backoff between ``reconnect_min`` and
    ``reconnect_max`` seconds (a refused login waits the maximum); survives Asterisk restarts.
    """

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: Secret,
        *,
        on_event: EventCallback,
        on_connect: ConnectCallback | None = None,
        on_channels: ChannelsCallback | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        ping_interval: float = 20.0,
        events: str = "system,call,agent,dialplan",
        connect_timeout: float = 5.0,
        metrics: AdapterMetrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self.username = username
        self.secret = secret
        self.on_event = on_event
        self.on_connect = on_connect
        self.on_channels = on_channels
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.ping_interval = ping_interval
        self.events = events
        self.connect_timeout = connect_timeout
        self.connected = asyncio.Event()
        self.logins = 0
        self.login_failures = 0
        self.channel_lists = 0
        """Channel lists received (and handed to ``on_channels``) or refused, since start."""
        self._task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Start the connection loop (returns at once; the link comes up in the background)."""
        if self._task is None:
            if self.metrics is not None:
                self.metrics.ami_link(False)  # the series exists (and alerts) before a login
            self._task = asyncio.create_task(self._run(), name="ami")

    async def stop(self) -> None:
        """Close the link and stop reconnecting."""
        task, self._task = self._task, None
        tries = 0
        while task is not None and not task.done():
            # cancelled again until it ends: a cancellation that meets a completing await
            # (a shielded write, a timeout) can be swallowed on Python 3.11, and the link
            # would then run on with nobody waiting for it
            if tries:
                log.warning("AMI link still running after a cancellation; cancelled again")
            tries += 1
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)
        if task is not None and not task.cancelled():
            with contextlib.suppress(Exception):
                task.result()
        self.connected.clear()

    async def _run(self) -> None:
        backoff = Backoff(self.reconnect_min, self.reconnect_max, jitter=0.2)
        failures = 0
        while True:
            logins = self.logins
            try:
                await self._session()
                pause = backoff.next()
            except AmiAuthError:
                self.login_failures += 1
                pause = self.reconnect_max
                log.error("AMI login refused for user %r; retrying in %.0fs",
                          self.username, pause)
            except (OSError, AmiError, TimeoutError, asyncio.IncompleteReadError) as exc:
                if self.logins > logins:  # it was up: start over with short retries
                    failures = 0
                    backoff.reset()
                failures += 1
                pause = backoff.next()
                # the first failure and then one in 20: an Asterisk down for hours is no flood
                level = logging.WARNING if failures % 20 == 1 else logging.DEBUG
                log.log(level, "AMI %s:%d unavailable (%s); retrying in %.1fs (attempt %d)",
                        self.host, self.port, exc or type(exc).__name__, pause, failures)
            except Exception:
                log.exception("AMI session failed")
                pause = backoff.next()
            self.connected.clear()
            if self.metrics is not None:
                self.metrics.ami_link(False)
            await asyncio.sleep(pause)
            if self.metrics is not None:
                self.metrics.ami_reconnect()

    async def _session(self) -> None:
        async with asyncio.timeout(self.connect_timeout):  # see _next
            reader, writer = await asyncio.open_connection(self.host, self.port)
        frames = FrameReader()
        queue: list[Frame] = []
        try:
            await self._login(reader, writer, frames, queue, self.events)
            self.logins += 1
            self.connected.set()
            if self.metrics is not None:
                self.metrics.ami_link(True)
            log.info("AMI logged in to %s:%d", self.host, self.port)
            if self.on_connect is not None:
                await self.on_connect()
            await self._follow(reader, writer, frames, queue)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: FrameReader,
        queue: list[Frame],
        events: str,
    ) -> None:
        greeting = await self._next(reader, frames, queue, self.connect_timeout)
        if "Greeting" not in greeting:
            raise AmiError("no greeting")
        action_id = f"gateway-login-{next(self._ids)}"
        writer.write(format_action({
            "Action": "Login",
            "Username": self.username,
            "Secret": self.secret.reveal(),
            "Events": events,
            "ActionID": action_id,
        }))
        await writer.drain()
        while True:
            # Asterisk answers a bad login after a 1 s delay, then closes.
            frame = await self._next(reader, frames, queue, self.connect_timeout + 2)
            if frame.get("ActionID") == action_id and "Response" in frame:
                break
        if frame.get("Response") != "Success":
            raise AmiAuthError(frame.get("Message", "authentication failed"))

    async def originate(self, fields: dict[str, str], wait: float) -> Frame:
        """Place a call: ``Originate`` (``Async: true``) on a session of its own, and return
        its ``OriginateResponse`` event (``Response: Success`` once the called party answered,
        ``Failure`` with a ``Reason`` code otherwise).

        A session of its own, so that any instance can dial (the follower's link belongs to
        the lease holder). Raise ``AmiError`` when the manager refuses the action (``write =
        originate`` missing), or no response comes within ``wait`` seconds.
        """
        async with asyncio.timeout(self.connect_timeout):  # see _next
            reader, writer = await asyncio.open_connection(self.host, self.port)
        frames = FrameReader()
        queue: list[Frame] = []
        loop = asyncio.get_running_loop()
        try:
            await self._login(reader, writer, frames, queue, "call")
            action_id = f"gateway-originate-{secrets.token_hex(8)}"
            writer.write(format_action(
                {"Action": "Originate", **fields, "Async": "true", "ActionID": action_id}
            ))
            await writer.drain()
            until = loop.time() + wait
            while True:
                try:
                    frame = await self._next(reader, frames, queue, max(0.05, until - loop.time()))
                except TimeoutError:
                    raise AmiError("no OriginateResponse in time") from None
                if frame.get("ActionID") != action_id:
                    continue
                if frame.get("Event") == "OriginateResponse":
                    return frame
                if "Response" in frame and frame["Response"] != "Success":
                    raise AmiError(f"Originate refused: {frame.get('Message', '')}")
        finally:
            with contextlib.suppress(Exception):
                writer.write(format_action({"Action": "Logoff"}))
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()

    async def _follow(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: FrameReader,
        queue: list[Frame],
    ) -> None:
        def ping() -> None:
            if not writer.transport.is_closing():  # lost meanwhile: the read sees its end
                writer.write(format_action({"Action": "Ping", "ActionID": "gateway-ping"}))

        silence = _Silence(self.ping_interval, ping, writer.transport.abort)
        try:
            await self._follow_frames(reader, writer, frames, queue, silence)
        finally:
            silence.cancel()

    async def _follow_frames(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: FrameReader,
        queue: list[Frame],
        silence: _Silence,
    ) -> None:
        listing: dict[str, Frame] | None = None
        list_id = ""
        if self.on_channels is not None:
            # The channels alive now, with the gateway's variables: calls that ended while the
            # link was down are not among them, calls that started then are. Needs ``write =
            # call`` (or system/reporting) in manager.conf; refused, it is simply skipped.
            list_id = f"gateway-channels-{next(self._ids)}"
            listing = {}
            writer.write(format_action({
                "Action": "Status", "ActionID": list_id, "Variables": STATUS_VARIABLES,
            }))
            await writer.drain()
        while True:
            while not queue:  # no timer a read: the link's silence is watched by one timer
                silence.since = silence.loop.time()
                data = await reader.read(65536)
                silence.since = None
                silence.pinged = False
                if not data:
                    raise AmiError("no answer to Ping" if silence.failed else "connection closed")
                queue.extend(frames.feed(data))
            frame = queue.pop(0)
            if listing is not None and frame.get("ActionID") == list_id:
                if frame.get("Response", "Success") != "Success":
                    log.warning("AMI Status refused (%s): no channel check after reconnect; "
                                "give the manager user write = call", frame.get("Message", ""))
                    listing = None
                    self.channel_lists += 1
                elif frame.get("Event") == "Status" and frame.get("Uniqueid"):
                    listing[frame["Uniqueid"]] = frame
                elif frame.get("Event") == "StatusComplete":
                    live, listing = listing, None
                    if self.on_channels is not None:
                        await self.on_channels(live)
                    self.channel_lists += 1
                continue
            if "Event" in frame:
                if self.metrics is not None and "Timestamp" in frame:
                    with contextlib.suppress(ValueError):  # timestampevents = yes
                        self.metrics.ami_event_lag(time.time() - float(frame["Timestamp"]))
                try:
                    await self.on_event(frame)
                except Exception:
                    log.exception("AMI event handler failed on %s", frame.get("Event"))

    async def _next(
        self, reader: asyncio.StreamReader, frames: FrameReader, queue: list[Frame], wait: float
    ) -> Frame:
        while not queue:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation (a stop)
            # that meets a read's completion, and the session would go on for ever
            async with asyncio.timeout(wait):
                data = await reader.read(65536)
            if not data:
                raise AmiError("connection closed")
            queue.extend(frames.feed(data))
        return queue.pop(0)


class _Silence:
    """``ping_interval`` on the manager link by one timer for the link, instead of an
    ``asyncio.timeout`` around every read (a timer set and cancelled each time, 5-15 us on
    uvloop; a call brings tens of events, and a quiet line a read or two each): a read that
    has waited ``interval`` gets a ``Ping`` sent, and when nothing is read for another
    ``interval`` the link is aborted (the read sees its end: ``failed`` tells why).

    The reader sets ``since`` when a read starts and clears it (and ``pinged``) when the read
    returns; only the time spent waiting in a read counts, as with the timeout per read."""

    __slots__ = ("_abort", "_handle", "_ping", "failed", "interval", "loop", "pinged", "since")

    def __init__(
        self, interval: float, ping: Callable[[], None], abort: Callable[[], None]
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.interval = interval
        self._ping = ping
        self._abort = abort
        self.since: float | None = None
        """``loop.time()`` when the read under way began; None between reads."""
        self.pinged = False
        """A Ping was sent and nothing was read since."""
        self.failed = False
        """The link was aborted for its silence."""
        self._handle: asyncio.TimerHandle | None = self.loop.call_later(interval, self._check)

    def _check(self) -> None:
        now = self.loop.time()
        since = self.since
        if since is None or now - since < self.interval:  # not silent for long enough yet
            start = now if since is None else since
            self._handle = self.loop.call_at(start + self.interval, self._check)
            return
        if self.pinged:
            self._handle = None
            self.failed = True
            self._abort()
            return
        self.pinged = True
        self.since = now
        self._ping()
        self._handle = self.loop.call_at(now + self.interval, self._check)

    def cancel(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()
