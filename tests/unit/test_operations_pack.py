"""deploy/'s alerting pack, offline: every alert links a runbook section of README.md
that exists and says what the finding means and how to fix it; the Alertmanager example
passes amtool and routes as documented; the Grafana dashboard is well formed and asks
only for series that exist. (A real Prometheus runs the rules and every dashboard query
in tests/integration/test_prometheus_stack.py; promtool's rule tests are in
test_deploy_files.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
README = REPO / "README.md"
CODES = ("QG001", "QG002", "QG003", "QG004", "QG005", "QG006", "QG100")
#: Series the dashboard and rules may use: the daemon's (qmpguard/daemon/exporter.py and
#: web.py), prometheus_client's process collector, and Prometheus's own.
KNOWN_METRICS = {
    "qmpguard_vm_up",
    "qmpguard_vm_info",
    "qmpguard_findings",
    "qmpguard_vfio_devices",
    "qmpguard_last_inspection_timestamp_seconds",
    "qmpguard_last_success_timestamp_seconds",
    "qmpguard_inspection_errors_total",
    "qmpguard_inspection_duration_seconds_bucket",
    "qmpguard_inspection_interval_seconds",
    "qmpguard_inspection_concurrency",
    "qmpguard_inspections_in_progress",
    "qmpguard_build_info",
    "qmpguard_http_connections",
    "qmpguard_http_connection_limit",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
    "process_open_fds",
    "up",
    "ALERTS",
}


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def readme_sections() -> dict[str, str]:
    """anchor -> the text under that heading (to the next heading of any level)."""
    text = README.read_text()
    parts = re.split(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    return {github_anchor(parts[i]): parts[i + 1] for i in range(1, len(parts), 2)}


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((DEPLOY / "qmpguard.rules.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (identifiers before `{`, or bare, that are not
    functions, keywords or label names)."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # no names inside strings
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # nor label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # nor range durations ($__rate_interval)
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    keywords = {"or", "and", "unless", "group_left", "group_right", "vector", "s", "m", "h"}
    return {w for w in words if w not in keywords and not w.isdigit()}


def test_every_alert_has_a_runbook_section_that_exists() -> None:
    sections = readme_sections()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        anchor = url.rsplit("#", 1)[1]
        assert anchor in sections, (rule["alert"], anchor)
        code = re.search(r'code="(QG\d+)"', rule["expr"])
        if code:  # a finding's alert links that finding's section
            assert anchor == code.group(1).lower(), rule["alert"]


@pytest.mark.parametrize("code", CODES)
def test_runbook_section_says_what_it_means_and_how_to_fix(code: str) -> None:
    section = readme_sections()[code.lower()]
    assert "**What it means.**" in section and "**How to fix.**" in section, code
    assert len(section.split()) > 40, f"{code}: a runbook says more than that"


def test_alerts_cover_qg001_critical_qg002_to_qg006_warning_and_stale() -> None:
    by_code = {}
    for rule in alert_rules():
        for code in set(re.findall(r'code="(QG\d+)"', rule["expr"])):
            by_code[code] = rule["labels"]["severity"]
    assert by_code == {
        "QG001": "critical",
        "QG002": "warning",
        "QG003": "warning",
        "QG004": "warning",
        "QG005": "warning",
        "QG006": "warning",
    }
    names = {r["alert"] for r in alert_rules()}
    assert {"QmpguardInspectionStale", "QmpguardVmNeverInspected", "QmpguardDown"} <= names
    for rule in alert_rules():
        assert metric_names(rule["expr"]) <= KNOWN_METRICS, rule["alert"]
        assert "<vm>" not in json.dumps(rule["annotations"])  # no literal placeholders


def amtool() -> str:
    tool = shutil.which("amtool")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError(
                "amtool missing: deploy/install-dev.sh installs prometheus-alertmanager"
            )
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager)")
    return tool


def test_alertmanager_example_is_valid_and_routes_as_documented() -> None:
    config = str(DEPLOY / "alertmanager.yml")
    check = subprocess.run(
        [amtool(), "check-config", config], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    for labels, receiver in [
        (["alertname=QmpguardVfioBypassesViommu", "severity=critical", "vm=x"], "qmpguard-page"),
        (["alertname=QmpguardVfioOnBypassBus", "severity=warning", "vm=x"], "qmpguard-ticket"),
        (["alertname=QmpguardInspectionStale", "severity=warning"], "qmpguard-ticket"),
        (["alertname=SomethingElse", "severity=critical"], "default"),
    ]:
        route = subprocess.run(
            [amtool(), "config", "routes", "test", f"--config.file={config}", *labels],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert route.stdout.strip() == receiver, (labels, route.stdout, route.stderr)
    doc = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    alerts = {r["alert"] for r in alert_rules()}
    for rule in doc["inhibit_rules"]:  # inhibitions name alerts that exist
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            pattern = matcher.split("=", 1)[1].strip().strip('~ "')
            assert any(re.fullmatch(pattern, a) for a in alerts), matcher
        # A stale or failing inspection never silences a finding: the last known truth.
        assert "QmpguardVfioBypassesViommu" not in json.dumps(rule["target_matchers"])


def test_dashboard_is_well_formed_and_asks_for_existing_series() -> None:
    doc = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert doc["uid"] == "qmpguard" and doc["schemaVersion"] >= 36
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["instance"]["query"]["query"] == "label_values(qmpguard_vm_up, instance)"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in doc["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel["targets"]:
            expr = target["expr"]
            assert metric_names(expr) <= KNOWN_METRICS, (panel["title"], expr)
            refs = set(re.findall(r"\$\w+", expr)) - {"$__rate_interval"}
            assert refs <= {"$instance"}, (panel["title"], refs)
