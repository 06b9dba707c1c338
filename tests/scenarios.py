"""QEMU command lines shared by the live tests and the snapshot recorder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

Q35_INTEL_TOPOLOGY = [
    "-S",
    "-M",
    "q35",
    "-m",
    "64",
    "-device",
    "intel-iommu,id=iommu,caching-mode=on",
    "-device",
    "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=2.0",
    "-device",
    "e1000e,id=nic1,bus=rp1",
    "-device",
    "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=3.0",
    "-device",
    "e1000,id=legacy1,bus=ppb,addr=1.0",
    "-device",
    "e1000,id=legacy2,bus=ppb,addr=2.0",
    "-device",
    "pci-bridge,id=pb,chassis_nr=2,bus=ppb,addr=3.0",
    "-device",
    "e1000,id=deep,bus=pb,addr=4.0",
    "-device",
    "pxb-pcie,id=pxb,bus_nr=100,bypass_iommu=true,bus=pcie.0,addr=4.0",
    "-device",
    "pcie-root-port,id=rp2,chassis=3,bus=pxb",
    "-device",
    "virtio-net-pci,id=vnbypass,bus=rp2,disable-legacy=on",
    "-device",
    "virtio-net-pci,id=vnon,bus=pcie.0,addr=5.0,disable-legacy=on,iommu_platform=on",
    "-device",
    "virtio-net-pci,id=vnoff,bus=pcie.0,addr=6.0,disable-legacy=on",
]

I440FX_PCI_BRIDGE = [
    "-S",
    "-M",
    "pc",
    "-m",
    "64",
    "-device",
    "virtio-iommu-pci,id=viommu,addr=4.0",
    "-device",
    "pci-bridge,id=pb,chassis_nr=1,addr=5.0",
    "-device",
    "e1000,id=behind1,bus=pb,addr=1.0",
    "-device",
    "e1000,id=behind2,bus=pb,addr=2.0",
    "-device",
    "i82801b11-bridge,id=dmi,addr=1e.0",
    "-device",
    "e1000,id=behinddmi,bus=dmi,addr=3.0",
]


# ------------------------------------------------------- VMs with emulated vfio-pci
# Recorded by tests/record_snapshots.py with the VFIO emulation (qmpguard.demo.fakevfio)
# and specified offline by tests/unit/test_vfio_snapshots.py against the DMA log.

#: Guest RAM of every vfio scenario: a container holding this many bytes maps all of it.
VFIO_RAM_MIB = 64
VFIO_MACHINE = [
    "-M",
    "q35,kernel-irqchip=split",
    "-m",
    str(VFIO_RAM_MIB),
    "-object",
    f"memory-backend-memfd,id=mem,size={VFIO_RAM_MIB}M",
    "-machine",
    "memory-backend=mem",
]
INTEL_VIOMMU = "intel-iommu,id=viommu,caching-mode=on"
VIRTIO_VIOMMU = "virtio-iommu-pci,id=viommu,boot-bypass=false,bus=pcie.0,addr=2.0"


@dataclass(frozen=True)
class VfioDev:
    """One emulated vfio-pci device: its id, where it sits, and its own IOMMU group."""

    id: str
    bus: str
    addr: str
    group: int

    @property
    def host(self) -> str:
        """The host device name (the sysfs directory's basename)."""
        return f"0000:{self.group:02x}:00.0"

    def option(self, sysfs_root: Path) -> str:
        """The -device value, its sysfsdev under `sysfs_root`."""
        return (
            f"vfio-pci,id={self.id},sysfsdev={sysfs_root / self.host},"
            f"bus={self.bus},addr={self.addr},rombar=0"
        )


@dataclass(frozen=True)
class VfioScenario:
    """One VM with emulated vfio devices, recorded in one or more states.

    Every VM starts paused (-S). `viommu` "intel": the VT-d guest (-kernel) is then let
    run and turns translation on; "virtio": virtio-iommu-pci with boot-bypass=false
    translates from the start, so the paused VM already shows the truth. States:
    "paused" (snapshot under -S, before any guest code) and "translating" (after the
    guest enabled translation). `hotplug` devices are added with device_add once the
    guest translates, before the "translating" snapshot.
    """

    devices: tuple[str | VfioDev, ...]
    viommu: str
    states: tuple[str, ...]
    hotplug: tuple[VfioDev, ...] = ()

    @property
    def cold_vfio(self) -> tuple[VfioDev, ...]:
        return tuple(d for d in self.devices if isinstance(d, VfioDev))

    @property
    def vfio(self) -> tuple[VfioDev, ...]:
        return self.cold_vfio + self.hotplug


_HOSTDEV0 = VfioDev("hostdev0", "pcie.0", "9.0", 1)
# Anonymous devices on the vIOMMU's bus below the vfio device's slot: their spaces are
# created at machine-done, so they place the vfio device's space in the sequence.
_NICS = ("e1000e,bus=pcie.0,addr=3.0", "e1000e,bus=pcie.0,addr=4.0")

VFIO_SCENARIOS: dict[str, VfioScenario] = {
    "q35-intel-vfio-first": VfioScenario(
        (INTEL_VIOMMU, _HOSTDEV0, *_NICS), "intel", ("paused", "translating")
    ),
    "q35-intel-vfio-after": VfioScenario(
        (_HOSTDEV0, INTEL_VIOMMU, *_NICS), "intel", ("paused", "translating")
    ),
    "q35-virtio-vfio-first": VfioScenario(
        (VIRTIO_VIOMMU, _HOSTDEV0, _NICS[0]), "virtio", ("paused",)
    ),
    "q35-virtio-vfio-after": VfioScenario(
        (_HOSTDEV0, VIRTIO_VIOMMU, _NICS[0]), "virtio", ("paused",)
    ),
    "q35-intel-vfio-bridge-pair": VfioScenario(
        (
            INTEL_VIOMMU,
            "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=5.0",
            VfioDev("hostdev0", "ppb", "1.0", 1),
            VfioDev("hostdev1", "ppb", "2.0", 2),
        ),
        "intel",
        ("paused", "translating"),
    ),
    # One device on each side of the vIOMMU: the DMA log tells them apart by IOMMU group.
    "q35-intel-vfio-mixed": VfioScenario(
        (_HOSTDEV0, INTEL_VIOMMU, VfioDev("hostdev1", "pcie.0", "a.0", 2), *_NICS),
        "intel",
        ("paused", "translating"),
    ),
    "q35-intel-vfio-hotplug": VfioScenario(
        (INTEL_VIOMMU, "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=2.0"),
        "intel",
        ("translating",),
        hotplug=(VfioDev("hot0", "rp1", "0.0", 5),),
    ),
}
