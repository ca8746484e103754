"""The SMTP path's own work per 2 KB mail in instructions (cachegrind), piece by piece: counts
the machine's load does not move.

Each piece runs in a process of its own under ``valgrind --tool=cachegrind`` twice, with no
mail and with ``--mails`` mails (``email_bench``'s 2 KB message, a new Message-ID each), and the
difference is divided by the mails (start-up and imports cancel out):

- ``normalize``: ``normalize`` of the message (one-part, GBK subject, UTF-8 body);
- ``listener``: our listener with an accept step that does nothing, driven over loopback by a
  lockstep client in the same process (``MAIL``, ``RCPT``, ``DATA``, the message, each reply
  awaited, as aiosmtplib sends): the client's instructions are in the count, the same for
  every tree, so compare trees, not this figure with ``bare``;
- ``accept``: ``EmailAdapter.accept`` with an intake that answers at once (no Redis) and the
  real attachment store (its plan, the raw message written behind in its writer thread with
  ``syncfs``): ``normalize`` is in it. Under valgrind hashlib's SHA-256 runs without the CPU's
  SHA instructions (~80K instructions for the 2 KB raw message, against ~2.5 µs natively), and
  the store hashes it twice (plan, then the writer).

    .venv/bin/python -m bench.email_cost                         # about a minute
    .venv/bin/python -m bench.email_cost --before DIR            # and an older tree

``--before DIR``: a source tree (``git archive <commit> | tar -x -C DIR``), measured the same
way. Needs ``valgrind``. ``PYTHONHASHSEED=0`` in every run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PIECES = ("normalize", "listener", "accept")


def _mails(count: int) -> list[bytes]:
    from bench.email_bench import message

    template = message(2048)
    return [template.replace(b"@@ID@@", b"cost-%d" % i) for i in range(count + 1)]


def _normalize(count: int) -> None:
    from gateway.channels.email.normalize import Envelope, Options, normalize

    raw = _mails(0)[0]
    envelope = Envelope("citizen@example.org", ("12345@hotline.example.gov.cn",), "127.0.0.1")
    options = Options()
    normalize(raw, envelope, options)
    for _ in range(count):
        normalize(raw, envelope, options)


async def _listener(count: int) -> None:
    from bench.email_bench import MAILBOX, _accept_nothing
    from gateway.channels.email.common import EmailConfig
    from gateway.channels.email.smtp import Handler, Listener
    from gateway.server.config import HostPort

    async def reply(reader: asyncio.StreamReader) -> bytes:
        while (line := await reader.readline())[3:4] == b"-":
            pass
        return line

    config = EmailConfig(listen=HostPort("127.0.0.1", 0), mailboxes=(MAILBOX,))
    listener = Listener(config, Handler(config, _accept_nothing))
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    await reply(reader)
    writer.write(b"EHLO load.example.org\r\n")
    await reply(reader)
    commands = (b"MAIL FROM:<citizen@example.org>\r\n", f"RCPT TO:<{MAILBOX}>\r\n".encode(),
                b"DATA\r\n")
    for raw in _mails(count):
        for command in commands:
            writer.write(command)
            await reply(reader)
        writer.write(raw + b".\r\n")
        if (await reply(reader))[:3] != b"250":
            raise RuntimeError("mail not taken")
    writer.write(b"QUIT\r\n")
    await reply(reader)
    writer.close()
    await listener.stop()


async def _accept(count: int) -> None:
    from gateway.channels.email.adapter import EmailAdapter
    from gateway.channels.email.normalize import Envelope, Options
    from gateway.contact.attachments import AttachmentStore

    class Holder:
        key = "{cost}:held:x"

        async def fetch(self, digest: str) -> bytes | None:
            return None

        async def release(self, digests: Any) -> None:
            return None

        async def held(self) -> list[str]:
            return []

    class Intake:
        async def submit(self, inbound: Any, held: Any = None) -> Any:
            return types.SimpleNamespace(status="enqueued", contact_id="0" * 8)

    class Clock:
        def now_us(self) -> int:
            return 1_764_000_000_000_000

    folder = tempfile.mkdtemp(prefix="email-cost-")
    store = AttachmentStore(Path(folder), 25 << 20)
    store.hold_in(Holder())
    store.behind_interval = 0.0
    adapter: Any = types.SimpleNamespace(
        ctx=types.SimpleNamespace(clock=Clock(), attachments=store, intake=Intake()),
        listener=types.SimpleNamespace(hostname="gw.example.org"),
        options=Options(),
        name="mail",
        config=types.SimpleNamespace(ack=types.SimpleNamespace(enabled=False)),
    )
    adapter._should_acknowledge = types.MethodType(EmailAdapter._should_acknowledge, adapter)
    envelope = Envelope("citizen@example.org", ("12345@hotline.example.gov.cn",), "127.0.0.1",
                        "load.example.org")
    mails = _mails(count)
    await EmailAdapter.accept(adapter, mails[-1], envelope)
    await store.close()
    for n, raw in enumerate(mails[:-1]):
        await EmailAdapter.accept(adapter, raw, envelope)
        if n % 32 == 31:  # let the writer's groups go as under load
            await asyncio.sleep(0)
    await store.close()
    shutil.rmtree(folder, ignore_errors=True)


def child(piece: str, count: int) -> None:
    if piece == "normalize":
        _normalize(count)
        return
    import uvloop

    uvloop.run(_listener(count) if piece == "listener" else _accept(count))


def _instructions(piece: str, count: int, src: str) -> int:
    code = (  # this file run as it is, the tree's ``gateway`` (and ``bench``) first on the path
        "import sys, runpy; sys.path[:0] = [p for p in sys.argv[1:3] if p]; "
        "runpy.run_path(sys.argv[5])['child'](sys.argv[3], int(sys.argv[4]))"
    )
    done = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         sys.executable, "-c", code, src, str(ROOT), piece, str(count), __file__],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
        check=False,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode or found is None:
        raise RuntimeError(f"{piece} ({src or 'this tree'}) failed:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mails", type=int, default=200)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument("--pieces", nargs="+", default=list(PIECES), choices=PIECES)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("email_cost: needs valgrind on the path")
    trees = [("now", "")] + ([("before", args.before)] if args.before else [])
    rows: dict[str, dict[str, float]] = {}
    for piece in args.pieces:
        for label, src in trees:
            none = _instructions(piece, 0, src)
            some = _instructions(piece, args.mails, src)
            per = (some - none) / args.mails
            rows.setdefault(piece, {})[label] = per
            print(f"{piece:10} {label:7} {per / 1000:8.1f} K instructions a mail", flush=True)
    print()
    print("| piece | " + " | ".join(label for label, _ in trees) + (" | now / before |"
                                                                        if args.before else " |"))
    print("|---|" + "---:|" * (len(trees) + (1 if args.before else 0)))
    for piece, values in rows.items():
        cells = " | ".join(f"{values[label] / 1000:.1f} K" for label, _ in trees)
        ratio = f" | {values['now'] / values['before']:.3f}" if args.before else ""
        print(f"| {piece} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
