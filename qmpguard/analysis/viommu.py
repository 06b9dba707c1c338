"""Which vIOMMUs a VM has and which root buses each one translates."""

from __future__ import annotations

from dataclasses import dataclass

from qmpguard import qemu_types as T
from qmpguard.analysis.shape import qom_get, qom_list
from qmpguard.analysis.topology import Topology
from qmpguard.qemu_types import child_type
from qmpguard.snapshot import Snapshot


@dataclass(frozen=True)
class VIommu:
    """One vIOMMU and the root bus whose IOMMU ops it installs."""

    path: str
    type: str
    kind: str  # intel | amd | virtio | smmuv3 | riscv
    covers: str | None  # root bus path it translates, None if unknown
    machine_created: bool  # created with the machine, before every -device
    hotplugged: bool | None
    caching_mode: bool | None

    @property
    def label(self) -> str:
        tail = self.path.rsplit("/", 1)[-1]
        return tail if self.path.startswith("/machine/peripheral/") else self.path


def find_viommus(snap: Snapshot, topo: Topology) -> list[VIommu]:
    """vIOMMUs from QOM: sysbus ones in the containers, PCI ones on the buses."""
    found: list[VIommu] = []
    machine_iommu = qom_get(snap, "/machine", "iommu", str)
    for container in T.OBJECT_CONTAINERS:
        for name, etype in qom_list(snap, container):
            vtype = child_type(etype)
            if vtype not in T.VIOMMU_TYPES or vtype in T.PCI_VIOMMU_TYPES:
                continue
            path = f"{container}/{name}"
            primary = qom_get(snap, path, "primary-bus", str)
            machine_created = (
                vtype == "arm-smmuv3"
                and container == "/machine/unattached"
                and machine_iommu == "smmuv3"
            )
            covers = primary if primary else topo.main_root
            found.append(
                VIommu(
                    path=path,
                    type=vtype,
                    kind=T.VIOMMU_TYPES[vtype],
                    covers=covers,
                    machine_created=machine_created,
                    hotplugged=qom_get(snap, path, "hotplugged", bool),
                    caching_mode=qom_get(snap, path, "caching-mode", bool),
                )
            )
    for dev in topo.devices.values():
        if dev.type in T.PCI_VIOMMU_TYPES:
            found.append(
                VIommu(
                    path=dev.path,
                    type=dev.type,
                    kind=T.VIOMMU_TYPES[dev.type],
                    covers=dev.bus,
                    machine_created=False,
                    hotplugged=dev.hotplugged,
                    caching_mode=None,
                )
            )
    return sorted(found, key=lambda v: v.path)
