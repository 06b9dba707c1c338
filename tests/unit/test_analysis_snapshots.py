"""Pure analysis on snapshots recorded from real QEMU (tests/data, tests/record_snapshots.py)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qmpguard.inspection import analyse_snapshot
from qmpguard.qemu_names import HMP_QTREE
from qmpguard.report.document import exit_code, target_json
from qmpguard.snapshot import Snapshot, load_snapshot, reply_key

DATA = Path(__file__).resolve().parent.parent / "data"


def snapshots(prefix: str) -> list[Path]:
    found = sorted(DATA.glob(f"{prefix}-*.json"))
    assert found, f"no recorded snapshot for {prefix}"
    return found


def devices(snap: Snapshot) -> dict[str, Any]:
    result = analyse_snapshot(snap.target, snap)
    assert result.ok
    return {d["id"] or d["path"]: d for d in target_json(result)["devices"]}


@pytest.mark.parametrize("path", snapshots("q35-intel-topology"), ids=lambda p: p.stem)
def test_q35_bindings_from_snapshot(path: Path) -> None:
    devs = devices(load_snapshot(path))
    alias = {"bus": "/machine/peripheral/ppb/ppb", "devfn": "00.0"}
    assert {
        n: devs[n]["expected"]["requester"] for n in ("legacy1", "legacy2", "pb", "deep")
    } == dict.fromkeys(("legacy1", "legacy2", "pb", "deep"), alias)
    assert devs["nic1"]["expected"]["requester"] == {
        "bus": "/machine/peripheral/rp1/rp1",
        "devfn": "00.0",
    }
    assert devs["vnbypass"]["expected"]["kind"] == "memory"
    assert devs["mch" if "mch" in devs else "/machine/q35/mch"]["expected"]["requester"] == {
        "bus": "/machine/q35/pcie.0",
        "devfn": "00.0",
    }
    assert devs["nic1"]["order"]["relative_to_viommu"] == "after"


@pytest.mark.parametrize("path", snapshots("i440fx-pci-bridge"), ids=lambda p: p.stem)
def test_i440fx_bridges_from_snapshot(path: Path) -> None:
    devs = devices(load_snapshot(path))
    assert devs["behind1"]["expected"]["requester"]["devfn"] == "05.0"
    assert devs["behinddmi"]["expected"]["requester"]["devfn"] == "1e.0"


def test_without_cmdline_order_is_unknown_and_says_why() -> None:
    snap = load_snapshot(snapshots("q35-intel-topology")[0]).without_cmdline()
    nic = devices(snap)["nic1"]
    assert nic["order"]["relative_to_viommu"] == "unknown"
    assert nic["order"]["evidence"][0]["detail"].startswith("QEMU command line not available")


def _mutated(snap: Snapshot, command: str, arguments: dict[str, Any], value: Any) -> Snapshot:
    """A copy of `snap` with one recorded reply (which must exist) replaced by `value`."""
    key = reply_key(command, arguments)
    assert key in snap.replies, f"{key} is not recorded: the row would mutate nothing"
    out = copy.deepcopy(snap)
    out.replies[key] = {"return": value}
    return out


PCIE0 = "/machine/q35/pcie.0"


@pytest.mark.parametrize(
    ("command", "arguments", "value", "says"),
    [
        pytest.param(
            "qom-list",
            {"path": "/machine/peripheral"},
            "not a list",
            "reply is not a list",
            id="peripheral-not-a-list",
        ),
        pytest.param(
            "qom-list", {"path": "/machine"}, 42, "reply is not a list", id="machine-a-number"
        ),
        pytest.param(
            "qom-list",
            {"path": PCIE0},
            [{"name": 1}],
            "entry without name/type",
            id="bus-entry-without-type",
        ),
        pytest.param(
            "qom-get",
            {"path": PCIE0, "property": "child[0]"},
            {"nested": ["junk"]},
            "link is not a path",
            id="link-an-object",
        ),
        pytest.param(
            "qom-get",
            {"path": "/machine/peripheral/iommu", "property": "primary-bus"},
            42,
            "expected str, got int",
            id="viommu-property-a-number",
        ),
        pytest.param(
            "human-monitor-command",
            {"command-line": HMP_QTREE},
            ["junk"],
            "info qtree",
            id="qtree-a-list",
        ),
    ],
)
def test_wrong_shapes_become_clear_errors_not_verdicts(
    command: str, arguments: dict[str, Any], value: Any, says: str
) -> None:
    """Each row replaces a reply the analysis reads (a reply it does not read could not
    make this test fail): the result is a one-line bad-reply error, exit code 3."""
    snap = _mutated(load_snapshot(snapshots("q35-intel-topology")[0]), command, arguments, value)
    result = analyse_snapshot("t", snap)
    assert result.error is not None and result.error.reason == "bad-reply", result.ok
    assert says in result.error.message and "\n" not in result.error.message
    assert exit_code([result]) == 3


def test_analysis_is_deterministic() -> None:
    """The same JSON report from fresh interpreters with different hash seeds.

    Analysing twice in one process proves little: the qtree parse is cached and the order
    of sets of strings is fixed by the process's hash seed. Each run here is a new process
    (`qmpguard check --snapshot`) with its own PYTHONHASHSEED, over every recorded snapshot.
    """
    paths = [p for p in sorted(DATA.glob("*.json")) if not p.name.endswith(".truth.json")]
    argv = [sys.executable, "-m", "qmpguard", "check", "--format", "json"]
    argv += [arg for p in paths for arg in ("--snapshot", str(p))]
    runs = [
        subprocess.run(
            argv,
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        for seed in ("0", "1", "2")
    ]
    docs = [json.loads(run.stdout) for run in runs]
    assert len(docs[0]["targets"]) == len(paths) and any(t["findings"] for t in docs[0]["targets"])
    assert all(
        run.stdout == runs[0].stdout and run.returncode == runs[0].returncode for run in runs
    )
