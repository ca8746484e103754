"""Where a mail's time goes between its end of ``DATA`` and its ``250``, timed inside the gateway.

    .venv/bin/python -m bench.email_stages --connections 8 --seconds 5 --rounds 2

The gateway (an ``smtp`` adapter, the embedded Valkey with ``appendfsync always``, the settings
of ``bench/email_bench.py``) runs in this process with bench-only hooks around its SMTP and
intake steps; ``email_bench``'s load (aiosmtplib, persistent connections, 2 KB mails) runs in
a child process. Each mail's wait for its ``250`` is cut into:

- ``hook``: the lone dot read to the handler's ``handle_DATA`` (the content joined);
- ``task``: ``handle_DATA`` to the accept task's first step (a task of its own, shielded);
- ``parse``: the accept step's parse (trace headers, ``normalize``);
- ``prepare``: the parse to ``Intake.submit`` (the store's ``plan``, the meta, the Inbound);
- ``to batch``: submit to the coalescer's batch task running (a call_soon, a task);
- ``encode``: the batch task to the link's write (encoding, packing);
- ``valkey``: the write to the reply's bytes read (Valkey's work and fsync, the scheduling
  of Valkey and of this process);
- ``wake``: the reply read to the batch task resumed;
- ``answer``: the batch task resumed to ``Intake.submit`` returning (futures, the receipt);
- ``settle``: submit's return to the accept task's end (the store's ``settle``);
- ``reply``: the accept task's end to the ``250`` written (the shield, the session's task).

Printed: each stage's p50/p90/p99 and mean, the batch sizes, the time on a CPU and waiting for
one of the gateway and Valkey, Valkey's commands, and (``--strace``) nothing more: run
``strace -c -f -p <pid>`` beside it for the system calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("hook", "task", "parse", "prepare", "to batch", "encode", "valkey", "wake",
          "answer", "settle", "reply")
_MAIL: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
    "mail", default=None)
_BATCH: contextvars.ContextVar[list[dict[str, float]] | None] = contextvars.ContextVar(
    "batch", default=None)


class Hooks:
    """Bench-only wrappers that stamp each mail's steps (``time.monotonic``)."""

    def __init__(self) -> None:
        self.mails: list[dict[str, float]] = []
        self.by_id: dict[str, dict[str, float]] = {}
        self.batches: list[tuple[float, int]] = []
        self.side: list[float] = []
        self.on = False

    def install(self) -> None:
        from gateway.channels.email import adapter as email_adapter
        from gateway.channels.email import smtp as email_smtp
        from gateway.queueing import batching, link
        from gateway.queueing import intake as queue_intake

        hooks = self
        now = time.monotonic

        read_data = email_smtp.GatewaySMTP._read_data

        async def timed_read(self: Any, reading: Any) -> None:
            await read_data(self, reading)
            rec = {"dot": now()} if hooks.on else None
            self._stage_rec = rec
            _MAIL.set(rec)

        email_smtp.GatewaySMTP._read_data = timed_read  # type: ignore[method-assign]

        handle = email_smtp.Handler.handle_DATA

        async def timed_handle(self: Any, server: Any, session: Any, envelope: Any) -> str:
            rec = _MAIL.get()
            if rec is not None:
                rec["hook"] = now()
            return await handle(self, server, session, envelope)

        email_smtp.Handler.handle_DATA = timed_handle  # type: ignore[method-assign]

        push = email_smtp.GatewaySMTP.push

        async def timed_push(self: Any, status: Any) -> None:
            rec = getattr(self, "_stage_rec", None)
            if rec is not None and str(status).startswith("250 2.0.0"):
                rec["sent"] = now()
                hooks.mails.append(rec)
                self._stage_rec = None
            await push(self, status)

        email_smtp.GatewaySMTP.push = timed_push  # type: ignore[method-assign]

        accept = email_adapter.EmailAdapter.accept
        normalize = email_adapter.normalize

        async def timed_accept(self: Any, raw: bytes, envelope: Any) -> str:
            rec = _MAIL.get()
            if rec is not None:
                rec["accept"] = now()
            try:
                return await accept(self, raw, envelope)
            finally:
                if rec is not None:
                    rec["accepted"] = now()

        def timed_normalize(*args: Any) -> Any:
            result = normalize(*args)
            rec = _MAIL.get()
            if rec is not None:
                rec["parsed"] = now()
            return result

        email_adapter.EmailAdapter.accept = timed_accept  # type: ignore[method-assign]
        email_adapter.normalize = timed_normalize

        submit = queue_intake.Intake.submit

        async def intake_submit(self: Any, inbound: Any, **kw: Any) -> Any:
            rec = _MAIL.get()
            if rec is not None:
                rec["submit"] = now()
                hooks.by_id[inbound.external_id] = rec
            try:
                return await submit(self, inbound, **kw)
            finally:
                if rec is not None:
                    rec["submitted"] = now()

        queue_intake.Intake.submit = intake_submit  # type: ignore[method-assign]

        run = batching.Coalescer._run

        async def batch_run(self: Any, batch: list[Any]) -> None:
            recs = [hooks.by_id.pop(getattr(getattr(item, "inbound", None), "external_id", ""),
                                    None) for item, _, _ in batch]
            found = [r for r in recs if r is not None]
            t = now()
            for r in found:
                r["batch"] = t
                r["size"] = len(batch)
            if hooks.on and found:
                hooks.batches.append((t, len(batch)))
            _BATCH.set(found)
            await run(self, batch)
            t = now()
            for r in found:
                r["results"] = t

        batching.Coalescer._run = batch_run  # type: ignore[method-assign]

        send = link.Link.send
        received = link.Link.data_received

        async def link_send(self: Any, payload: bytes, count: int) -> Any:
            recs = _BATCH.get()
            t = now()
            try:
                return await send(self, payload, count)
            finally:
                t2 = now()
                if recs:
                    for r in recs:
                        r["write"] = t
                        r["reply"] = getattr(self, "_stage_in", t2)
                        r["woke"] = t2
                elif hooks.on:
                    hooks.side.append(t2 - t)

        def link_received(self: Any, data: bytes) -> None:
            self._stage_in = now()
            received(self, data)

        link.Link.send = link_send  # type: ignore[method-assign]
        link.Link.data_received = link_received  # type: ignore[method-assign]


