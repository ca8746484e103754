"""requirements.lock (runtime) and requirements-dev.lock (test tools): exact pins with hashes,
each package pinned once, and every pin inside pyproject.toml's bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")


def pins(name: str) -> dict[str, str]:
    """package -> version; every pinned line must carry at least one sha256 hash."""
    found: dict[str, str] = {}
    current = ""
    hashes: dict[str, int] = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            assert current not in found, f"{name}: {current} pinned twice"
            found[current] = match.group(2)
            hashes[current] = 0
        elif line.strip() and not line.lstrip().startswith("#"):
            assert current, f"{name}: not a pin: {line!r}"
            assert line.strip().startswith("--hash=sha256:"), (
                f"{name}: {line.strip()!r} – add dependencies with `make lock`, which pins "
                "them with their hashes (pip refuses a lock where one line has none)"
            )
            hashes[current] += 1
    missing = [p for p, n in hashes.items() if n == 0]
    assert not missing, f"{name}: no hashes for {missing}: run `make lock`"
    return found


def test_locks_pin_every_dependency_once_within_its_bounds() -> None:
    runtime = pins("requirements.lock")
    dev = pins("requirements-dev.lock")
    assert not set(runtime) & set(dev), "a package in both locks"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for spec, lock in [(s, runtime) for s in project["dependencies"]] + [
        (s, dev | runtime) for s in project["optional-dependencies"]["dev"]
    ]:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"{name} is not pinned in the right lock"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"{name}=={lock[name]} is outside {req.specifier}"
        )
    for tool in ("pytest", "mypy", "ruff"):
        assert tool in dev and tool not in runtime  # `make run` installs no test tools
