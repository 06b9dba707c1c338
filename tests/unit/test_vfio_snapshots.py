"""The core verdict, specified offline on recorded VMs with vfio devices.

Each tests/data/*-vfio-*-<version>.json was recorded by tests/record_snapshots.py from a
real QEMU running the VFIO emulation; its .truth.json sidecar says what the emulation's
DMA log showed for each vfio device once the vIOMMU translated: "translated" (the
device's container has nothing mapped: it follows the vIOMMU) or "all-ram" (all guest
RAM stays mapped: the device was realized before the vIOMMU). qmpguard is compared with
that log, never with itself. Each test checks one rule, for one device of one snapshot.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qmpguard.inspection import analyse_snapshot
from qmpguard.report.document import target_json
from qmpguard.snapshot import load_snapshot
from tests.scenarios import VFIO_SCENARIOS

DATA = Path(__file__).resolve().parents[1] / "data"
TRUTH_SUFFIX = ".truth.json"

# What each evidence source must say, per recorded scenario and state: DECIDES (its
# conclusion is the DMA log's) or a fragment of the reason it gives for not deciding.
DECIDES = "decides"
CMDLINE, BUS_ORDER, AS_ORDER, HOTPLUGGED = "cmdline", "bus-order", "iommu-as-order", "hotplugged"
_INTEL_PAUSED = {CMDLINE: DECIDES, AS_ORDER: DECIDES}
# With translation on, each vtd space has a flat view of its own: creation order is lost.
_INTEL_TRANSLATING = {CMDLINE: DECIDES, AS_ORDER: "flat views"}
# virtio-iommu-pci sits on the vfio device's bus, and its space names carry a counter.
_VIRTIO = {CMDLINE: DECIDES, BUS_ORDER: DECIDES, AS_ORDER: DECIDES}
# Behind a PCIe-to-PCI bridge both devices are requester 00.0 of the bridge's bus: vtd-00.0,
# a name the IOAPIC's space (created in intel-iommu's realize) also has.
_BRIDGE_PAIR = {CMDLINE: DECIDES, AS_ORDER: "also the vIOMMU's own space"}
SPEC: dict[tuple[str, str], dict[str, str]] = {
    ("q35-intel-vfio-first", "paused"): _INTEL_PAUSED,
    ("q35-intel-vfio-after", "paused"): _INTEL_PAUSED,
    ("q35-intel-vfio-first", "translating"): _INTEL_TRANSLATING,
    ("q35-intel-vfio-after", "translating"): _INTEL_TRANSLATING,
    ("q35-virtio-vfio-first", "paused"): _VIRTIO,
    ("q35-virtio-vfio-after", "paused"): _VIRTIO,
    ("q35-intel-vfio-bridge-pair", "paused"): _BRIDGE_PAIR,
    ("q35-intel-vfio-bridge-pair", "translating"): _BRIDGE_PAIR,
    ("q35-intel-vfio-mixed", "paused"): _INTEL_PAUSED,
    ("q35-intel-vfio-mixed", "translating"): _INTEL_TRANSLATING,
    ("q35-intel-vfio-hotplug", "translating"): {
        HOTPLUGGED: DECIDES,
        CMDLINE: "hot-plugged",
        AS_ORDER: "only cold-plugged devices",
    },
}
#: What the DMA log implies: the realize order and the verdict it makes right.
ORDER_BY_TRUTH = {"translated": "after", "all-ram": "before"}
VERDICT_BY_TRUTH = {"translated": "ok", "all-ram": "misbound"}


@dataclass(frozen=True)
class Case:
    """One vfio device of one recorded snapshot, with the DMA log's truth about it."""

    path: Path
    scenario: str
    state: str
    version: str
    device: str
    truth: str
    hotplugged: bool

    @property
    def spec(self) -> dict[str, str]:
        return SPEC[(self.scenario, self.state)]

    def __str__(self) -> str:
        return f"{self.path.stem}:{self.device}"


def snapshot_files() -> list[Path]:
    return sorted(p for p in DATA.glob("*-vfio-*.json") if not p.name.endswith(TRUTH_SUFFIX))


def truth_of(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.with_suffix(TRUTH_SUFFIX).read_text())
    return doc


def cases() -> list[Case]:
    out = []
    for path in snapshot_files():
        truth = truth_of(path)
        state, version = truth["state"], truth["qemu_version"]
        scenario = path.stem.removesuffix(f"-{state}-{version}")
        for dev_id, dev in truth["devices"].items():
            out.append(
                Case(path, scenario, state, version, dev_id, dev["truth"], dev["hotplugged"])
            )
    return out


CASES = cases()
COLD = [c for c in CASES if not c.hotplugged]


def by(*keep: str, among: list[Case] = CASES, truth: str | None = None) -> list[Case]:
    """Cases whose spec names a deciding source in `keep` (or any, with no `keep`)."""
    return [
        c
        for c in among
        if (truth is None or c.truth == truth)
        and (not keep or any(c.spec.get(s) == DECIDES for s in keep))
    ]


@functools.cache
def report(path: Path, with_cmdline: bool) -> dict[str, Any]:
    """qmpguard's JSON report of a recorded snapshot (optionally without its command line)."""
    snap = load_snapshot(path)
    result = analyse_snapshot(snap.target, snap if with_cmdline else snap.without_cmdline())
    assert result.ok, result.error
    return target_json(result)


def device(case: Case, with_cmdline: bool = True) -> dict[str, Any]:
    doc = report(case.path, with_cmdline)
    return next(d for d in doc["devices"] if d["id"] == case.device)


