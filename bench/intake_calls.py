"""Python function calls per contact in the gateway process, ``POST /v1/intake`` under load.

On a shared machine the CPU time of a contact moves with the other work (two runs of the same
server differ by 40 %), but the number of Python function calls a contact costs does not: it is
the "machinery" count this bench reports, from cProfile in the gateway process while the load
generator of ``bench/intake_bench.py`` (64 connections, new contacts) runs in its own process.
The dashboard's aggregator and every other loop of the process are counted too: they run per
contact. Call counts are not time (a C call such as ``orjson.dumps`` counts one), so read them
with the CPU figures of ``intake_bench``.

    .venv/bin/python -m bench.intake_calls                  # about 20 s
    .venv/bin/python -m bench.intake_calls --before DIR     # and an older tree, same Valkey

``--before DIR``: a source tree holding an older ``gateway`` package (``git archive <commit>
gateway | tar -x -C DIR``), measured the same way in its own process.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import socket
import tempfile

from bench.procs import child_path, each_tree, intake_load

TOP = 0
"""``--top N``: also print the N functions called most a contact."""


async def _measure(redis_url: str, seconds: float, label: str) -> None:
    from bench.intake_bench import gateway_classes

    parse_settings, Gateway = gateway_classes()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings, configs = parse_settings({
        "gateway": {"data_dir": tempfile.mkdtemp(prefix="calls-gw-"), "instance": "bench"},
        "redis": {"url": redis_url, "prefix": f"calls{port}"},
        "http": {"listen": f"127.0.0.1:{port}"},
        "api": {"open_to_loopback": True},
    })
    gateway = Gateway(settings, configs)
    await gateway.start()
    try:
        for offset, profile in ((0, None), (50_000_000, cProfile.Profile())):
            ok = await intake_load(port, seconds if profile else 1.0, offset,
                                   started=profile.enable if profile is not None else None)
            if profile is not None:
                profile.disable()
    finally:
        await gateway.stop()
    assert profile is not None
    stats = pstats.Stats(profile)
    calls = getattr(stats, "total_calls", 0)  # not in the stubs
    print(f"{label}: {ok} contacts, {calls / max(1, ok):.0f} Python function calls per contact",
          flush=True)
    if TOP:
        rows = getattr(stats, "stats", {})  # not in the stubs: (file, line, name) -> counts
        top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:TOP]
        for (file, line, name), (_, calls_of, *_) in top:
            where = f"{file.rsplit('/', 2)[-1] if file != '~' else ''}:{line}"
            print(f"  {calls_of / max(1, ok):6.2f} a contact  {name}  {where}", flush=True)


def _child(src: str, redis_url: str, seconds: float) -> None:
    child_path(src)
    import uvloop

    uvloop.run(_measure(redis_url, seconds, src or "now"))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--before", default="", help="source tree of an older gateway")
    parser.add_argument("--top", type=int, default=0,
                        help="also print the N functions called most a contact")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        global TOP
        TOP = args.top
        _child(args.child[0], args.child[1], args.seconds)
        return
    each_tree("bench.intake_calls", ["--seconds", str(args.seconds), "--top", str(args.top)],
              args.before, "bench-calls-")


if __name__ == "__main__":
    main()
