"""PCI topology from QOM: buses, bridges, devices (parent bus, type, devfn)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from qmpguard import qemu_types as T
from qmpguard.analysis.qtree import type_facts
from qmpguard.analysis.shape import ReplyShapeError, qom_get, qom_list
from qmpguard.qemu_types import HMP_QTREE, child_type, link_type
from qmpguard.snapshot import Snapshot

_CHILD_INDEX = re.compile(r"child\[(\d+)\]")
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
    if path.startswith(_PERIPHERAL) and "/" not in path[len(_PERIPHERAL):]:
        return path[len(_PERIPHERAL):]
    return None


def _index_in_path(path: str) -> int:
    m = re.search(r"\[(\d+)\][^\[]*$", path)
    return int(m.group(1)) if m else -1


def _machine_type(snap: Snapshot) -> str | None:
    for name, etype in qom_list(snap, "/"):
        if name == "machine":
            return child_type(etype)
    return None


def build_topology(snap: Snapshot) -> Topology:
    """Topology from the QOM replies in a snapshot."""
    facts = type_facts(snap.get_or(None, "human-monitor-command", **{"command-line": HMP_QTREE}))
    if facts is None:
        raise ReplyShapeError("info qtree missing or not in a known format")
    bus_types, express_types, host_types = facts.pci_bus, facts.express_bus, facts.host_bridge
    bridge_types, virtio_types = facts.bridge, facts.virtio_pci

    topo = Topology(machine_type=_machine_type(snap))
    hosts: list[tuple[str, str]] = []
    for container in T.OBJECT_CONTAINERS:
        for name, etype in qom_list(snap, container):
            ctype = child_type(etype)
            if ctype in host_types:
                hosts.append((f"{container}/{name}", ctype))
    pxb_hosts: list[tuple[str, str]] = []  # (root bus path, bus name)
    queue: list[tuple[str, str, str, bool, bool, str | None]] = []
    for host, htype in hosts:
        bypass = bool(qom_get(snap, host, "bypass-iommu", bool, False))
        for name, etype in qom_list(snap, host):
            btype = child_type(etype)
            if btype in bus_types:
                path = f"{host}/{name}"
                queue.append((path, btype, host, True, bypass, None))
                if htype.startswith("pxb"):
                    pxb_hosts.append((path, name))
                elif topo.main_root is None:
                    topo = Topology(topo.machine_type, topo.buses, topo.devices, path)

    # Creation order of the host objects (/machine/unattached/device[N]) = pxb realize order.
    pxb_hosts.sort(key=lambda item: _index_in_path(item[0]))
    pending_pxb: dict[str, str] = dict(pxb_hosts)
    while queue:
        path, btype, owner, root, bypass, parent = queue.pop(0)
        if path in topo.buses:
            continue
        members = []
        for name, etype in qom_list(snap, path):
            m = _CHILD_INDEX.fullmatch(name)
            dtype = link_type(etype)
            if not m or dtype is None:
                continue
            dpath = snap.get_or(None, "qom-get", path=path, property=name)
            if dpath is None:
                continue
            if not isinstance(dpath, str):
                raise ReplyShapeError(f"qom-get {path} {name}: link is not a path")
            members.append((int(m.group(1)), dpath, dtype))
        members.sort()
        topo.buses[path] = PciBus(
            path=path, type=btype, express=btype in express_types, owner=owner, root=root,
            bypass_iommu=bypass, parent_device=parent,
            devices=tuple(p for _, p, _ in members),
        )
        for index, dpath, dtype in members:
            addr = qom_get(snap, dpath, "addr", int)
            if addr is None:
                raise ReplyShapeError(f"no addr for PCI device {dpath}")
            virtio = dtype in virtio_types
            topo.devices[dpath] = PciDevice(
                path=dpath, id=_device_id(dpath), type=dtype, bus=path, devfn=addr & 0xFF,
                creation_index=index,
                # Devices outside /machine/peripheral* are created by the machine itself.
                hotplugged=(qom_get(snap, dpath, "hotplugged", bool)
                            if dpath.startswith("/machine/peripheral") else False),
                vfio=facts.is_vfio(dtype), virtio=virtio,
                iommu_platform=(
                    qom_get(snap, f"{dpath}/virtio-backend", "iommu_platform", bool)
                    if virtio else None
                ),
                pcie_to_pci_bridge=dtype in T.PCIE_TO_PCI_BRIDGE_TYPES,
                viommu_kind=T.VIOMMU_TYPES.get(dtype),
            )
            if dtype in bridge_types:
                for cname, cetype in qom_list(snap, dpath):
                    ctype = child_type(cetype)
                    if ctype in bus_types:
                        queue.append((f"{dpath}/{cname}", ctype, dpath, False, False, dpath))
            if dtype in T.PXB_TYPES:
                _attach_pxb(topo, queue, pending_pxb, dpath)
    return topo


def _attach_pxb(
    topo: Topology,
    queue: list[tuple[str, str, str, bool, bool, str | None]],
    pending: dict[str, str],
    pxb_path: str,
) -> None:
    """Link an expander bridge's root bus to the pxb device (QEMU sets bus->parent_dev).

    The root bus is named after the pxb's id; anonymous pxbs are matched in creation order.
    """
    dev_id = _device_id(pxb_path)
    match = next((b for b, n in pending.items() if dev_id and n == dev_id), None)
    if match is None and dev_id is None:
        anon = [b for b, n in pending.items() if n.startswith("pxb-")]
        match = anon[0] if anon else None
    if match is None:
        return
    del pending[match]
    for i, item in enumerate(queue):
        if item[0] == match:
            queue[i] = (*item[:5], pxb_path)
    if match in topo.buses:
        bus = topo.buses[match]
        topo.buses[match] = PciBus(**{**bus.__dict__, "parent_device": pxb_path})
