"""deploy/systemd, Dockerfile and deploy/docker: checked as far as this machine can.

``systemd-analyze verify`` and ``systemd-analyze security --offline`` load the unit where
systemd is installed. No Docker engine runs here (and no base image can be pulled), so the
container files are checked by reading them: every COPY source exists, the last stage runs as
an unprivileged user and has a HEALTHCHECK on a port the image's configuration listens on, and
the configuration files are valid for the gateway.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.server.config import load_file
from tests.harness import require

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "gateway.service"
GATEWAY_BIN = Path(sys.executable).parent / "gateway"


def needs_systemd() -> None:
    require(shutil.which("systemd-analyze") is not None,
            "systemd-analyze: apt-get install systemd (.ci/run does)")


def unit_copy(tmp_path: Path) -> Path:
    """The unit with /opt/gateway/bin/gateway pointed at this checkout's virtual environment
    (``verify`` checks that every ExecStart program exists and is executable)."""
    text = UNIT.read_text(encoding="utf-8").replace("/opt/gateway/bin/gateway", str(GATEWAY_BIN))
    copy = tmp_path / "gateway.service"
    copy.write_text(text, encoding="utf-8")
    return copy


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_is_hardened_and_runs_unprivileged() -> None:
    d = directives(UNIT.read_text(encoding="utf-8"))
    assert d["User"] == ["gateway"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX", "StateDirectory": "gateway",
    }.items():
        assert d[key] == [value], key
    (start,) = d["ExecStart"]
    assert shlex.split(start)[1:] == ["serve", "-c", "/etc/gateway/gateway.toml"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    needs_systemd()
    done = subprocess.run(["systemd-analyze", "verify", str(unit_copy(tmp_path))],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr  # unknown keys are only warned about


def test_systemd_exposure_is_low(tmp_path: Path) -> None:
    needs_systemd()
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit_copy(tmp_path))],
        capture_output=True, text=True, check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout + done.stderr)
    if found is None:
        pytest.fail(f"systemd-analyze security --offline (systemd 250 or later) gave no "
                    f"exposure level: {done.stderr[-200:]}", pytrace=False)
    assert float(found.group(1)) <= 2.0, done.stdout


def stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    """Instructions per build stage, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    result: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            result.append([])
        result[-1].append((word.upper(), rest.strip()))
    return result


def test_dockerfile_copies_what_exists_and_runs_unprivileged_with_a_health_check() -> None:
    build = stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    assert len(build) == 2
    for stage in build:
        for word, rest in stage:
            if word == "COPY" and not rest.startswith("--from"):
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    final = build[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    (health,) = [rest for word, rest in final if word == "HEALTHCHECK"]
    port = re.search(r"127\.0\.0\.1:(\d+)/healthz", health)
    assert port is not None
    config = ROOT / "deploy" / "docker" / "gateway.toml"
    settings, _ = load_file(config)
    assert settings.http.metrics_listen is not None
    assert int(port.group(1)) == settings.http.metrics_listen.port
    exposed = {int(p) for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert {settings.http.listen.port, settings.http.metrics_listen.port} <= exposed
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored


def test_compose_file_points_at_files_that_exist() -> None:
    compose = ROOT / "deploy" / "docker" / "compose.yaml"
    text = compose.read_text(encoding="utf-8")
    context = re.search(r"context: (\S+)", text)
    assert context is not None
    assert (compose.parent / context.group(1) / "Dockerfile").is_file()
    for mount in re.findall(r"- (\./[^:\s]+):", text):
        assert (compose.parent / mount).exists(), mount
    assert "--appendfsync" in text and "always" in text  # acknowledged means on disk
    assert re.search(r"^  gateway:$", text, re.M) and re.search(r"^  redis:$", text, re.M)
