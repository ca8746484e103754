"""The kit for FastAGI adapters: deliveries are calls a fake Asterisk plays over TCP.

A call sends its AGI header block (``agi_*`` lines, then an empty line) and answers each
command as res_agi.c does. The adapter acknowledges a call by setting the status variable to
a success value (the contact is durable); anything else (a failure value, or the connection
closed without one) sends the call down the dialplan's fail path: for a good call while nothing
can be stored that is the retry-later, for a bad header block the refusal.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.testing.contract import Delivery, KitAdapter, Outcome, ProviderAnswer

if TYPE_CHECKING:
    from gateway.server.runtime import Gateway


def header_block(uniqueid: str, callerid: str, dnid: str, **extra: str) -> bytes:
    """An AGI header block as Asterisk 22 sends it for a FastAGI call."""
    fields = {
        "agi_network": "yes", "agi_network_script": "intake",
        "agi_request": "agi://127.0.0.1/intake", "agi_channel": "PJSIP/kit-00000001",
        "agi_language": "en", "agi_type": "PJSIP", "agi_uniqueid": uniqueid,
        "agi_version": "22.10.1", "agi_callerid": callerid or "unknown",
        "agi_calleridname": "Kit Caller", "agi_callingpres": "0", "agi_callingani2": "0",
        "agi_callington": "0", "agi_callingtns": "0", "agi_dnid": dnid, "agi_rdnis": "unknown",
        "agi_context": "intake", "agi_extension": dnid, "agi_priority": "3",
        "agi_enhanced": "0.0", "agi_accountcode": "", "agi_threadid": "140206706226880",
        **extra,
    }
    return "".join(f"{k}: {v}\n" for k, v in fields.items()).encode() + b"\n"


def _answer(argv: list[str], linkedid: str) -> bytes:
    """What res_agi.c answers to the commands an intake script sends."""
    verb = " ".join(argv[:2]).upper()
    if verb == "GET VARIABLE":
        if argv[2:] == ["CHANNEL(linkedid)"]:
            return f"200 result=1 ({linkedid})\n".encode()
        return b"200 result=0\n"
    if verb == "SET VARIABLE":
        return b"200 result=1\n" if len(argv) == 4 else b"520 Invalid command syntax.\n"
    if argv[:1] == ["EXEC"] and len(argv) >= 2:
        return b"200 result=0\n" if argv[1].lower() == "mset" else b"200 result=-2\n"
    return b"510 Invalid or unknown command\n"


def separate_args(buf: str, delim: str, arraylen: int) -> list[str]:
    """``__ast_app_separate_args`` of main/app.c with ``remove_chars`` (how MSet splits its
    argument, then each pair): no split inside ``()``/``[]`` or double quotes, quotes dropped,
    a backslash makes the next character literal; the last of ``arraylen`` takes the rest."""
    args: list[str] = []
    i, paren, bracket, quote = 0, 0, 0, False
    ended_on_delim = False
    while i < len(buf) and len(args) < arraylen - 1:
        word: list[str] = []
        ended_on_delim = False
        while i < len(buf):
            ch = buf[i]
            if ch == "(":
                paren += 1
            elif ch == ")":
                paren = max(0, paren - 1)
            elif ch == "[":
                bracket += 1
            elif ch == "]":
                bracket = max(0, bracket - 1)
            elif ch == '"' and delim != '"':
                quote = not quote
                i += 1
                continue
            elif ch == "\\":
                i += 1
                if i < len(buf):
                    word.append(buf[i])
                i += 1
                continue
            elif ch == delim and not paren and not quote and not bracket:
                i += 1
                ended_on_delim = True
                break
            word.append(ch)
            i += 1
        args.append("".join(word))
    if i < len(buf) or ended_on_delim:
        args.append(buf[i:])
    return args


def mset_variables(argument: str) -> dict[str, str]:
    """What ``EXEC MSet <argument>`` sets (``pbx_builtin_setvar_multiple``: up to 99 pairs
    split on commas, each at its first ``=``; a pair without ``=`` is ignored)."""
    found: dict[str, str] = {}
    for pair in separate_args(argument, ",", 99):
        name_value = separate_args(pair, "=", 2)
        if len(name_value) == 2:
            found[name_value[0]] = name_value[1]
    return found


async def call(port: int, header: bytes, *, linkedid: str = "",
               host: str = "127.0.0.1") -> dict[str, str]:
    """Play one call; return the variables the server set (SET VARIABLE and EXEC MSet)."""
    reader, writer = await asyncio.open_connection(host, port)
    variables: dict[str, str] = {}
    try:
        writer.write(header)
        await writer.drain()
        while line := await reader.readline():
            try:
                argv = shlex.split(line.decode("utf-8", "replace"))
            except ValueError:
                argv = []
            if len(argv) == 4 and [w.upper() for w in argv[:2]] == ["SET", "VARIABLE"]:
                variables[argv[2]] = argv[3]
            elif len(argv) == 3 and argv[0] == "EXEC" and argv[1].lower() == "mset":
                variables.update(mset_variables(argv[2]))
            writer.write(_answer(argv, linkedid or header_uniqueid(header)))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    return variables


def header_uniqueid(header: bytes) -> str:
    for line in header.decode("utf-8", "replace").splitlines():
        if line.startswith("agi_uniqueid:"):
            return line.partition(":")[2].strip()
    return ""


@dataclass(frozen=True)
class AgiKit(KitAdapter):
    """How the kit reaches one FastAGI adapter listening on ``port_of(adapter)``.

    ``header(message_id, text)`` is a call's header block (by default from ``phone`` to
    ``dnid``, the message id as ``agi_uniqueid``; a call carries no text). ``bad`` are header
    blocks that must take the fail path and store nothing. ``status`` is the variable the
    adapter sets; ``success`` its values that acknowledge a durable contact.
    """

    type: str
    table: Mapping[str, Any]
    bad: Sequence[bytes]
    phone: str
    dnid: str = "12345"
    secrets: Sequence[str] = ()
    status: str = "GATEWAY_STATUS"
    success: Collection[str] = ("OK", "SPOOLED")
    reply_config: Callable[[str], Mapping[str, Any]] | None = None
    reply_answer: ProviderAnswer = field(default_factory=ProviderAnswer)
    name: str = "kit"
    until_ready: Callable[[Gateway], Awaitable[None]] | None = None
    port_of: Callable[[Any], int] = lambda adapter: int(adapter.port)

    def header(self, message_id: str, text: str) -> bytes:
        return header_block(message_id, self.phone, self.dnid)

    def port(self, gateway: Gateway) -> int:
        return self.port_of(gateway.adapters[self.name])

    def _delivery(self, variables: dict[str, str], fail: Outcome) -> Delivery:
        value = variables.get(self.status)
        outcome: Outcome = "ok" if value in self.success else fail
        return Delivery(outcome, f"{self.status}={value}" if value is not None
                        else "closed without a status")

    async def deliver(self, gateway: Gateway, message_id: str, text: str) -> Delivery:
        return await self.play(gateway, self.header(message_id, text))

    async def play(self, gateway: Gateway, header: bytes, fail: Outcome = "retry") -> Delivery:
        """One call with this header block; ``fail``: the outcome of the fail path."""
        return self._delivery(await call(self.port(gateway), header), fail)

    async def refusals(self, gateway: Gateway) -> list[Delivery]:
        return [await self.play(gateway, header, "refused") for header in self.bad]
