"""A fake Asterisk: FastAGI sessions from recorded header blocks, and an AMI server replaying
recorded transcripts, both over real TCP sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.channels.voice.agi import split_command
from gateway.testing.agi import mset_variables

FIXTURES = Path(__file__).parent / "fixtures"


def agi_fixture(name: str) -> bytes:
    return (FIXTURES / "agi" / name).read_bytes()


def ami_fixture(name: str, **values: str) -> bytes:
    data = (FIXTURES / "ami" / name).read_bytes()
    for key, value in values.items():
        data = data.replace(("{" + key + "}").encode(), value.encode())
    return data


LIVE_SESSION_END = b"\r\n-- connection closed --\r\n\r\n"
"""Where a live capture's manager connection was closed by Asterisk (fixtures/README.md)."""


def live_sessions(name: str, **values: str) -> list[tuple[bytes, bool]]:
    """A live capture cut into manager sessions: each but the last is closed after it."""
    parts = ami_fixture(name, **values).split(LIVE_SESSION_END)
    return [(part, n < len(parts) - 1) for n, part in enumerate(parts)]


def live_originates(name: str) -> list[bytes]:
    """A live capture of several ``Originate`` actions, cut into what each one brought: its
    ``Response``, its ``OriginateResponse`` and the events of its call that followed."""
    data = ami_fixture(name)
    starts = [m.start() for m in re.finditer(rb"Response: Success\r\nActionID: gateway-originate-",
                                             data)]
    return [data[a:b] for a, b in zip(starts, [*starts[1:], len(data)], strict=True)]


def live_transcript(name: str) -> list[tuple[str, bytes]]:
    """A live FastAGI capture (fixtures/README.md): ``("A", line)`` Asterisk sent, ``("G", line)``
    the gateway sent, each line with its LF."""
    text = (FIXTURES / "agi" / name).read_text(encoding="utf-8")
    return [(line[0], line[3:].encode() + b"\n") for line in text.splitlines()]


async def replay_asterisk(port: int, transcript: list[tuple[str, bytes]]) -> list[bytes]:
    """Play Asterisk's side of a live capture: send its lines, and after each line of the
    gateway's it expects, read one line. Return what the server sent, line by line, until it
    closed (or until a line differed from the capture)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent: list[bytes] = []
    try:
        for side, line in transcript:
            if side == "A":
                writer.write(line)
                continue
            await writer.drain()
            got = await reader.readline()
            sent.append(got)
            if got != line:
                return sent
        rest = await reader.read()
        if rest:
            sent.append(rest)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return sent


def asterisk_reply(argv: list[str], linkedid: str = "1795594483.0") -> bytes:
    """What res_agi.c answers to the commands the intake sends."""
    verb = " ".join(argv[:2]).upper()
    if verb == "GET VARIABLE":
        if argv[2:] == ["CHANNEL(linkedid)"]:
            return f"200 result=1 ({linkedid})\n".encode()
        return b"200 result=0\n"
    if verb == "SET VARIABLE":
        if len(argv) != 4:
            return (
                b"520-Invalid command syntax.  Proper usage follows:\n"
                b"Usage: SET VARIABLE <variablename> <value>\n"
                b"520 End of proper usage.\n"
            )
        return b"200 result=1\n"
    if argv[:1] == ["EXEC"] and len(argv) >= 2:
        return b"200 result=0\n" if argv[1].lower() == "mset" else b"200 result=-2\n"
    return b"510 Invalid or unknown command\n"


Script = Callable[[int, list[str]], bytes | None]
"""Given the command's index and words, the bytes to answer (None: close the socket)."""


@dataclass
class AgiTranscript:
    commands: list[list[str]] = field(default_factory=list)
    closed_by_server: bool = False
    stalled: bool = False
    """A command arrived before the previous reply: Asterisk would not have read it."""

    @property
    def variables(self) -> dict[str, str]:
        """What SET VARIABLE and EXEC MSet (comma-separated ``name=value``) set, in order."""
        found: dict[str, str] = {}
        for c in self.commands:
            if len(c) == 4 and [w.upper() for w in c[:2]] == ["SET", "VARIABLE"]:
                found[c[2]] = c[3]
            elif len(c) == 3 and c[0] == "EXEC" and c[1].lower() == "mset":
                found.update(mset_variables(c[2]))
        return found




