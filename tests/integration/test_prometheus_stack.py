"""deploy/ against a REAL Prometheus (Debian's /usr/bin/prometheus) scraping a real
daemon that watches the demo's two VMs (good-vm and the misbound bad-vm).

Every query of deploy/grafana-dashboard.json returns data, every rule of
deploy/qmpguard.rules.yml evaluates without error, and the QG001 alert fires through
Prometheus's own API and keeps firing while another client holds bad-vm's monitor,
long enough for QmpguardInspectionStale to fire too. Bounded polls only, no fixed sleeps.
And deploy/alertmanager.yml in a real Alertmanager: routes and inhibitions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import VmFactory, requires_qemu
from tests.integration.support import (
    FAST_RESCAN,
    Daemon,
    demo_vm,
    free_port,
    monitor_held,
    wait_for,
)

pytestmark = [pytest.mark.integration, requires_qemu]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
PROMETHEUS = "/usr/bin/prometheus"
#: What Grafana puts for its variables when every host is selected.
GRAFANA_VARIABLES = {"$instance": ".+", "$__rate_interval": "5s"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) for every target of every panel."""
    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in doc["panels"] for t in p["targets"]]


def grafana_expand(query: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        query = query.replace(name, value)
    assert "$" not in query, query
    return query


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=5) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        return list(data["result"])

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in self.api("/api/v1/alerts")["alerts"] if a["state"] == "firing"]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    if not Path(PROMETHEUS).exists():
        if os.environ.get("CI"):
            raise AssertionError("prometheus missing: deploy/install-dev.sh installs it")
        pytest.skip("prometheus not installed (Debian package prometheus)")
    started: list[subprocess.Popen[bytes]] = []

    def start(daemon_port: int) -> Prometheus:
        """Scrape the daemon every second and evaluate deploy's rules every second."""
        config = tmp_path / "prometheus.yml"
        rules = tmp_path / "qmpguard.rules.yml"
        shutil.copy(DEPLOY / "qmpguard.rules.yml", rules)
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {
                            "job_name": "qmpguard",
                            "static_configs": [{"targets": [f"127.0.0.1:{daemon_port}"]}],
                        }
                    ],
                }
            )
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "w") as err:
            proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        started.append(proc)
        prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=30, what="Prometheus ready")
        return prom

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_dashboard_rules_and_alerts_in_a_real_prometheus(
    qemu_vm: VmFactory,
    daemon: Any,
    prometheus: Callable[[int], Prometheus],
    tmp_path: Path,
    fakevfio: Path,
) -> None:
    started = time.monotonic()
    good = demo_vm(qemu_vm, tmp_path, fakevfio, "good-vm", viommu_first=True)
    bad = demo_vm(qemu_vm, tmp_path, fakevfio, "bad-vm", viommu_first=False)
    bad_name = f"unix:{bad.qmp_path}"
    config = tmp_path / "daemon.toml"
    config.write_text(
        f'watch = ["{tmp_path}/*.qmp"]\ninterval = 1\n{FAST_RESCAN}[timeouts]\ngreeting = 0.3\n'
    )
    d: Daemon = daemon("--config", str(config))
    prom = prometheus(d.port)
    wait_for(
        lambda: [t["health"] for t in prom.api("/api/v1/targets")["activeTargets"]] == ["up"],
        timeout=30,
        what="the daemon scraped (target up)",
    )
    wait_for(
        lambda: len(prom.query('qmpguard_vm_info{label=~"good-vm|bad-vm"}')) == 2,
        timeout=30,
        what="both VMs in Prometheus",
    )

    def qg001_firing() -> list[dict[str, Any]]:
        return [
            a for a in prom.firing() if a["labels"]["alertname"] == "QmpguardVfioBypassesViommu"
        ]

    (alert,) = wait_for(qg001_firing, timeout=30, what="QG001 firing")
    assert alert["labels"]["vm"] == bad_name and alert["labels"]["label"] == "bad-vm"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == "1 vfio device(s) on bad-vm bypass the vIOMMU (QG001)"
    assert alert["annotations"]["runbook_url"].endswith("README.md#qg001")

    # Another client holds bad-vm's monitor: QG001 keeps firing at every evaluation, until
    # the findings are older than 5 intervals and the stale alert fires beside it.
    polls = 0
    with monitor_held(bad.qmp_path):

        def stale_firing() -> list[dict[str, Any]]:
            nonlocal polls
            polls += 1
            firing = prom.firing()
            names = {a["labels"]["alertname"] for a in firing}
            assert "QmpguardVfioBypassesViommu" in names, firing  # never resolved
            return [a for a in firing if a["labels"]["alertname"] == "QmpguardInspectionStale"]

        (stale,) = wait_for(stale_firing, timeout=30, what="QmpguardInspectionStale firing")
        assert stale["labels"]["vm"] == bad_name
        assert prom.query(f'qmpguard_vm_up{{vm="{bad_name}"}} == 0')  # it really was down
    assert polls >= 5

    # Every panel query of the dashboard returns data (some need a few scrapes: rates).
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, query in queries:
        expr = grafana_expand(query)

        def has_data(expr: str = expr) -> Any:
            return prom.query(expr)

        wait_for(has_data, timeout=15, what=f"data for {title!r}: {expr}")
    # The dashboard's host variable: label_values(qmpguard_vm_up, instance).
    assert prom.api("/api/v1/label/instance/values", **{"match[]": "qmpguard_vm_up"}) == [
        f"127.0.0.1:{d.port}"
    ]
    # Every rule of deploy's file loaded and evaluated without error.
    groups = prom.api("/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((DEPLOY / "qmpguard.rules.yml").read_text())["groups"]
    assert len(rules) == sum(len(g["rules"]) for g in shipped) >= 8, rules
    assert all(r["health"] == "ok" for r in rules), rules
    assert good.qmp_path.exists()
    print(
        f"real Prometheus: {len(queries)} dashboard queries, {polls} polls while held, "
        f"{time.monotonic() - started:.1f} s"
    )


ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


def test_alertmanager_example_routes_and_inhibits(tmp_path: Path) -> None:
    """deploy/alertmanager.yml in a real Alertmanager (Debian's): QG001 goes to the pager
    and holds back that VM's warnings, never another VM's, never a stale inspection."""
    if not Path(ALERTMANAGER).exists():
        if os.environ.get("CI"):
            raise AssertionError("alertmanager missing: deploy/install-dev.sh installs it")
        pytest.skip("prometheus-alertmanager not installed")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "alertmanager.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={DEPLOY / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=30, what="Alertmanager ready")
        common = {"instance": "hv1:10469", "job": "qmpguard"}
        alerts = [
            ("QmpguardVfioBypassesViommu", "critical", "unix:/run/qemu/bad.qmp"),
            ("QmpguardVfioSharesAddressSpace", "warning", "unix:/run/qemu/bad.qmp"),
            ("QmpguardVfioSharesAddressSpace", "warning", "unix:/run/qemu/other.qmp"),
            ("QmpguardInspectionStale", "warning", "unix:/run/qemu/bad.qmp"),
        ]
        body = json.dumps(
            [{"labels": {"alertname": a, "severity": s, "vm": vm, **common}} for a, s, vm in alerts]
        ).encode()
        request = urllib.request.Request(
            f"{url}/api/v2/alerts", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200

        def states() -> dict[tuple[str, str], tuple[str, list[str]]]:
            with urllib.request.urlopen(f"{url}/api/v2/alerts", timeout=5) as resp:
                listed = json.loads(resp.read())
            return {
                (a["labels"]["alertname"], a["labels"]["vm"]): (
                    a["status"]["state"],
                    sorted(r["name"] for r in a["receivers"]),
                )
                for a in listed
            }

        got = wait_for(lambda: len(states()) == 4 and states(), timeout=15, what="4 alerts")
        assert got == {
            ("QmpguardVfioBypassesViommu", "unix:/run/qemu/bad.qmp"): ("active", ["qmpguard-page"]),
            ("QmpguardVfioSharesAddressSpace", "unix:/run/qemu/bad.qmp"): (
                "suppressed",
                ["qmpguard-ticket"],
            ),
            ("QmpguardVfioSharesAddressSpace", "unix:/run/qemu/other.qmp"): (
                "active",
                ["qmpguard-ticket"],
            ),
            ("QmpguardInspectionStale", "unix:/run/qemu/bad.qmp"): ("active", ["qmpguard-ticket"]),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
