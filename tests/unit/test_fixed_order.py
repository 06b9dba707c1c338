"""The order QEMU's own rules fix (qmpguard/analysis/order.py fixed_order): hot-plugged
devices, vIOMMUs the machine creates, vIOMMUs that refuse vfio-pci realized after them.
One device and one vIOMMU per row, and the evidence expected, in order."""

from __future__ import annotations

import pytest

from qmpguard.analysis.model import EvidenceSource, Relative
from qmpguard.analysis.order import fixed_order
from qmpguard.analysis.topology import PciDevice
from qmpguard.analysis.viommu import VIommu

HOT, MACHINE, REFUSED = (
    EvidenceSource.HOTPLUGGED,
    EvidenceSource.MACHINE_VIOMMU,
    EvidenceSource.REFUSED_ORDER,
)
AFTER, BEFORE = Relative.AFTER, Relative.BEFORE
WHY = "QEMU refuses vfio-pci realized after arm-smmuv3"


def device(vfio: bool, hotplugged: bool | None) -> PciDevice:
    dtype = "vfio-pci" if vfio else "e1000e"
    bus = "/machine/peripheral/rp1/rp1"
    return PciDevice(
        "/machine/peripheral/d", "d", dtype, bus, 0, 0, hotplugged, vfio, False, None, False, None
    )


def viommu(machine_created: bool, refuses: str | None) -> VIommu:
    return VIommu(
        "/machine/smmu", "arm-smmuv3", "smmuv3", "/machine/gpex/pcie.0", machine_created, refuses
    )


@pytest.mark.parametrize(
    ("case", "dev", "vi", "expected"),
    [
        pytest.param("nothing fixed", device(True, False), viommu(False, None), [], id="none"),
        pytest.param(
            "hotplugged unknown is not hot-plugged",
            device(True, None),
            viommu(False, None),
            [],
            id="unknown",
        ),
        pytest.param(
            "hot-plugged", device(False, True), viommu(False, None), [(HOT, AFTER)], id="hot"
        ),
        pytest.param(
            "a vIOMMU the machine creates",
            device(False, False),
            viommu(True, None),
            [(MACHINE, AFTER)],
            id="machine",
        ),
        pytest.param(
            "a vfio device behind a vIOMMU refusing later ones",
            device(True, False),
            viommu(False, WHY),
            [(REFUSED, BEFORE)],
            id="refused",
        ),
        pytest.param(
            "the refusal is about vfio-pci only",
            device(False, False),
            viommu(False, WHY),
            [],
            id="refused-not-vfio",
        ),
        pytest.param(
            "all three, in this order",
            device(True, True),
            viommu(True, WHY),
            [(HOT, AFTER), (MACHINE, AFTER), (REFUSED, BEFORE)],
            id="all",
        ),
    ],
)
def test_fixed_order(
    case: str, dev: PciDevice, vi: VIommu, expected: list[tuple[EvidenceSource, Relative]]
) -> None:
    found = fixed_order(dev, vi)
    assert [(e.source, e.conclusion) for e in found] == expected
    assert all(e.detail for e in found)


def test_details_say_why() -> None:
    found = fixed_order(device(True, True), viommu(True, WHY))
    assert [e.detail for e in found] == [
        "hot-plugged after machine init; a vIOMMU cannot be",
        "arm-smmuv3 is created with the machine, before any device",
        WHY,
    ]