async def fake_call(
    port: int,
    header: bytes,
    script: Script | None = None,
    *,
    linkedid: str = "1795594483.0",
    send_eof_after_header: bool = False,
) -> AgiTranscript:
    """Play one FastAGI call: send ``header``, answer each command, wait for the server to close.

    Reads like res_agi.c's ``run_agi``: it waits until the socket is readable, then takes one
    line through a buffered ``FILE`` (``fgets``) and answers it. Lines that came in the same read
    stay in that buffer until the socket is readable again, so a server that sends a command
    before the previous reply stalls here as it would on Asterisk (``stalled`` is set).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = AgiTranscript()
    buffered = bytearray()  # the FILE buffer
    try:
        writer.write(header)
        await writer.drain()
        if send_eof_after_header:
            writer.write_eof()
        while True:
            try:
                chunk = await reader.read(65536)  # poll() said readable; fgets fills the FILE
            except ConnectionError:
                chunk = b""
            if not chunk:
                out.closed_by_server = True
                break
            buffered += chunk
            end = buffered.find(b"\n")
            if end < 0:
                continue
            line = bytes(buffered[: end + 1])
            del buffered[: end + 1]
            if b"\n" in buffered:
                out.stalled = True  # a whole command waits in the FILE buffer, unseen by poll()
            argv = split_command(line.decode("utf-8"))
            out.commands.append(argv)
            answer = (
                script(len(out.commands) - 1, argv)
                if script is not None
                else asterisk_reply(argv, linkedid)
            )
            if answer is None:
                break
            writer.write(answer)
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return out


class FakeAmi:
    """A manager server: greets, checks the login, then replays one transcript per connection.

    Each successful login takes the next ``(transcript, close)`` from ``sessions`` (the
    connection is closed after it when ``close``, kept open otherwise; idle when none is left).
    Writes go out in ``chunk``-byte pieces so that UTF-8 characters and CRLF pairs are split
    across TCP reads.
    """

    def __init__(
        self,
        sessions: list[tuple[bytes, bool]],
        *,
        username: str = "gateway",
        secret: str = "s3cret",
        chunk: int = 7,
        live_channels: list[str] | None = None,
        answer_ping: bool = True,
        uptime: int = 100,
        booted: bool = True,
        status_answer: bytes | None = None,
    ) -> None:
        self.sessions = list(sessions)
        self.live_channels = live_channels
        """Uniqueids listed by ``Status``; None answers it like a user without ``write = call``
        (Permission denied)."""
        self.channel_info: dict[str, dict[str, Any]] = {}
        """Per listed uniqueid: ``variables``, ``bridge``, ``application``, ``seconds``,
        ``caller``, ``exten`` of its ``Status`` entry."""
        self.actions: list[dict[str, str]] = []
        self.answer_ping = answer_ping
        self.uptime = uptime
        self.booted = booted
        """Send a ``FullyBooted`` after login (False: the transcript has the real one)."""
        self.status_answer = status_answer
        """A captured answer to ``Status`` (``{action_id}`` replaced), instead of one built
        from ``live_channels``. The session's transcript then follows that answer, as the
        events captured after it did."""
        self._status_sent = asyncio.Event()
        self.originate_outcomes: list[tuple[str, str]] = []
        """``(Response, Reason)`` of the next ``OriginateResponse`` events (default: answered,
        ``Success``/``4``)."""
        self.originated = 0
        self.originate_answers: list[bytes] = []
        """Captured answers to the next ``Originate`` actions (``live_originates``)."""
        """``Uptime`` of the ``FullyBooted`` event after login (seconds since Asterisk started)."""
        self.username = username
        self.secret = secret
        self.chunk = chunk
        self.logins: list[dict[str, str]] = []
        self.accepted = 0
        self.refused = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.done = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            writer.write(b"Asterisk Call Manager/11.0.0\r\n")
            await writer.drain()
            action = await _read_frame(reader)
            self.logins.append(action)
            action_id = action.get("ActionID", "")
            if action.get("Username") != self.username or action.get("Secret") != self.secret:
                self.refused += 1
                await asyncio.sleep(0.05)  # Asterisk waits 1 s; kept short here
                writer.write(
                    f"Response: Error\r\nActionID: {action_id}\r\n"
                    "Message: Authentication failed\r\n\r\n".encode()
                )
                await writer.drain()
                return
            writer.write(
                f"Response: Success\r\nActionID: {action_id}\r\n"
                "Message: Authentication accepted\r\n\r\n".encode()
            )
            if self.booted:
                writer.write(
                    b"Event: FullyBooted\r\nPrivilege: system,all\r\n"
                    b"Timestamp: 1795594480.000001\r\nStatus: Fully Booted\r\n"
                    + f"Uptime: {self.uptime}\r\nLastReload: {self.uptime}\r\n\r\n".encode()
                )
            self.accepted += 1
            lock = asyncio.Lock()  # whole frames only: action answers never split an event
            actions = asyncio.create_task(self._answer_actions(reader, writer, lock))
            if not self.sessions:
                await actions  # idle (answering actions) until the client leaves
                return
            data, close = self.sessions.pop(0)
            if self.status_answer is not None:
                self._status_sent.clear()
                await self._status_sent.wait()
            for event in data.split(b"\r\n\r\n"):
                if not event:
                    continue
                async with lock:
                    frame = event + b"\r\n\r\n"
                    for i in range(0, len(frame), self.chunk):
                        writer.write(frame[i : i + self.chunk])
                        await writer.drain()
            if not self.sessions:
                self.done.set()
            if close:
                actions.cancel()
            else:
                await actions
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


    def status_reply(self, action_id: str, variables: str) -> str:
        """What manager.c's ``action_status`` answers: one ``Status`` event per channel, with
        a ``Variable: NAME=value`` line per asked variable, then ``StatusComplete``."""
        reply = (f"Response: Success\r\nActionID: {action_id}\r\nEventList: start\r\n"
                 "Message: Channel status will follow\r\n\r\n")
        names = [v for v in variables.split(",") if v]
        for n, uid in enumerate(self.live_channels or []):
            info = self.channel_info.get(uid, {})
            values = info.get("variables", {})
            # an unset variable comes as NAME=(null): glibc printing a NULL (seen on 22.10.1)
            lines = "".join(f"Variable: {v}={values.get(v, '(null)')}\r\n" for v in names)
            reply += (
                f"Event: Status\r\nPrivilege: Call\r\nChannel: PJSIP/live-{n:08x}\r\n"
                f"ChannelState: 6\r\nChannelStateDesc: Up\r\n"
                f"CallerIDNum: {info.get('caller', '13800138000')}\r\n"
                f"CallerIDName: <unknown>\r\nConnectedLineNum: <unknown>\r\n"
                f"ConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
                f"Context: from-citizens\r\nExten: {info.get('exten', '12345')}\r\n"
                f"Priority: 6\r\nUniqueid: {uid}\r\nLinkedid: {uid}\r\nType: PJSIP\r\n"
                f"DNID: {info.get('exten', '12345')}\r\n"
                f"EffectiveConnectedLineNum: <unknown>\r\n"
                f"EffectiveConnectedLineName: <unknown>\r\nTimeToHangup: 0\r\n"
                f"BridgeID: {info.get('bridge', '')}\r\n"
                f"Application: {info.get('application', 'Queue')}\r\n"
                f"Data: hotline,t,,,600\r\nNativeformats: (ulaw)\r\nReadformat: ulaw\r\n"
                f"Readtrans: \r\nWriteformat: ulaw\r\nWritetrans: \r\nCallgroup: 0\r\n"
                f"Pickupgroup: 0\r\nSeconds: {info.get('seconds', 12)}\r\n{lines}"
                f"ActionID: {action_id}\r\n\r\n"
            )
        reply += (f"Event: StatusComplete\r\nActionID: {action_id}\r\nEventList: Complete\r\n"
                  f"ListItems: {len(self.live_channels or [])}\r\n"
                  f"Items: {len(self.live_channels or [])}\r\n\r\n")
        return reply

    async def _answer_actions(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                action = await _read_frame(reader)
                self.actions.append(action)
                action_id = action.get("ActionID", "")
                name = action.get("Action", "").lower()
                if name == "ping" and not self.answer_ping:
                    continue  # a manager that hangs: the socket stays open, nothing comes back
                if name == "ping":
                    reply = f"Response: Success\r\nActionID: {action_id}\r\nPing: Pong\r\n"
                    reply += "Timestamp: 1795594483.000000\r\n\r\n"
                elif name == "originate" and self.originate_answers:
                    self.originated += 1  # a captured answer, under this action's id
                    captured = self.originate_answers.pop(0).decode()
                    reply = re.sub(r"gateway-originate-\d+", action_id, captured)
                elif name == "originate":
                    self.originated += 1
                    reply = (f"Response: Success\r\nActionID: {action_id}\r\n"
                             "Message: Originate successfully queued\r\n\r\n")
                    response, reason = self.originate_outcomes.pop(0) if (
                        self.originate_outcomes) else ("Success", "4")
                    uid = f"1795594600.{self.originated}"
                    # manager.c's originate thread, once the called party answered or not
                    reply += (
                        "Event: OriginateResponse\r\nPrivilege: call,all\r\n"
                        f"Timestamp: 1795594601.{self.originated:06d}\r\n"
                        f"ActionID: {action_id}\r\nResponse: {response}\r\n"
                        f"Channel: {action.get('Channel', '')}\r\n"
                        f"Context: {action.get('Context', '')}\r\n"
                        f"Exten: {action.get('Exten', '')}\r\nApplication: \r\nData: \r\n"
                        f"Reason: {reason}\r\nUniqueid: {uid}\r\n"
                        "CallerIDNum: <unknown>\r\nCallerIDName: <unknown>\r\n\r\n"
                    )
                elif name == "logoff":
                    reply = (f"Response: Goodbye\r\nActionID: {action_id}\r\n"
                             "Message: Thanks for all the fish.\r\n\r\n")
                elif name == "status" and self.live_channels is None:
                    reply = (f"Response: Error\r\nActionID: {action_id}\r\n"
                             "Message: Permission denied\r\n\r\n")
                elif name == "status" and self.status_answer is not None:
                    reply = self.status_answer.decode().replace("{action_id}", action_id)
                elif name == "status":
                    reply = self.status_reply(action_id, action.get("Variables", ""))
                else:
                    reply = (f"Response: Error\r\nActionID: {action_id}\r\n"
                             "Message: Invalid/unknown command\r\n\r\n")
                async with lock:
                    writer.write(reply.encode())
                    await writer.drain()
                if name == "status":
                    self._status_sent.set()


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, str]:
    frame: dict[str, str] = {}
    while True:
        line = (await reader.readuntil(b"\r\n")).decode()[:-2]
        if not line:
            return frame
        key, _, value = line.partition(": ")
        frame[key] = value


@dataclass
class DialplanIntake:
    """What the sample dialplan's intake steps did: one entry per gateway tried."""

    attempts: list[tuple[int, str]] = field(default_factory=list)
    """``(port, outcome)``: ``FAILURE`` (connect refused: res_agi.c sets AGISTATUS=FAILURE),
    ``T`` (``GATEWAY_AGI_WAIT`` passed: the absolute timeout ended AGI(), the T extension went
    on to the next gateway), ``FAILED`` (answered without a contact) or ``OK``/``SPOOLED``."""
    call: AgiTranscript | None = None


