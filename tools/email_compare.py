"""Normalize every mail of a corpus with this tree's ``normalize`` and with an older tree's, and
say where the results differ (a guard for changes made for speed: the results must not move).

    .venv/bin/python -m tools.email_compare --before /tmp/old   # old: git archive <c> gateway

The corpus: the project's test fixtures, CPython's ``test_email`` data when installed, the
benchmark's messages, and each of them cut, doubled and re-encoded in a few ways."""

from __future__ import annotations

import argparse
import os
import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus() -> dict[str, bytes]:
    mails: dict[str, bytes] = {}
    sources = [ROOT / "tests" / "channels" / "email" / "fixtures"]
    sources.append(Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_email" / "data")
    for folder in sources:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    mails[f"{folder.name}/{path.name}"] = path.read_bytes()
    sys.path.insert(0, str(ROOT))
    from bench.email_bench import message

    mails["bench/2k"] = message(2048).replace(b"@@ID@@", b"x-1")
    mails["bench/200k"] = message(200 * 1024).replace(b"@@ID@@", b"x-2")
    variants: dict[str, bytes] = {}
    for name, raw in mails.items():
        variants[name + "+lf"] = raw.replace(b"\r\n", b"\n")
        variants[name + "+crlf"] = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        variants[name + "+half"] = raw[: len(raw) // 2]
        variants[name + "+headers"] = raw.split(b"\n\n", 1)[0]
        variants[name + "+8bit"] = raw.replace(b"a", "é".encode()).replace(b"e", b"\xb0")
    return {**mails, **variants}


def dump() -> None:
    import gateway.channels.email.normalize as module
    from gateway.channels.email.normalize import Envelope, Options, normalize

    print(f"normalize from {module.__file__}", file=sys.stderr)

    env = Envelope("citizen@example.org", ("12345+tag@hotline.example.gov.cn",), "192.0.2.1",
                   "client.example.org")
    out = {}
    for name, raw in corpus().items():
        out[name] = repr(normalize(raw, env, Options()))
    sys.stdout.buffer.write(pickle.dumps(out))


def run(tree: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, "-m", "tools.email_compare", "--dump"],
        cwd="/", env=env, capture_output=True, check=True,  # not ROOT: it would come first
    )
    print(done.stderr.decode().strip())
    return pickle.loads(done.stdout)  # type: ignore[no-any-return]  # noqa: S301 (our own child)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--before", help="source tree of the older gateway")
    parser.add_argument("--dump", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dump:
        dump()
        return 0
    old, new = run(Path(args.before).resolve()), run(ROOT)
    differ = [name for name in new if old.get(name) != new[name]]
    for name in differ:
        print(f"differs: {name}\n  before {old.get(name)}\n  after  {new[name]}")
    print(f"{len(new)} mails, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
