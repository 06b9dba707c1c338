"""deploy/: the YAML parses, the alert rules pass promtool, and QG001 fires in one scrape."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.mark.parametrize(
    "name",
    [
        "prometheus.yml",
        "qmpguard.rules.yml",
        "qmpguard.rules.test.yml",
        "kubernetes/daemonset.yaml",
    ],
)
def test_yaml_parses(name: str) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / name).read_text()))
    assert docs and all(isinstance(d, dict) for d in docs)


def test_daemonset_runs_the_daemon() -> None:
    docs = {
        d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kubernetes/daemonset.yaml").read_text())
    }
    container = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "daemon"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_unit_is_hardened() -> None:
    unit = (DEPLOY / "qmpguard.service").read_text()
    for line in (
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "User=qmpguard",
    ):
        assert line in unit


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        if os.environ.get("CI"):
            raise AssertionError("promtool missing: deploy/install-dev.sh installs prometheus")
        pytest.skip("promtool not installed (Debian package prometheus)")
    return tool


def test_promtool_check_rules() -> None:
    proc = subprocess.run(
        [_promtool(), "check", "rules", str(DEPLOY / "qmpguard.rules.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_qg001_alert_fires_within_one_scrape_interval() -> None:
    proc = subprocess.run(
        [_promtool(), "test", "rules", "qmpguard.rules.test.yml"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DEPLOY,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
