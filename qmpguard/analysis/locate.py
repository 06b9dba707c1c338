"""Where every PCI bus and device of `info qtree` lives in the QOM tree.

`info qtree` (one command) shows every device with its type, id, `addr` and buses; QOM
paths are derived from it: a named device is /machine/peripheral/<id>, a bus is
<owner's path>/<bus name>, a host bridge is matched to its container entry by type and
creation order. Only anonymous devices need QOM reads: their bus's `child[N]` links.
`locate` is pure: it returns what it could place and the reads still missing, so the
collector can ask for exactly those and the analysis can replay them from a snapshot.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from qmpguard import qemu_names as T
from qmpguard.analysis.qtree import QtreeBus, QtreeDevice, TypeFacts, parse_device_tree, type_facts
from qmpguard.analysis.shape import ReplyShapeError, qom_list
from qmpguard.analysis.topology import PciBus, PciDevice, Topology
from qmpguard.qemu_names import HMP_QTREE, child_type, link_type
from qmpguard.snapshot import Snapshot

PERIPHERAL = "/machine/peripheral/"
Read = tuple[str, dict[str, Any]]


@dataclass
class Location:
    """The topology placed so far, and the QOM reads that would place the rest."""

    facts: TypeFacts
    topology: Topology = field(default_factory=Topology)
    missing: list[Read] = field(default_factory=list)


@dataclass(frozen=True)
class PendingBus:
    """A qtree PCI bus waiting to be placed, with what its owner tells about it.

    Root buses get `bypass_iommu` from their host bridge; an expander's root bus learns its
    `parent_device` (the pxb device) only once the walk places that device.
    """

    path: str
    qbus: QtreeBus
    root: bool = False
    bypass_iommu: bool = False
    parent_device: str | None = None
    expander: bool = False  # the root bus of a pxb's host, not the machine's own


def locate(snap: Snapshot) -> Location:
    """Place qtree's PCI buses and devices at their QOM paths (pure).

    Breadth-first from the host bridges' root buses: a bus is placed, then its devices in
    creation order, and the PCI buses those devices own are placed after the buses already
    waiting. An anonymous device whose bus listing or link is not read yet is left out, with
    the read in `missing`.
    """
    named = qom_list(snap, PERIPHERAL[:-1])
    root = device_tree(snap, named)
    loc = Location(type_facts(root))
    peripheral = {f"{PERIPHERAL}{n}": child_type(t) for n, t in named}
    roots = root_buses(root, loc.facts, _host_candidates(snap, loc.facts.host_bridge))
    loc.topology.main_root = main_root(roots)
    expanders = _pair_expanders(root, [b.path for b in roots if b.expander])
    walk = _Walk(snap, loc, peripheral, expanders)
    queue = deque(roots)
    while queue:
        queue.extend(walk.place_bus(queue.popleft()))
    return loc


def device_tree(snap: Snapshot, named: list[tuple[str, str]]) -> QtreeBus:
    """The parsed `info qtree`; the ids QOM lists as peripherals help parse odd ids."""
    text = snap.get_or(None, "human-monitor-command", **{"command-line": HMP_QTREE})
    root = parse_device_tree(text, frozenset(n for n, _ in named))
    if root is None:
        raise ReplyShapeError("info qtree missing or not in a known format")
    return root


def container_index(path: str) -> int:
    """N of a container entry named like 'pci-host[N]' (-1 without one: it sorts first)."""
    m = re.search(r"\[(\d+)\]$", path)
    return int(m.group(1)) if m else -1


def _host_candidates(snap: Snapshot, host_types: frozenset[str]) -> dict[str, list[str]]:
    """Container entries per host type, in creation order (/machine's own first)."""
    out: dict[str, list[str]] = {}
    for container in T.OBJECT_CONTAINERS:
        entries = []
        for name, etype in qom_list(snap, container):
            ctype = child_type(etype)
            if ctype in host_types:
                entries.append((ctype, f"{container}/{name}"))
        for ctype, path in sorted(entries, key=lambda e: container_index(e[1])):
            out.setdefault(ctype, []).append(path)
    return out


def root_buses(
    root: QtreeBus, facts: TypeFacts, candidates: dict[str, list[str]]
) -> list[PendingBus]:
    """The host bridges' PCI root buses, in the hosts' creation order (qtree's order)."""
    out = []
    for host in root.devices:
        pci = pci_buses(host, facts)
        if not pci:
            continue
        host_path = claim_host_path(host.type, candidates)
        for bus in pci:
            out.append(
                PendingBus(
                    f"{host_path}/{bus.name}",
                    bus,
                    root=True,
                    bypass_iommu=bypasses_iommu(host),
                    expander=is_expander_host(host.type),
                )
            )
    return out


def pci_buses(dev: QtreeDevice, facts: TypeFacts) -> list[QtreeBus]:
    """The buses of `dev` that are PCI buses (a host's or bridge's; not ISA, USB, virtio)."""
    return [b for b in dev.buses if b.type in facts.pci_bus]


def claim_host_path(host_type: str, candidates: dict[str, list[str]]) -> str:
    """The QOM path of the next host bridge of `host_type`, taken from `candidates`.

    Hosts of one type are matched in creation order: qtree lists them in that order and
    `_host_candidates` sorts the container entries the same way.
    """
    paths = candidates.get(host_type, [])
    if not paths:
        raise ReplyShapeError(f"host bridge {host_type} not found in QOM")
    return paths.pop(0)


def bypasses_iommu(host: QtreeDevice) -> bool:
    """Whether the host bridge's bypass-iommu property keeps its buses off the vIOMMU."""
    return host.props.get("bypass-iommu") == "true"


def is_expander_host(host_type: str) -> bool:
    """Whether a host bridge is one a pxb device created (QEMU's pxb-host, pxb-cxl-host)."""
    return host_type.startswith("pxb")


def main_root(roots: list[PendingBus]) -> str | None:
    """The machine's own root bus: the first one that is not an expander's."""
    return next((b.path for b in roots if not b.expander), None)


def _pair_expanders(root: QtreeBus, pxb_roots: list[str]) -> dict[int, str]:
    """Each pxb device (by object identity) -> the root bus of the host it created.

    An expander's root bus hangs off a host object; QEMU sets its parent_dev to the pxb
    device, which creates that host in its own realize: hosts and pxb devices pair up in
    creation order. (Bus names do not identify them: a conventional pxb's root bus is
    always "pxb-internal", its id names the internal bridge's secondary bus.) pxb devices
    sit on root buses and cannot be hot-plugged, so their order in qtree (per bus, creation
    order) is their realize order, the order their hosts were created in.
    """
    pxbs = [d for d in _all_devices(root) if d.type in T.PXB_TYPES]
    if len(pxbs) != len(pxb_roots):
        raise ReplyShapeError(f"{len(pxbs)} expander devices but {len(pxb_roots)} expander hosts")
    return {id(dev): bus for dev, bus in zip(pxbs, pxb_roots, strict=True)}


def _all_devices(bus: QtreeBus) -> list[QtreeDevice]:
    """Every device below `bus`, depth first, each bus's devices in qtree's order."""
    out = []
    for dev in bus.devices:
        out.append(dev)
        for child in dev.buses:
            out += _all_devices(child)
    return out


@dataclass
class _Walk:
    """The state of one placement: what is placed, and which expander root is whose."""

    snap: Snapshot
    loc: Location
    peripheral: dict[str, str | None]  # /machine/peripheral/<id> -> type, as QOM lists them
    expander_root_of: dict[int, str]  # id(pxb device) -> its host's root bus
    # expander root bus -> its pxb device, for buses still waiting when the device is placed
    parents: dict[str, str] = field(default_factory=dict)

    def place_bus(self, pending: PendingBus) -> list[PendingBus]:
        """Place one bus and the devices on it; the PCI buses those devices own, to place."""
        topo, facts = self.loc.topology, self.loc.facts
        path = pending.path
        parent = self.parents.get(path, pending.parent_device)
        topo.buses[path] = _bus(pending, parent, facts)
        links = _BusLinks(self.snap, path, self.loc)
        members: list[str] = []
        below: list[PendingBus] = []
        for index, qdev in enumerate(pending.qbus.devices):
            dev_path = named_path(qdev, self.peripheral) or links.path_of(index, qdev)
            if dev_path is None:
                continue
            topo.devices[dev_path] = _device(dev_path, qdev, path, index, facts)
            members.append(dev_path)
            below += child_buses(dev_path, qdev, facts)
            self._adopt_expander_root(qdev, dev_path)
        topo.buses[path] = replace(topo.buses[path], devices=tuple(members))
        return below

    def _adopt_expander_root(self, qdev: QtreeDevice, dev_path: str) -> None:
        """Make a just-placed pxb device the parent of its host's root bus.

        The root bus may be placed already (its host came first in qtree) or still waiting.
        """
        target = self.expander_root_of.get(id(qdev))
        if target is None:
            return
        self.parents[target] = dev_path
        buses = self.loc.topology.buses
        if target in buses:
            buses[target] = replace(buses[target], parent_device=dev_path)


def _bus(pending: PendingBus, parent: str | None, facts: TypeFacts) -> PciBus:
    """The placed bus, still without its devices."""
    express = pending.qbus.type in facts.express_bus
    return PciBus(
        pending.path, pending.qbus.type, express, pending.root, pending.bypass_iommu, parent
    )


def named_path(qdev: QtreeDevice, peripheral: dict[str, str | None]) -> str | None:
    """/machine/peripheral/<id> for a device with an id QOM confirms (same id, same type).

    None for an anonymous device, and for an id QOM does not confirm (qtree's id text can be
    ambiguous): those are resolved through their bus's child[N] link instead.
    """
    if not qdev.id:
        return None
    path = f"{PERIPHERAL}{qdev.id}"
    return path if peripheral.get(path) == qdev.type else None


def child_buses(dev_path: str, qdev: QtreeDevice, facts: TypeFacts) -> list[PendingBus]:
    """The PCI buses a placed device owns (a bridge's secondary bus), to place later."""
    return [
        PendingBus(f"{dev_path}/{b.name}", b, parent_device=dev_path)
        for b in pci_buses(qdev, facts)
    ]


def _device(path: str, qdev: QtreeDevice, bus: str, index: int, facts: TypeFacts) -> PciDevice:
    """One placed device; `hotplugged` is read separately (see topology.with_hotplug)."""
    devfn = qdev.devfn
    if devfn is None:
        raise ReplyShapeError(f"no addr for PCI device {path} in info qtree")
    virtio = qdev.type in facts.virtio_pci
    return PciDevice(
        path=path,
        id=path[len(PERIPHERAL) :] if path.startswith(PERIPHERAL) else None,
        type=qdev.type,
        bus=bus,
        devfn=devfn,
        creation_index=index,
        hotplugged=None,
        vfio=facts.is_vfio(qdev.type),
        virtio=virtio,
        iommu_platform=qdev.iommu_platform if virtio else None,
        pcie_to_pci_bridge=qdev.type in T.PCIE_TO_PCI_BRIDGE_TYPES,
        viommu_kind=T.VIOMMU_TYPES.get(qdev.type),
        bridge=is_bridge(qdev, facts),
    )


def is_bridge(qdev: QtreeDevice, facts: TypeFacts) -> bool:
    """A device that forwards DMA rather than initiating it: it owns a PCI bus, or is a pxb."""
    return bool(pci_buses(qdev, facts)) or qdev.type in T.PXB_TYPES


class _BusLinks:
    """The child[N] links of one bus, read on the first anonymous device that needs them."""

    def __init__(self, snap: Snapshot, bus: str, loc: Location) -> None:
        self._snap, self._bus, self._loc = snap, bus, loc
        self._links: list[tuple[int, str]] | None = None

    def path_of(self, index: int, qdev: QtreeDevice) -> str | None:
        """QOM path of the bus's `index`-th device; None (and a read in missing) if unread.

        An unread listing is asked for again by each anonymous device that needs it.
        """
        if self._links is None:
            self._links = _links(self._snap, self._bus, self._loc)
        if self._links is None:
            return None
        return _resolve_link(self._snap, self._bus, self._links, index, qdev, self._loc)


def _links(snap: Snapshot, bus: str, loc: Location) -> list[tuple[int, str]] | None:
    """child[N] links of a bus as (N, type), in creation order; None (and a read) if unread."""
    reply = snap.get_or(None, "qom-list", path=bus)
    if reply is None:
        loc.missing.append(("qom-list", {"path": bus}))
        return None
    out = []
    for name, etype in qom_list(snap, bus):
        m = re.fullmatch(r"child\[(\d+)\]", name)
        ltype = link_type(etype)
        if m and ltype:
            out.append((int(m.group(1)), ltype))
    return sorted(out)


def _resolve_link(
    snap: Snapshot,
    bus: str,
    links: list[tuple[int, str]],
    index: int,
    qdev: QtreeDevice,
    loc: Location,
) -> str | None:
    """The path the bus's `index`-th child link points at; None (and a read) if unread.

    qtree and the links list a bus's devices in the same (creation) order; a type that
    differs means the two replies disagree, which no snapshot of one VM can show.
    """
    if index >= len(links) or links[index][1] != qdev.type:
        raise ReplyShapeError(f"{bus}: qtree and QOM disagree on device {index} ({qdev.type})")
    prop = f"child[{links[index][0]}]"
    value = snap.get_or(None, "qom-get", path=bus, property=prop)
    if value is None:
        loc.missing.append(("qom-get", {"path": bus, "property": prop}))
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ReplyShapeError(f"qom-get {bus} {prop}: link is not a path")
    return value
