"""Python function calls per 2 KB mail in the gateway process, SMTP under load (cProfile).

The SMTP counterpart of ``bench/intake_calls.py``: the gateway (an ``smtp`` adapter on an
embedded Valkey, ``bench/email_bench.py``'s settings) runs in this process under cProfile while
``email_bench``'s load (aiosmtplib, persistent connections, 2 KB mails) runs in its own
process. Every thread of the process is counted where cProfile sees it (the loop's; the
attachment store's writer threads run outside the profiler). Printed: calls per mail, and with
``--top N`` the N functions of most own time and most calls per mail, to find the path's
Python; a count is not time (a C call such as a socket write counts one).

    .venv/bin/python -m bench.email_calls                        # about 15 s
    .venv/bin/python -m bench.email_calls --before DIR --top 25  # and an older tree
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from typing import Any

from bench.procs import child_path, each_tree


async def _measure(redis_url: str, args: argparse.Namespace, label: str) -> None:
    from bench.email_bench import MAILBOX, _measure
    from bench.intake_bench import gateway_classes

    parse_settings, Gateway = gateway_classes()
    settings, configs = parse_settings({
        "gateway": {"data_dir": tempfile.mkdtemp(prefix="calls-mail-"), "instance": "bench"},
        "redis": {"url": redis_url, "prefix": f"mcalls{abs(hash(label)) % 10_000}"},
        "http": {"listen": "127.0.0.1:0"},
        "limits": {"sender_contacts": 0},
        "adapters": {"mail": {"type": "smtp", "listen": "127.0.0.1:0", "mailboxes": [MAILBOX]}},
    })
    gateway = Gateway(settings, configs)
    await gateway.start()
    port = gateway.adapters["mail"].port
    profile = cProfile.Profile()
    try:
        await _measure(port, 1.0, args.connections, 2048, f"warm{label}")
        profile.enable()
        ok, errors, _ = await _measure(port, args.seconds, args.connections, 2048, f"p{label}")
        profile.disable()
    finally:
        await gateway.stop()
    if args.save:
        profile.dump_stats(f"{args.save}.{'before' if label != 'now' else 'now'}")
    stats = pstats.Stats(profile)
    calls = getattr(stats, "total_calls", 0)  # not in the stubs
    n = max(1, ok)
    print(f"{label}: {ok} mails ({errors} errors), {args.connections} sessions, "
          f"{calls / n:.0f} Python function calls per mail", flush=True)
    if args.top:
        table: dict[Any, Any] = getattr(stats, "stats", {})
        rows = [(k, v[1], v[2]) for k, v in table.items()]  # (func, calls, own time)
        for title, key in (("own time", 2), ("calls", 1)):
            print(f"  by {title} (per mail: calls, own us):")
            for (file, line, name), count, own in sorted(rows, key=lambda r: -r[key])[
                : args.top
            ]:
                where = f"{file.rsplit('/', 2)[-2:] if '/' in file else file}"
                print(f"    {count / n:7.2f} {own / n * 1e6:8.1f}  {name} {where}:{line}")


def _child(src: str, redis_url: str, args: argparse.Namespace) -> None:
    import sys

    child_path(src)
    # the load's process (multiprocessing, spawned) re-runs this file by its path: by its
    # module name it would be looked for in the older tree's ``bench``, first on the path
    setattr(sys.modules["__main__"], "__spec__", None)  # noqa: B010
    import uvloop

    uvloop.run(_measure(redis_url, args, src or "now"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--top", type=int, default=0, help="list the N heaviest functions")
    parser.add_argument("--save", default="", help="write the profiles to SAVE.now (.before)")
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args)
        return
    each_tree(
        "bench.email_calls",
        ["--seconds", str(args.seconds), "--connections", str(args.connections),
         "--top", str(args.top), "--save", args.save],
        args.before,
        "bench-mail-calls-",
    )


if __name__ == "__main__":
    main()
