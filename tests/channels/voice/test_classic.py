"""Classic AGI (`gateway agi`): the script runs as a subprocess with a scripted stdin."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from gateway.channels.voice.agi import split_command
from gateway.contact.clock import FixedClock
from tests.channels.voice.fakes import agi_fixture

T0 = 1_795_594_483_000_000
ROOT = Path(__file__).resolve().parents[3]

# A classic AGI header block: no agi_network lines, agi_request is the script path.
CLASSIC_HEADER = (
    agi_fixture("sip_call.agi")
    .replace(b"agi_network: yes\nagi_network_script: intake\n", b"")
    .replace(b"agi://127.0.0.1:4573/intake", b"/opt/gateway/.venv/bin/gateway")
    .replace(b"agi_threadid: 140206706226880\n", b"agi_threadid: 140206706226880\nagi_arg_1: agi\n")
)


async def run_classic(
    args: list[str], stdin: bytes, *, via_cli: bool = False, **env: str
) -> tuple[int, dict[str, str]]:
    """Run the script as Asterisk would: ``gateway agi ...`` (or the module), piped stdin."""
    entry = ["-m", "gateway", "agi"] if via_cli else ["-m", "gateway.channels.voice.classic"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *entry, *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    variables: dict[str, str] = {}
    for line in out.decode().splitlines():
        argv = split_command(line)
        if argv[:2] == ["SET", "VARIABLE"] and len(argv) == 4:
            variables[argv[2]] = argv[3]
    assert b"13800138000" not in err  # no caller id in what Asterisk logs
    assert proc.returncode is not None
    return proc.returncode, variables


REPLIES = b"200 result=1\n" * 5


async def test_classic_agi_posts_the_contact_and_sets_the_variables(
    start_gateway: Any, tmp_path: Path
) -> None:
    gw = await start_gateway(clock=FixedClock(T0))
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[adapters.asterisk]\ntype = "asterisk"\nlanguages = { "12345" = "zh" }\n'
        'queues = { "zh" = "hotline-zh" }\n'
        'ami = { username = "gateway", secret_env = "NOT_SET_IN_THIS_PROCESS" }\n',
        encoding="utf-8",
    )
    code, variables = await run_classic(
        ["--url", f"http://127.0.0.1:{gw.http_port}/v1/intake", "--config", str(config)],
        CLASSIC_HEADER + REPLIES,
    )
    assert code == 0
    (contact,) = await gw.read_contacts()
    assert contact.channel == "voice"
    assert contact.external_id == "1795594483.1"
    assert contact.sender.address == "+8613800138000"
    assert contact.sender.name == "Test Caller"
    assert contact.recipient == "12345"
    assert contact.language == "zh"
    assert contact.meta["agi_mode"] == "classic"
    assert "args" not in contact.meta  # "agi" is the command itself, not an argument
    assert contact.origin_at is not None
    assert variables == {
        "GATEWAY_CONTACT_ID": contact.id,
        "GATEWAY_ANSWER_BY": str(contact.deadline.due_at // 1_000_000),
        "GATEWAY_QUEUE": "hotline-zh",
        "GATEWAY_PRIORITY": "0",
        "GATEWAY_STATUS": "OK",
    }
    assert contact.deadline.due_at == T0 + 15_000_000

    # Asterisk re-running the dialplan, through the `gateway agi` command: same contact
    code, again = await run_classic(
        [f"url=http://127.0.0.1:{gw.http_port}/v1/intake"], CLASSIC_HEADER + REPLIES,
        via_cli=True,
    )
    assert code == 0
    assert again["GATEWAY_CONTACT_ID"] == contact.id
    assert len(await gw.read_contacts()) == 1


async def test_classic_agi_without_a_gateway_still_sends_the_call_on(tmp_path: Path) -> None:
    code, variables = await run_classic(
        [], CLASSIC_HEADER + REPLIES, GATEWAY_INTAKE_URL="http://127.0.0.1:1/v1/intake"
    )
    assert code == 0
    assert variables == {
        "GATEWAY_CONTACT_ID": "",
        "GATEWAY_ANSWER_BY": "",
        "GATEWAY_QUEUE": "hotline",
        "GATEWAY_PRIORITY": "0",
        "GATEWAY_STATUS": "FAILED",
    }


async def test_classic_agi_with_a_truncated_header_and_no_replies(start_gateway: Any) -> None:
    gw = await start_gateway(clock=FixedClock(T0))
    code, variables = await run_classic(
        ["--url", f"http://127.0.0.1:{gw.http_port}/v1/intake"], b"agi_callerid: 1380013"
    )
    assert code == 0
    assert variables["GATEWAY_STATUS"] == "FAILED"  # no uniqueid: no contact
    assert await gw.read_contacts() == []



async def test_classic_agi_reports_a_spooled_contact(start_gateway: Any) -> None:
    gw = await start_gateway(url="redis://127.0.0.1:1", clock=FixedClock(T0))
    code, variables = await run_classic(
        ["--url", f"http://127.0.0.1:{gw.http_port}/v1/intake"], CLASSIC_HEADER + REPLIES
    )
    assert code == 0
    assert variables["GATEWAY_STATUS"] == "SPOOLED"
    assert variables["GATEWAY_CONTACT_ID"]


async def test_classic_agi_says_why_when_the_api_key_is_refused(
    start_gateway: Any, tmp_path: Path
) -> None:
    """Defect: the documented classic-AGI line got a 401 without an API key and neither log
    said why. Now Asterisk's log (VERBOSE) and stderr say it; with the key file it works."""
    key = "k" * 40
    gw = await start_gateway(clock=FixedClock(T0), api={
        "open_to_loopback": False,
        "keys": [{"key": key, "name": "pbx", "scopes": ["intake"]}],
    })
    url = f"url=http://127.0.0.1:{gw.http_port}/v1/intake"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "agi", url,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_API_KEY": ""},
    )
    out, err = await asyncio.wait_for(proc.communicate(CLASSIC_HEADER + b"200 result=1\n" * 6), 60)
    assert proc.returncode == 0
    verbose = [split_command(line) for line in out.decode().splitlines()
               if line.startswith("VERBOSE")]
    assert verbose and "no or wrong API key" in verbose[0][1]
    assert "GATEWAY_API_KEY" in verbose[0][1]
    assert b"no or wrong API key" in err
    assert await gw.read_contacts() == []
    key_file = tmp_path / "gateway.key"
    key_file.write_text(key + "\n")
    code, variables = await run_classic(
        [url, f"api-key-file={key_file}", "arrived=1795594482.5"], CLASSIC_HEADER + REPLIES,
        via_cli=True,
    )
    assert code == 0 and variables["GATEWAY_STATUS"] == "OK"
    (contact,) = await gw.read_contacts()
    assert contact.origin_at == T0 - 500_000  # the dialplan's arrival stamp