def evidence(case: Case, source: str, with_cmdline: bool) -> dict[str, Any]:
    return next(e for e in device(case, with_cmdline)["order"]["evidence"] if e["source"] == source)


def codes(case: Case, with_cmdline: bool) -> set[str]:
    doc = report(case.path, with_cmdline)
    path = device(case, with_cmdline)["path"]
    return {f["code"] for f in doc["findings"] if f["device"] == path}


VIEWS = pytest.mark.parametrize("with_cmdline", [True, False], ids=["cmdline", "no-cmdline"])


def cases_param(selected: list[Case]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("case", selected, ids=str)


# --------------------------------------------------------------- the recorded data


def test_every_vfio_scenario_is_recorded() -> None:
    """Each scenario and state of tests/scenarios.py has a snapshot for some QEMU."""
    expected = {(name, state) for name, sc in VFIO_SCENARIOS.items() for state in sc.states}
    assert {(c.scenario, c.state) for c in CASES} == expected


@pytest.mark.parametrize("path", snapshot_files(), ids=lambda p: p.stem)
def test_truth_belongs_to_its_snapshot(path: Path) -> None:
    truth = truth_of(path)
    assert (truth["snapshot"], truth["qemu_version"]) == (
        path.name,
        load_snapshot(path).qemu_version,
    )


@pytest.mark.parametrize("path", snapshot_files(), ids=lambda p: p.stem)
def test_every_vfio_device_has_a_truth(path: Path) -> None:
    seen = {d["id"] for d in report(path, True)["devices"] if d["vfio"]}
    assert seen == set(truth_of(path)["devices"])


@pytest.mark.parametrize("path", snapshot_files(), ids=lambda p: p.stem)
def test_recorded_file_is_free_of_temporary_paths(path: Path) -> None:
    assert "/tmp/" not in path.read_text()


# --------------------------------------------------------------- the core claim


@VIEWS
@cases_param(by(truth="all-ram"))
def test_never_ok_when_all_ram_stays_mapped(case: Case, with_cmdline: bool) -> None:
    assert device(case, with_cmdline)["verdict"] != "ok"


@VIEWS
@cases_param(by(truth="translated"))
def test_never_misbound_when_translated(case: Case, with_cmdline: bool) -> None:
    assert device(case, with_cmdline)["verdict"] != "misbound"


@cases_param(CASES)
def test_every_vfio_device_is_behind_the_viommu(case: Case) -> None:
    assert device(case)["expected"]["kind"] == "viommu"


@cases_param(CASES)
def test_verdict_with_the_command_line_is_the_dma_logs(case: Case) -> None:
    assert device(case)["verdict"] == VERDICT_BY_TRUTH[case.truth]


@cases_param(CASES)
def test_qg001_exactly_when_all_ram_stays_mapped(case: Case) -> None:
    assert ("QG001" in codes(case, True)) == (case.truth == "all-ram")


@cases_param(by(BUS_ORDER, AS_ORDER, HOTPLUGGED))
def test_verdict_without_the_command_line_is_the_dma_logs(case: Case) -> None:
    assert device(case, False)["verdict"] == VERDICT_BY_TRUTH[case.truth]


UNDECIDED_WITHOUT_CMDLINE = [c for c in CASES if c not in by(BUS_ORDER, AS_ORDER, HOTPLUGGED)]


@cases_param(UNDECIDED_WITHOUT_CMDLINE)
def test_without_the_command_line_undecidable_is_unverified(case: Case) -> None:
    assert device(case, False)["verdict"] == "unverified"


@cases_param(UNDECIDED_WITHOUT_CMDLINE)
def test_unverified_is_reported_as_qg002(case: Case) -> None:
    assert "QG002" in codes(case, False)


# --------------------------------------------------------------- each evidence source


@cases_param(CASES)
def test_evidence_sources_are_the_specified_ones(case: Case) -> None:
    sources = {e["source"] for e in device(case)["order"]["evidence"]}
    assert sources == set(case.spec)


@cases_param(by(CMDLINE))
def test_cmdline_decides_wherever_it_exists(case: Case) -> None:
    assert evidence(case, CMDLINE, True)["conclusion"] == ORDER_BY_TRUTH[case.truth]


@cases_param(by(HOTPLUGGED))
def test_hotplugged_decides_for_a_hot_plugged_device(case: Case) -> None:
    assert evidence(case, HOTPLUGGED, False)["conclusion"] == ORDER_BY_TRUTH[case.truth]


@cases_param(by(BUS_ORDER))
def test_bus_order_decides_on_the_viommus_bus(case: Case) -> None:
    assert evidence(case, BUS_ORDER, False)["conclusion"] == ORDER_BY_TRUTH[case.truth]


@cases_param(by(AS_ORDER))
def test_mtree_order_decides_before_translation(case: Case) -> None:
    assert evidence(case, AS_ORDER, False)["conclusion"] == ORDER_BY_TRUTH[case.truth]


@cases_param([c for c in CASES if c.spec.get(AS_ORDER, DECIDES) != DECIDES])
def test_mtree_order_says_why_it_cannot_decide(case: Case) -> None:
    e = evidence(case, AS_ORDER, False)
    assert (e["conclusion"], case.spec[AS_ORDER] in e["detail"]) == (None, True), e["detail"]


@cases_param([c for c in CASES if c.spec[CMDLINE] != DECIDES])
def test_cmdline_says_why_it_cannot_decide(case: Case) -> None:
    e = evidence(case, CMDLINE, True)
    assert (e["conclusion"], case.spec[CMDLINE] in e["detail"]) == (None, True), e["detail"]
