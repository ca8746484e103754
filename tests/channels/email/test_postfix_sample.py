"""deploy/email/postfix/: loaded by Debian's Postfix (postconf, postfix check) on a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import require

SAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "email" / "postfix"
QMGR_ONLY = {  # qmgr(8): read by the queue manager, which serves every transport
    "queue_run_delay", "minimal_backoff_time", "maximal_backoff_time", "maximal_queue_lifetime",
    "bounce_queue_lifetime", "qmgr_message_active_limit", "qmgr_message_recipient_limit",
}
GATEWAY_MAX_MESSAGE = 29360128  # the 28 MiB docs/channels/email.md advises for 20 MB files


def needs_postfix() -> None:
    require(shutil.which("postconf") is not None
            and Path("/usr/share/postfix/main.cf.debian").exists(),
            "Debian's postfix: apt-get install postfix (.ci/run does)")


def overrides(master_cf: str) -> list[str]:
    """The parameter names of every ``-o name=value`` in a master.cf."""
    names = []
    for line in master_cf.splitlines():
        if line.strip().startswith("-o "):
            names.append(line.strip()[3:].split("=", 1)[0].strip())
    return names


def test_master_cf_sets_no_queue_manager_parameters_on_the_transport() -> None:
    names = overrides((SAMPLE / "master.cf").read_text(encoding="utf-8"))
    assert names, "the hotline transport has its own -o settings"
    assert not QMGR_ONLY & set(names), "qmgr settings in master.cf have no effect"


def run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    return done.stdout


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """Debian's stock main.cf and master.cf with the sample appended, maps built with postmap."""
    needs_postfix()
    conf = tmp_path / "postfix"
    conf.mkdir()
    main = Path("/usr/share/postfix/main.cf.debian").read_text(encoding="utf-8")
    sample = (SAMPLE / "main.cf").read_text(encoding="utf-8").replace("/etc/postfix/", f"{conf}/")
    (conf / "main.cf").write_text(main + "\n" + sample, encoding="utf-8")
    master = Path("/etc/postfix/master.cf").read_text(encoding="utf-8")
    (conf / "master.cf").write_text(
        master + (SAMPLE / "master.cf").read_text(encoding="utf-8"), encoding="utf-8"
    )
    for extra in ("dynamicmaps.cf",):
        if Path("/etc/postfix", extra).exists():
            shutil.copy(Path("/etc/postfix", extra), conf / extra)
    for name in ("transport", "relay_recipients"):
        shutil.copy(SAMPLE / name, conf / name)
        run("postmap", "-c", str(conf), str(conf / name))
    return conf


def test_postconf_reads_the_sample(config_dir: Path) -> None:
    values = dict(
        line.split(" = ", 1) for line in run("postconf", "-c", str(config_dir)).splitlines()
        if " = " in line
    )
    assert values["queue_run_delay"] == "60s"
    assert values["minimal_backoff_time"] == "60s"
    assert values["maximal_backoff_time"] == "300s"
    assert int(values["message_size_limit"]) >= GATEWAY_MAX_MESSAGE
    assert int(values["mailbox_size_limit"]) >= int(values["message_size_limit"])
    service = run("postconf", "-c", str(config_dir), "-P", "hotline/unix/*")
    assert "hotline/unix/smtp_tls_security_level = may" in service
    assert run("postmap", "-c", str(config_dir), "-q", "12345@hotline.example.gov.cn",
               f"hash:{config_dir}/transport").strip() == "hotline:[10.0.0.5]:2525"


def test_postfix_check_accepts_the_sample(config_dir: Path) -> None:
    require(os.geteuid() == 0, "root: postfix check inspects the queue folder's ownership")
    run("postfix", "-c", str(config_dir), "check")
