"""schemathesis (``--checks all``) over every operation of the gateway's OpenAPI document,
against a real gateway on a real Redis: zero failures. Small and seeded to fit ``make test``;
``python -m bench.contract_fuzz`` runs the long version (docs/case-systems.md)."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.contract_fuzz import gateway_tables, schemathesis_command

EXAMPLES = 25
SEED = 20261201


async def test_schemathesis_finds_nothing(start_gateway: Any) -> None:
    gw = await start_gateway(**gateway_tables("http://127.0.0.1:9/hook"))
    base = f"http://127.0.0.1:{gw.http_port}"
    proc = await asyncio.create_subprocess_exec(
        *schemathesis_command(base, EXAMPLES, SEED),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-6000:]
    assert "17 passed" in report or " passed" in report
    tested = next(line for line in report.splitlines() if "Tested:" in line)
    assert tested.split()[-1] == "17", tested  # every documented operation was called
