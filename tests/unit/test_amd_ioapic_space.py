"""amd-iommu's IOAPIC space (00:14.0) under pass-through: a vfio device there maps no
guest memory on QEMU 10.0.0-10.0.3 (the space is made before the pass-through region it
aliases), all of it from 10.0.4/10.1 (docs/design.md, amd-iommu). QG003 ("all guest RAM
stays mapped") must follow QEMU's own `info mtree -f` (listings recorded from 10.0.2 and
11.1.3 with this layout, tests/unit/data) and, without one, the version table. The DMA-log
truth is the corpus case in tests/generator/corpus.py."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from qmpguard.analysis.model import Verdict
from qmpguard.analysis.preflight import QemuVersion, preflight
from qmpguard.analysis.viommu import spaces_rendering_ram
from qmpguard.analysis.viommu_models import ioapic_space_maps_nothing, parse_release
from qmpguard.analysis.vm import VmAnalysis, judge
from qmpguard.qemu_names import HMP_MTREE
from qmpguard.snapshot import Snapshot

DATA = Path(__file__).resolve().parent / "data"
LINE = shlex.split(
    "qemu-system-x86_64 -M q35 -nodefaults -device amd-iommu,id=viommu "
    "-device vfio-pci,host=0000:01:00.0,id=hostdev1,bus=pcie.0,addr=14.0 "
    "-device vfio-pci,host=0000:02:00.0,id=hostdev2,bus=pcie.0,addr=9.0"
)
BOTH = {"hostdev1", "hostdev2"}
RAM_AT_160 = 'FlatView #9\n AS "amd_iommu_devfn_160", root: amdvi_root\n' + (
    " Root memory region: amdvi-sys\n  0000000000000000-00000000000bffff (prio 0, ram): pc.ram\n"
)


def listing(name: str | None) -> str | None:
    """A recorded `info mtree -f` ("10.0.2", "11.1.3"), "mixed": 10.0.2's plus a second
    amd_iommu_devfn_160 space that renders RAM; None: no listing (preflight)."""
    if name is None:
        return None
    if name == "mixed":
        return (DATA / "amd-ioapic-mtree-10.0.2.txt").read_text() + RAM_AT_160
    return (DATA / f"amd-ioapic-mtree-{name}.txt").read_text()


def judged(version: str | None, mtree: str | None) -> VmAnalysis:
    """The layout judged as check would with this QEMU version and listing."""
    facts = preflight(LINE, version=QemuVersion(version)).facts
    snap = Snapshot(target="t", transport="qmp-unix", collected_at="", qemu_version=version)
    if mtree is not None:
        snap.record("human-monitor-command", {"command-line": HMP_MTREE}, {"return": mtree})
    return judge(facts, snap)


def qg003(vm: VmAnalysis) -> set[str]:
    return {f.device.rsplit("/", 1)[-1] for f in vm.findings if f.code == "QG003" and f.device}


@pytest.mark.parametrize(
    ("version", "mtree", "expected"),
    [
        pytest.param("10.0.2", "10.0.2", {"hostdev2"}, id="10.0.2 listing: 160 renders nothing"),
        pytest.param("11.1.3", "11.1.3", BOTH, id="11.1.3 listing: 160 renders RAM"),
        pytest.param("10.0.4", "10.0.2", {"hostdev2"}, id="the listing beats the version"),
        pytest.param("10.0.2", "11.1.3", BOTH, id="a 10.0.2 with the fix backported"),
        pytest.param("10.0.2", "mixed", {"hostdev2"}, id="two 160 spaces: version table"),
        pytest.param("11.1.3", "mixed", BOTH, id="two 160 spaces on a fixed QEMU"),
        pytest.param("10.0.2", None, {"hostdev2"}, id="no listing: 10.0.2 in the table"),
        pytest.param("10.0.4", None, BOTH, id="no listing: 10.0.4 has the fix"),
        pytest.param("10.0", None, BOTH, id="no micro: the table cannot tell"),
    ],
)
def test_qg003_follows_what_the_ioapic_space_maps(
    version: str, mtree: str | None, expected: set[str]
) -> None:
    vm = judged(version, listing(mtree))
    assert {d.device.label: d.verdict for d in vm.devices if d.device.vfio} == dict.fromkeys(
        BOTH, Verdict.OK
    )
    assert qg003(vm) == expected


@pytest.mark.parametrize(("version", "expected"), [("10.0.2", {"hostdev2"}), ("11.1.3", BOTH)])
def test_preflight_says_what_check_says(version: str, expected: set[str]) -> None:
    """Preflight has no listing: the version table gives it check's answer."""
    assert qg003(preflight(LINE, version=QemuVersion(version)).analysis()) == expected


def test_the_listing_is_read_per_space_name() -> None:
    ram = spaces_rendering_ram(listing("10.0.2"))
    assert ram["amd_iommu_devfn_160"] == frozenset({False})
    assert ram["amd_iommu_devfn_72"] == frozenset({True})
    assert spaces_rendering_ram(listing("mixed"))["amd_iommu_devfn_160"] == {True, False}
    assert spaces_rendering_ram("not a listing") == {}
    assert spaces_rendering_ram(None) == {}


def test_the_version_table() -> None:
    assert parse_release("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)") == (10, 0, 2)
    assert parse_release("10.0") is None
    affected = [(10, 0, 0), (10, 0, 3)]
    fixed = [(10, 0, 4), (10, 1, 0), (11, 1, 3), None]
    assert all(ioapic_space_maps_nothing("amd-iommu", r) for r in affected)
    assert not any(ioapic_space_maps_nothing("amd-iommu", r) for r in fixed)
    assert ioapic_space_maps_nothing("intel-iommu", (10, 0, 2)) is None
