"""Pure analysis on snapshots recorded from real QEMU (tests/data, tests/record_snapshots.py)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from qmpguard.analysis.vm import analyse
from qmpguard.inspection import analyse_snapshot
from qmpguard.report.document import exit_code, target_json
from qmpguard.snapshot import Snapshot, load_snapshot, snapshot_from_json

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


def _mutated(doc: dict[str, Any], command: str, value: Any) -> Snapshot:
    doc = copy.deepcopy(doc)
    for reply in doc["replies"]:
        if reply["execute"] == command and "return" in reply:
            reply["return"] = value
            break
    return snapshot_from_json(doc)


@pytest.mark.parametrize(
    ("command", "value"),
    [
        ("qom-list", "not a list"),
        ("qom-list", [{"name": 1}]),
        ("qom-get", {"nested": ["junk"]}),
        ("qom-list-types", 42),
    ],
)
def test_wrong_shapes_become_clear_errors_not_verdicts(command: str, value: Any) -> None:
    doc = load_snapshot(snapshots("q35-intel-topology")[0]).to_json()
    snap = _mutated(doc, command, value)
    result = analyse_snapshot("t", snap)
    if result.ok:  # the mutated reply was one the analysis does not read
        return
    assert result.error is not None and result.error.reason == "bad-reply"
    assert "\n" not in result.error.message
    assert exit_code([result]) == 3


def test_analysis_is_deterministic() -> None:
    snap = load_snapshot(snapshots("q35-intel-topology")[0])
    assert analyse(snap).findings == analyse(snap).findings
