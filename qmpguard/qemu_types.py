"""QOM type names qmpguard relies on, in one place (checked against QEMU 7.2 and 10.0)."""

from __future__ import annotations

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

#: Abstract parents queried with qom-list-types(implements=...).
PCI_DEVICE_BASE = "pci-device"
PCI_BUS_BASE = "PCI"
PCIE_BUS_BASE = "PCIE"
PCI_HOST_BASE = "pci-host-bridge"
PCI_BRIDGE_BASE = "base-pci-bridge"
VIRTIO_PCI_BASE = "virtio-pci"
#: The VFIO PCI base type changed names over time; 7.2 has only vfio-pci itself.
VFIO_BASES = ("vfio-pci-device", "vfio-pci-base", "vfio-pci")

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
