"""PCI topology from QOM: buses, bridges, devices (parent bus, type, devfn)."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmpguard import qemu_types as T
from qmpguard.analysis.cmdline import parse_cmdline
from qmpguard.analysis.locate import locate
from qmpguard.analysis.shape import ReplyShapeError, qom_get, qom_list
from qmpguard.qemu_types import child_type
from qmpguard.snapshot import Snapshot

_PERIPHERAL = "/machine/peripheral/"


def format_devfn(devfn: int) -> str:
    """devfn 0x48 -> '09.0'."""
    return f"{devfn >> 3:02x}.{devfn & 7}"


@dataclass(frozen=True)
class PciBus:
    """One PCI bus, by QOM path."""

    path: str
    type: str
    express: bool
    owner: str  # QOM path of the host bridge (root buses) or the bridge device
    root: bool
    bypass_iommu: bool  # root buses: the host bridge's bypass-iommu; others: False
    parent_device: str | None  # bridge device, or the pxb device for an expander root bus
    devices: tuple[str, ...] = ()  # in creation order (child[N] order)


@dataclass(frozen=True)
class PciDevice:
    """One PCI device, by QOM path."""

    path: str
    id: str | None
    type: str
    bus: str
    devfn: int
    creation_index: int  # N of child[N] on its bus: creation order per bus
    hotplugged: bool | None
    vfio: bool
    virtio: bool
    iommu_platform: bool | None
    pcie_to_pci_bridge: bool
    viommu_kind: str | None
    bridge: bool = False  # a PCI bridge or expander: forwards DMA, never initiates it

    @property
    def devfn_text(self) -> str:
        return format_devfn(self.devfn)

    @property
    def label(self) -> str:
        return self.id or self.path


@dataclass(frozen=True)
class Topology:
    """Buses and devices of one VM."""

    machine_type: str | None
    buses: dict[str, PciBus] = field(default_factory=dict)
    devices: dict[str, PciDevice] = field(default_factory=dict)
    main_root: str | None = None

    def root_of(self, bus_path: str) -> PciBus:
        """The root bus above `bus_path` (the bus itself if it is a root)."""
        bus = self.buses[bus_path]
        seen = set()
        while not bus.root and bus.parent_device and bus.path not in seen:
            seen.add(bus.path)
            bus = self.buses[self.devices[bus.parent_device].bus]
        return bus

    def is_descendant(self, bus_path: str, ancestor: str) -> bool:
        """True if `bus_path` sits (transitively) behind `ancestor`."""
        bus = self.buses[bus_path]
        seen = set()
        while bus.parent_device and bus.path not in seen:
            seen.add(bus.path)
            bus = self.buses[self.devices[bus.parent_device].bus]
            if bus.path == ancestor:
                return True
        return False


def _device_id(path: str) -> str | None:
    if path.startswith(_PERIPHERAL) and "/" not in path[len(_PERIPHERAL) :]:
        return path[len(_PERIPHERAL) :]
    return None


def _machine_type(snap: Snapshot) -> str | None:
    for name, etype in qom_list(snap, "/"):
        if name == "machine":
            return child_type(etype)
    return None


def is_builtin(path: str) -> bool:
    """Created by the machine itself (not by -device or device_add): never hot-plugged."""
    return not path.startswith("/machine/peripheral")


def build_topology(snap: Snapshot) -> Topology:
    """Topology from the snapshot: `info qtree` placed at QOM paths (see locate)."""
    loc = locate(snap)
    if loc.missing:
        raise ReplyShapeError(
            f"snapshot lacks {len(loc.missing)} QOM read(s), e.g. "
            f"{loc.missing[0][0]} {loc.missing[0][1]}"
        )
    facts = loc.facts
    cli_ids = (
        {d.id for d in parse_cmdline(snap.cmdline, snap.files).devices if d.id}
        if snap.cmdline
        else set()
    )
    topo = Topology(machine_type=_machine_type(snap), main_root=loc.main_root)
    for path, b in loc.buses.items():
        members = sorted(
            (d for d in loc.devices.values() if d.bus == path), key=lambda d: d.creation_index
        )
        topo.buses[path] = PciBus(
            path=path,
            type=b.qbus.type,
            express=b.qbus.type in facts.express_bus,
            owner=b.owner,
            root=b.root,
            bypass_iommu=b.bypass_iommu,
            parent_device=b.parent_device,
            devices=tuple(d.path for d in members),
        )
    for path, d in loc.devices.items():
        devfn = d.qdev.devfn
        if devfn is None:
            raise ReplyShapeError(f"no addr for PCI device {path} in info qtree")
        hotplugged = qom_get(snap, path, "hotplugged", bool)
        if hotplugged is None and (is_builtin(path) or _device_id(path) in cli_ids):
            hotplugged = False  # created by the machine, or by a -device option
        virtio = d.qdev.type in facts.virtio_pci
        topo.devices[path] = PciDevice(
            path=path,
            id=_device_id(path),
            type=d.qdev.type,
            bus=d.bus,
            devfn=devfn,
            creation_index=d.creation_index,
            hotplugged=hotplugged,
            vfio=facts.is_vfio(d.qdev.type),
            virtio=virtio,
            iommu_platform=d.qdev.iommu_platform if virtio else None,
            pcie_to_pci_bridge=d.qdev.type in T.PCIE_TO_PCI_BRIDGE_TYPES,
            viommu_kind=T.VIOMMU_TYPES.get(d.qdev.type),
            bridge=any(b.type in facts.pci_bus for b in d.qdev.buses) or d.qdev.type in T.PXB_TYPES,
        )
    return topo
