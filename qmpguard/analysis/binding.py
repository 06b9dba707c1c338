"""Expected DMA address space of every PCI device: QEMU's pci_device_iommu_address_space walk.

Walk up from the device's bus to the first bus a vIOMMU translates. Crossing a
conventional (non-express) bus aliases the requester ID: behind a PCIe-to-PCI bridge
to (its secondary bus, 00.0), behind any other bridge to (the bridge's bus, its devfn);
the crossing nearest the root wins. A root bus whose host bridge has bypass-iommu set
gets plain memory. Checked against hw/pci/pci.c of QEMU 7.2, 10.0 and 11.1 (the DMA-log
tests and the scenario generator run on all three).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpguard.analysis.model import BindingKind, MemoryReason
from qmpguard.analysis.topology import PciDevice, Topology, format_devfn
from qmpguard.analysis.viommu import VIommu


@dataclass(frozen=True)
class Requester:
    """The (bus, devfn) a vIOMMU sees a device's DMA as coming from."""

    bus: str
    devfn: int
    #: Not the device's own (bus, devfn): a conventional bus on the way. Not part of the
    #: identity: an aliased device and the device really at (bus, devfn) share one space.
    aliased: bool = field(default=False, compare=False)

    @property
    def devfn_text(self) -> str:
        return format_devfn(self.devfn)


@dataclass(frozen=True)
class ExpectedBinding:
    """Where a device's DMA should go: a vIOMMU address space or plain guest memory."""

    kind: BindingKind
    viommu: VIommu | None
    requester: Requester | None
    memory_reason: MemoryReason | None = None
    bypass_root: str | None = None  # the root bus whose bypass_iommu applies

    @property
    def aliased(self) -> bool:
        return self.requester is not None and self.requester.aliased

    @property
    def reason(self) -> str:
        """One sentence for people; logic reads the fields, never this text."""
        if self.memory_reason is MemoryReason.BYPASS:
            return (
                f"root bus {self.bypass_root} bypasses the vIOMMU (bypass_iommu on its host bridge)"
            )
        if self.memory_reason is not None:
            return str(self.memory_reason)
        assert self.viommu is not None and self.requester is not None
        if self.requester.aliased:
            return (
                f"translated by {self.viommu.label} as requester {self.requester.devfn_text} on "
                f"{self.requester.bus} (aliased by a conventional PCI bus)"
            )
        return f"translated by {self.viommu.label}"


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
        why = MemoryReason.NO_VIOMMU if not viommus else MemoryReason.NOT_TRANSLATED
        return ExpectedBinding(BindingKind.MEMORY, None, None, why)
    root = topo.root_of(alias_bus.path)
    if root.bypass_iommu:
        return ExpectedBinding(BindingKind.MEMORY, None, None, MemoryReason.BYPASS, root.path)
    aliased = (alias_bus.path, devfn) != (dev.bus, dev.devfn)
    return ExpectedBinding(BindingKind.VIOMMU, viommu, Requester(alias_bus.path, devfn, aliased))