def stages(rec: dict[str, float]) -> dict[str, float] | None:
    need = ("dot", "hook", "accept", "parsed", "submit", "batch", "write", "reply", "woke",
            "submitted", "accepted", "sent")
    if any(k not in rec for k in need):
        return None
    ms = 1000.0
    return {
        "hook": (rec["hook"] - rec["dot"]) * ms,
        "task": (rec["accept"] - rec["hook"]) * ms,
        "parse": (rec["parsed"] - rec["accept"]) * ms,
        "prepare": (rec["submit"] - rec["parsed"]) * ms,
        "to batch": (rec["batch"] - rec["submit"]) * ms,
        "encode": (rec["write"] - rec["batch"]) * ms,
        "valkey": (rec["reply"] - rec["write"]) * ms,
        "wake": (rec["woke"] - rec["reply"]) * ms,
        "answer": (rec["submitted"] - rec["woke"]) * ms,
        "settle": (rec["accepted"] - rec["submitted"]) * ms,
        "reply": (rec["sent"] - rec["accepted"]) * ms,
        "total": (rec["sent"] - rec["dot"]) * ms,
    }


def schedstat(pid: int | str) -> tuple[int, int]:
    """Time on a CPU and waiting on a run queue (ns, all threads of the process)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main(args: argparse.Namespace) -> None:
    import logging

    import redis.asyncio as aioredis

    from bench.email_bench import MAILBOX, _measure
    from bench.intake_bench import gateway_classes
    from gateway.queueing.embedded import EmbeddedRedis

    logging.disable(logging.WARNING)
    hooks = Hooks()
    hooks.install()
    with tempfile.TemporaryDirectory(dir=args.dir or None) as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis")
        await server.start()
        parse_settings, Gateway = gateway_classes()
        settings, configs = parse_settings({
            "gateway": {"data_dir": str(Path(tmp) / "gw"), "instance": "bench"},
            "redis": {"url": server.url, "prefix": "st"},
            "http": {"listen": "127.0.0.1:0"},
            "limits": {"sender_contacts": 0},
            "adapters": {"mail": {"type": "smtp", "listen": "127.0.0.1:0",
                                  "mailboxes": [MAILBOX]}},
        })
        gateway = Gateway(settings, configs)
        await gateway.start()
        from gateway.server.runtime import settle_heap

        settle_heap()
        valkey = aioredis.Redis.from_url(server.url)
        port = gateway.adapters["mail"].port
        vpid = server.process.pid if server.process else 0
        print(f"gateway pid {os.getpid()}, Valkey pid {vpid}", flush=True)
        try:
            await _measure(port, 1.0, args.connections, 2048, "warm")
            await valkey.config_resetstat()
            rows: list[dict[str, float]] = []
            for r in range(args.rounds):
                hooks.mails.clear()
                hooks.on = True
                s0 = {"gateway": schedstat(os.getpid()), "Valkey": schedstat(vpid)}
                ok, errors, lat = await _measure(
                    port, args.seconds, args.connections, 2048, f"s{int(time.time())}r{r}")
                s1 = {"gateway": schedstat(os.getpid()), "Valkey": schedstat(vpid)}
                hooks.on = False
                n = max(1, ok)
                print(f"round {r}: {ok} mails ({ok / args.seconds:.0f}/s), {errors} errors, "
                      f"client p50 {pct(lat, 0.5) * 1000:.2f} ms p99 {pct(lat, 0.99) * 1000:.2f}"
                      " ms; on a CPU / waiting for one, us a mail: " + ", ".join(
                          f"{k} {(s1[k][0] - s0[k][0]) / n / 1000:.0f} / "
                          f"{(s1[k][1] - s0[k][1]) / n / 1000:.0f}" for k in s0), flush=True)
                rows += [c for c in (stages(m) for m in hooks.mails) if c is not None]
                await asyncio.sleep(0.3)
            cols = [*STAGES, "total"]
            print(f"{len(rows)} mails timed; ms per stage, end of DATA to 250:")
            print(f"{'':>6} " + " ".join(f"{c:>8}" for c in cols))
            for label, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                print(f"{label:>6} " + " ".join(f"{pct([r[c] for r in rows], q):8.3f}"
                                               for c in cols))
            print(f"{'mean':>6} " + " ".join(f"{statistics.fmean(r[c] for r in rows):8.3f}"
                                            for c in cols))
            sizes = [s for _, s in hooks.batches]
            if sizes:
                print(f"batches with a mail: {len(sizes)}, mails a batch mean "
                      f"{statistics.fmean(sizes):.2f}, max {max(sizes)}")
            if hooks.side:
                print(f"other sends on the links: {len(hooks.side)}, round trip p50 "
                      f"{pct(hooks.side, 0.5) * 1000:.2f} ms")
            stats = await valkey.info("commandstats")
            top = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:8]
            print("Valkey commandstats (calls, usec, usec a call):")
            for name, s in top:
                print(f"    {name:<28} {s['calls']:>8} {s['usec']:>10} {s['usec_per_call']:8.2f}")
        finally:
            await valkey.aclose()
            await gateway.stop()
            await server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default="", help="the data folder's parent")
    import uvloop

    uvloop.run(main(parser.parse_args()))
