"""deploy/grafana and deploy/prometheus: every series they use is one a running gateway exports;
promtool (Debian's prometheus package) accepts the rules and the scrape config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import require

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "gateway-rules.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
FROM_PROMETHEUS = {"up"}  # made by Prometheus itself for every scrape target
NAME = re.compile(r"(?<![A-Za-z0-9_:\"'])((?:gateway|process)_[a-z0-9_]+|up)(?=\s*[{\[)]|\s|$)")


def needs_promtool() -> None:
    require(shutil.which("promtool") is not None,
            "promtool: apt-get install prometheus (.ci/run does)")


def rule_exprs() -> list[str]:
    """``expr:`` values of the rules file (kept one line each, so no YAML parser is needed)."""
    return [m.group(1).strip() for m in re.finditer(r"^\s+expr: (.+)$", RULES.read_text(), re.M)]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def exported(text: str) -> set[str]:
    """Series names of the exposition, from its ``# TYPE`` lines (present before any sample)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            if kind in ("histogram", "summary"):
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            names.add(name)
    return names


def test_names_are_found_in_expressions() -> None:
    expr = 'sum(rate(gateway_x_total{a="gateway_not_a_name"}[5m])) / up{job="g"} and process_y'
    assert {m.group(1) for m in NAME.finditer(expr)} == {"gateway_x_total", "up", "process_y"}


async def test_every_series_used_is_exported(start_gateway: Any) -> None:
    gw = await start_gateway(adapters={
        "pbx": {"type": "asterisk", "agi_listen": "127.0.0.1:0"},
        "mailbox": {"type": "smtp", "listen": "127.0.0.1:0", "mailboxes": ["a@b.example"]},
    })
    async with aiohttp.ClientSession() as http, http.get(
        f"http://127.0.0.1:{gw.http_port}/metrics"
    ) as resp:
        names = exported(await resp.text())
    used = {m.group(1) for e in rule_exprs() + dashboard_exprs() for m in NAME.finditer(e)}
    assert len(used) > 20
    assert used - names - FROM_PROMETHEUS == set()
    records = set(re.findall(r"^\s+- record: (\S+)$", RULES.read_text(), re.M))
    for expr in rule_exprs():
        for name in re.findall(r"gateway:[a-z0-9_:]+", expr):
            assert name in records, f"{name} is not recorded"


def test_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p["targets"]:
            used = set(re.findall(r"\$(\w+)", t["expr"]))
            assert used <= variables, f"{p['title']}: {used - variables}"
    titles = " ".join(p["title"] for p in dash["panels"])
    for wanted in ("15 s", "Connection rate", "Breaches", "Spool", "AMI", "Replies"):
        assert wanted in titles


def promtool(*args: str) -> str:
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_accepts_the_rules_and_the_scrape_config() -> None:
    needs_promtool()
    assert "SUCCESS" in promtool("check", "rules", str(RULES))
    promtool("check", "config", str(DEPLOY / "prometheus" / "prometheus.yml"))


def test_alerts_fire_on_the_series_they_watch() -> None:
    needs_promtool()
    promtool("test", "rules", str(DEPLOY / "prometheus" / "gateway-rules.test.yml"))
