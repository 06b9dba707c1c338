"""The amd-iommu bus-number rule (qmpguard/analysis/amd_shared_space.py) on hand-built
inputs: one row, one case, the vfio devices it must report (or none where it must stay
silent). The live truth is tests/integration/test_amd_shared_space.py."""

from __future__ import annotations

import pytest

from qmpguard.analysis.amd_shared_space import (
    IOAPIC_DEVFN,
    Member,
    count_spaces,
    number_bus,
    shared_spaces,
)
from qmpguard.analysis.binding import Requester
from qmpguard.analysis.mtree import AddressSpaceEntry
from qmpguard.analysis.topology import PciBus, Topology

ROOT = "/machine/q35/pcie.0"
RP1 = "/machine/peripheral/rp1/rp1"
RP2 = "/machine/peripheral/rp2/rp2"
PXB = "/machine/peripheral/pxb/pxb"  # a pxb-pcie's root bus: a number of its own


def m(
    label: str,
    bus: str,
    devfn: int = 0,
    vfio: bool = False,
    keyed: str | None = ROOT,
    bridge: bool = False,
) -> Member:
    """A member filed under `keyed`'s bus number (None: possibly hot-plugged)."""
    path = f"/machine/peripheral/{label}"
    return Member(path, label, Requester(bus, devfn), keyed, vfio, bridge)


MCH = m("mch", ROOT)
V1, V2 = m("hostdev1", RP1, vfio=True), m("hostdev2", RP2, vfio=True)
NIC2 = m("nic2", RP2)


def named(*cases: tuple[object, ...]) -> list[object]:
    return [pytest.param(*c, id=str(c[0])) for c in cases]


@pytest.mark.parametrize(
    ("case", "members", "listed", "expected"),
    named(
        # (reported label, the others in its space) per finding
        ("two vfio behind root ports, one space (10.0)", [MCH, V1, V2], {0: 1},
         {("hostdev1", ("mch", "hostdev2")), ("hostdev2", ("mch", "hostdev1"))}),
        ("same VM on a fixed QEMU: a space each (11.1)", [MCH, V1, V2], {0: 3}, set()),
        ("count between the keyings: inconclusive", [MCH, V1, V2, m("x", PXB, keyed=PXB)],
         {0: 3}, set()),
        ("bridges count but are not named", [MCH, V1, m("up", RP2, bridge=True)], {0: 1},
         {("hostdev1", ("mch",))}),
        ("named when only bridges share", [V1, m("up", RP2, bridge=True)], {0: 1},
         {("hostdev1", ("up",))}),
        ("vfio and a NIC", [MCH, V1, NIC2], {0: 1}, {("hostdev1", ("mch", "nic2"))}),
        ("emulated devices only: nothing to report", [MCH, NIC2, m("nic1", RP1)], {0: 1},
         set()),
        ("misbound vfio is QG001's, listed as another", [MCH, V1, m("bad", RP2)], {0: 1},
         {("hostdev1", ("mch", "bad"))}),
        ("a possibly hot-plugged requester: inconclusive", [MCH, V1, m("hp", RP2, keyed=None)],
         {0: 1}, set()),
        ("no mtree entry for that devfn", [MCH, V1, V2], {}, set()),
        ("pxb root bus has its own number", [MCH, V1, m("p", PXB, vfio=True, keyed=PXB)],
         {0: 2}, {("hostdev1", ("mch",))}),
        ("one requester aliased twice (QG004's, not this)",
         [m("a", RP1, vfio=True), m("b", RP1, vfio=True)], {0: 1}, set()),
        ("vfio alone on the root bus at its devfn", [m("v", ROOT, 72, vfio=True)], {72: 1},
         set()),
        ("IOAPIC space counted at devfn 160", [m("v", RP1, IOAPIC_DEVFN, vfio=True)],
         {IOAPIC_DEVFN: 1}, {("v", ("the IOAPIC",))}),
        ("IOAPIC and the device apart (fixed)", [m("v", RP1, IOAPIC_DEVFN, vfio=True)],
         {IOAPIC_DEVFN: 2}, set()),
    ),
)  # fmt: skip
def test_shared_spaces(
    case: str, members: list[Member], listed: dict[int, int], expected: set[object]
) -> None:
    got = {(s.label, s.others) for s in shared_spaces(members, listed, ROOT)}
    assert got == expected, case


def test_evidence_counts() -> None:
    (s, *_) = shared_spaces([MCH, V1, V2], {0: 1}, ROOT)
    assert (s.devfn, s.listed, s.requesters) == (0, 1, 3)


def entry(name: str, position: int = 0) -> AddressSpaceEntry:
    return AddressSpaceEntry(0, position, name, "amdvi_root")


@pytest.mark.parametrize(
    ("case", "names", "expected"),
    named(
        ("10.0 listing", ["amd_iommu_devfn_0", "amd_iommu_devfn_8", "e1000e"], {0: 1, 8: 1}),
        ("11.1 listing", ["amd_iommu_devfn_160", *["amd_iommu_devfn_0"] * 3], {160: 1, 0: 3}),
        ("other models and prefixes are not amd spaces",
         ["vtd-00.0", "xamd_iommu_devfn_0", "amd_iommu_devfn_0x"], {}),
    ),
)  # fmt: skip
def test_count_spaces(case: str, names: list[str], expected: dict[int, int]) -> None:
    got = count_spaces(entry(n, i) for i, n in enumerate(names))
    assert got == expected, case


def topo() -> Topology:
    t = Topology(main_root=ROOT)
    for path, root in ((ROOT, True), (RP1, False), (PXB, True)):
        t.buses[path] = PciBus(path, "PCIE", True, root, False, None)
    return t


@pytest.mark.parametrize(
    ("case", "bus", "hotplugged", "expected"),
    named(
        ("behind a bridge: bus number 0, the main root's", RP1, False, ROOT),
        ("on the main root", ROOT, False, ROOT),
        ("on a pxb root bus: its own number", PXB, False, PXB),
        ("hot-plugged: number depends on when", RP1, True, None),
        ("hot-plug unknown", RP1, None, None),
    ),
)  # fmt: skip
def test_number_bus(case: str, bus: str, hotplugged: bool | None, expected: str | None) -> None:
    assert number_bus(topo(), Requester(bus, 0), hotplugged) == expected, case
