"""Expected DMA address space of every PCI device: QEMU's pci_device_iommu_address_space walk.

Walk up from the device's bus to the first bus a vIOMMU translates. Crossing a
conventional (non-express) bus aliases the requester ID: behind a PCIe-to-PCI bridge
to (its secondary bus, 00.0), behind any other bridge to (the bridge's bus, its devfn);
the crossing nearest the root wins. A root bus whose host bridge has bypass-iommu set
gets plain memory. Checked against hw/pci/pci.c of QEMU 7.2 and 10.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from qmpguard.analysis.topology import PciDevice, Topology, format_devfn
from qmpguard.analysis.viommu import VIommu


@dataclass(frozen=True)
class Requester:
    """The (bus, devfn) a vIOMMU sees a device's DMA as coming from."""

    bus: str
    devfn: int

    @property
    def devfn_text(self) -> str:
        return format_devfn(self.devfn)


@dataclass(frozen=True)
class ExpectedBinding:
    """Where a device's DMA should go: a vIOMMU address space or plain guest memory."""

    kind: Literal["viommu", "memory"]
    viommu: VIommu | None
    requester: Requester | None
    reason: str


def expected_binding(topo: Topology, viommus: list[VIommu], dev: PciDevice) -> ExpectedBinding:
    """The address space QEMU gives `dev` (once every vIOMMU is realized)."""
    by_bus = {v.covers: v for v in viommus if v.covers}
    bus = topo.buses[dev.bus]
    alias_bus, devfn = bus, dev.devfn
    iommu_bus = bus
    hops = 0
    while iommu_bus.path not in by_bus and iommu_bus.parent_device and hops < 256:
        hops += 1
        parent = topo.devices[iommu_bus.parent_device]
        parent_bus = topo.buses[parent.bus]
        if not iommu_bus.express:
            if parent.pcie_to_pci_bridge:
                alias_bus, devfn = iommu_bus, 0
            else:
                alias_bus, devfn = parent_bus, parent.devfn
        iommu_bus = parent_bus
    viommu = by_bus.get(iommu_bus.path)
    if viommu is None:
        why = "no vIOMMU in this VM" if not viommus else "no vIOMMU translates this bus"
        return ExpectedBinding("memory", None, None, why)
    root = topo.root_of(alias_bus.path)
    if root.bypass_iommu:
        return ExpectedBinding(
            "memory",
            None,
            None,
            f"root bus {root.path} bypasses the vIOMMU (bypass_iommu on its host bridge)",
        )
    requester = Requester(alias_bus.path, devfn)
    if (alias_bus.path, devfn) != (dev.bus, dev.devfn):
        reason = (
            f"translated by {viommu.label} as requester {format_devfn(devfn)} on "
            f"{alias_bus.path} (aliased by a conventional PCI bus)"
        )
    else:
        reason = f"translated by {viommu.label}"
    return ExpectedBinding("viommu", viommu, requester, reason)
