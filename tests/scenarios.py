"""QEMU command lines shared by the live tests and the snapshot recorder."""

from __future__ import annotations

Q35_INTEL_TOPOLOGY = [
    "-S", "-M", "q35", "-m", "64",
    "-device", "intel-iommu,id=iommu,caching-mode=on",
    "-device", "pcie-root-port,id=rp1,chassis=1,bus=pcie.0,addr=2.0",
    "-device", "e1000e,id=nic1,bus=rp1",
    "-device", "pcie-pci-bridge,id=ppb,bus=pcie.0,addr=3.0",
    "-device", "e1000,id=legacy1,bus=ppb,addr=1.0",
    "-device", "e1000,id=legacy2,bus=ppb,addr=2.0",
    "-device", "pci-bridge,id=pb,chassis_nr=2,bus=ppb,addr=3.0",
    "-device", "e1000,id=deep,bus=pb,addr=4.0",
    "-device", "pxb-pcie,id=pxb,bus_nr=100,bypass_iommu=true,bus=pcie.0,addr=4.0",
    "-device", "pcie-root-port,id=rp2,chassis=3,bus=pxb",
    "-device", "virtio-net-pci,id=vnbypass,bus=rp2,disable-legacy=on",
    "-device", "virtio-net-pci,id=vnon,bus=pcie.0,addr=5.0,disable-legacy=on,iommu_platform=on",
    "-device", "virtio-net-pci,id=vnoff,bus=pcie.0,addr=6.0,disable-legacy=on",
]

I440FX_PCI_BRIDGE = [
    "-S", "-M", "pc", "-m", "64",
    "-device", "virtio-iommu-pci,id=viommu,addr=4.0",
    "-device", "pci-bridge,id=pb,chassis_nr=1,addr=5.0",
    "-device", "e1000,id=behind1,bus=pb,addr=1.0",
    "-device", "e1000,id=behind2,bus=pb,addr=2.0",
    "-device", "i82801b11-bridge,id=dmi,addr=1e.0",
    "-device", "e1000,id=behinddmi,bus=dmi,addr=3.0",
]
