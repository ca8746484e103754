"""Keep in requirements-dev.lock only what requirements.lock does not already pin.

``make lock`` compiles both locks with pip-compile (hashes for every file of each release);
the dev compile holds the runtime packages too, which this removes, so ``make test`` installs
``-r requirements.lock -r requirements-dev.lock`` with every package pinned once.

    python tools/lock_split.py requirements.lock requirements-dev.lock
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")


def blocks(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The header comment lines, then (package name, lines) per pinned requirement."""
    header: list[str] = []
    found: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = PIN.match(line)
        if match:
            found.append((match.group(1).lower().replace("_", "-"), [line]))
        elif found:
            found[-1][1].append(line)
        else:
            header.append(line)
    return header, found


def main(runtime: str, dev: str) -> int:
    _, pinned = blocks(Path(runtime).read_text(encoding="utf-8"))
    names = {name for name, _ in pinned}
    header, dev_blocks = blocks(Path(dev).read_text(encoding="utf-8"))
    kept = [lines for name, lines in dev_blocks if name not in names]
    body = "\n".join(line for lines in kept for line in lines)
    note = "# Dev tools only: install together with requirements.lock (make test does)."
    Path(dev).write_text("\n".join([*header, note, body]) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
