"""Run the benchmarks in turn (``make bench``), each with a short run's arguments; each prints
its own table, with its baselines measured in the same run.

    .venv/bin/python -m bench                    # the quick set below, about eight minutes
    .venv/bin/python -m bench --list             # what it runs, with the arguments
    .venv/bin/python -m bench intake_bench soak_mixed   # only these (same arguments)

It prints each bench's time at the end (on the shared machine at load 5-8: about 460 s in
all, wallboard_bench 92 s, chat_bench about 60 s, voice and email about 40 s each). A bench
run alone (``.venv/bin/python -m bench.<name> --help``) takes longer, steadier
defaults: use those for figures written in docs/performance.md. Not in the set, for their
length or their purpose: ``fleet_soak`` and ``restart_bench`` (kill -9 soaks,
docs/reliability.md), ``contract_fuzz`` (schemathesis over the API), ``intake_calls``
(function calls per contact under cProfile), ``valkey_cost`` (Valkey under callgrind),
``gateway_cost`` (the HTTP intake server's instructions a request, under callgrind),
``voice_cost`` (FastAGI's layer and whole gateway in instructions a session, under callgrind),
``voice_stages`` (where a paced call's time goes, stage by stage), ``email_cost`` and
``email_calls`` (the SMTP path's instructions a mail piece by piece under cachegrind, its
function calls under cProfile), and the long
``soak_mixed`` runs (the set runs 30 seconds of it).
"""

from __future__ import annotations

import subprocess
import sys
import time

QUICK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("intake_bench", ("--seconds", "3", "--rounds", "1")),
    ("workers_bench", ("--seconds", "3", "--rounds", "1")),
    ("voice_bench", ("--rounds", "1")),
    ("voice_tracker_bench", ("--calls", "1000")),
    ("email_bench", ("--seconds", "2", "--rounds", "1")),
    ("sms_bench", ("--seconds", "3", "--rounds", "1")),
    ("carrier_bench", ("--seconds", "2", "--rounds", "1")),
    ("chat_bench", ("--seconds", "3", "--rounds", "1")),
    ("api_bench", ("--contacts", "5000")),
    ("aggregator_bench", ("--contacts", "3000")),
    ("wallboard_bench", ("--contacts", "100000", "--refreshes", "5")),
    ("surge_bench", ()),
    ("trim_bench", ("--contacts", "20000")),
    ("http_metrics_bench", ("--rounds", "2")),
    ("language_bench", ()),
    ("attachments_bench", ("--rounds", "2")),
    ("loop_lag", ("--seconds", "5")),
    ("deadline_sweep_bench", ("--calls", "1000", "--rounds", "2")),
    ("soak_mixed", ("--rate", "300", "--minutes", "0.5")),
)
"""Each bench with a short run's arguments, in the order run."""


def main(argv: list[str]) -> int:
    if argv[:1] in (["--list"], ["-l"]):
        for name, args in QUICK:
            print(f"python -m bench.{name} {' '.join(args)}".rstrip())
        return 0
    if argv[:1] in (["--help"], ["-h"]):
        print(__doc__)
        return 0
    known = dict(QUICK)
    unknown = [name for name in argv if name not in known]
    if unknown:
        print(f"not in the set: {', '.join(unknown)} (python -m bench --list)", file=sys.stderr)
        return 2
    chosen = [(name, known[name]) for name in argv] if argv else list(QUICK)
    failed: list[str] = []
    took: list[tuple[str, float]] = []
    for name, args in chosen:
        print(f"\n=== {name} {' '.join(args)} ===", flush=True)
        started = time.monotonic()
        if subprocess.call([sys.executable, "-m", f"bench.{name}", *args]) != 0:
            failed.append(name)
        took.append((name, time.monotonic() - started))
    print("\n" + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in took))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