async def dialplan_intake(ports: list[int], header: bytes, waits: list[float]) -> DialplanIntake:
    """Play the sample dialplan's intake (deploy/asterisk/extensions.conf) as Asterisk runs it:
    ``AGI(${GATEWAY_AGI_<n>})`` for n = 1, 2, ... until a gateway answers ``OK``/``SPOOLED``.

    ``launch_netscript`` fails at once on a refused connect (and after ``MAX_AGI_CONNECT``, 2 s,
    on a silent host). A stopped gateway's kernel accepts the connection into its backlog, and
    ``run_agi`` waits for commands with no timeout of its own: ``TIMEOUT(absolute)`` set before
    AGI() soft-hangs the channel after ``GATEWAY_AGI_WAIT``; with ``AGIEXITONHANGUP=yes``
    run_agi then closes the socket at once, and the pbx loop goes to the T extension, which
    tries the next gateway. Both are played here: a refused connect, and a socket closed by us
    when that gateway's ``waits`` entry (``GATEWAY_AGI_WAIT``) passes.
    """
    done = DialplanIntake()
    for port, wait in zip(ports, waits, strict=True):
        try:
            async with asyncio.timeout(wait):
                call = await fake_call(port, header)
        except TimeoutError:
            done.attempts.append((port, "T"))
            continue
        except OSError:
            done.attempts.append((port, "FAILURE"))
            continue
        status = call.variables.get("GATEWAY_STATUS", "FAILED")
        done.attempts.append((port, status))
        if status in ("OK", "SPOOLED"):
            done.call = call
            break
    return done
