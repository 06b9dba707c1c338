"""QOM names and HMP lines qmpguard relies on, in one place (checked on QEMU 7.2, 10.0, 11.1)."""

from __future__ import annotations

#: The two HMP reads: address spaces by flat view, and the qdev tree (type facts).
HMP_MTREE = "info mtree -f"
HMP_QTREE = "info qtree"


def child_type(entry_type: str) -> str | None:
    """qom-list entry type 'child<e1000e>' -> 'e1000e'; anything else -> None."""
    if entry_type.startswith("child<") and entry_type.endswith(">"):
        return entry_type[6:-1]
    return None


def link_type(entry_type: str) -> str | None:
    """qom-list entry type 'link<e1000e>' -> 'e1000e'; anything else -> None."""
    if entry_type.startswith("link<") and entry_type.endswith(">"):
        return entry_type[5:-1]
    return None


#: vIOMMU device types -> kind. Sysbus ones cover the machine's main root bus;
#: PCI ones (virtio-iommu-pci, riscv-iommu-pci) cover the bus they sit on.
VIOMMU_TYPES: dict[str, str] = {
    "intel-iommu": "intel",
    "amd-iommu": "amd",
    "virtio-iommu-pci": "virtio",
    "arm-smmuv3": "smmuv3",
    "riscv-iommu-pci": "riscv",
}
PCI_VIOMMU_TYPES = frozenset({"virtio-iommu-pci", "riscv-iommu-pci"})

#: Bridges whose PCIe type is PCI_EXP_TYPE_PCI_BRIDGE: devices behind them are
#: aliased to (secondary bus, 00.0) rather than to the bridge's own devfn.
PCIE_TO_PCI_BRIDGE_TYPES = frozenset({"pcie-pci-bridge"})

#: Expander bridges: their root bus hangs off a host object in /machine/unattached.
PXB_TYPES = frozenset({"pxb", "pxb-pcie", "pxb-cxl"})

#: Containers whose children may be host bridges or sysbus vIOMMUs.
OBJECT_CONTAINERS = (
    "/machine",
    "/machine/unattached",
    "/machine/peripheral",
    "/machine/peripheral-anon",
)
