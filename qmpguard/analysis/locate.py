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


def _index(path: str) -> int:
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
        for ctype, path in sorted(entries, key=lambda e: _index(e[1])):
            out.setdefault(ctype, []).append(path)
    return out


def locate(snap: Snapshot) -> Location:
    """Place qtree's PCI buses and devices at their QOM paths (pure)."""
    text = snap.get_or(None, "human-monitor-command", **{"command-line": HMP_QTREE})
    named = qom_list(snap, PERIPHERAL[:-1])
    root = parse_device_tree(text, frozenset(n for n, _ in named))
    if root is None:
        raise ReplyShapeError("info qtree missing or not in a known format")
    facts = type_facts(root)
    loc = Location(facts)
    topo = loc.topology
    peripheral = {f"{PERIPHERAL}{n}": child_type(t) for n, t in named}
    candidates = _host_candidates(snap, facts.host_bridge)
    queue: list[tuple[str, QtreeBus, bool, bool, str | None]] = []
    pxb_roots: list[str] = []  # expander root buses, in their hosts' creation order
    for host in root.devices:  # creation order
        pci = [b for b in host.buses if b.type in facts.pci_bus]
        if not pci:
            continue
        paths = candidates.get(host.type, [])
        if not paths:
            raise ReplyShapeError(f"host bridge {host.type} not found in QOM")
        host_path = paths.pop(0)
        bypass = host.props.get("bypass-iommu") == "true"
        for bus in pci:
            path = f"{host_path}/{bus.name}"
            queue.append((path, bus, True, bypass, None))
            if host.type.startswith("pxb"):
                pxb_roots.append(path)
            elif topo.main_root is None:
                topo.main_root = path
    # An expander's root bus hangs off a host object; QEMU sets its parent_dev to the pxb
    # device, which creates that host in its own realize: hosts and pxb devices pair up in
    # creation order. (Bus names do not identify them: a conventional pxb's root bus is
    # always "pxb-internal", its id names the internal bridge's secondary bus.)
    pxb_root_of = _pair_expanders(root, pxb_roots)
    parents: dict[str, str] = {}
    while queue:
        path, qbus, is_root, bypass, parent = queue.pop(0)
        parent = parents.get(path, parent)
        express = qbus.type in facts.express_bus
        topo.buses[path] = PciBus(path, qbus.type, express, is_root, bypass, parent)
        members: list[str] = []
        listing = None
        for index, qdev in enumerate(qbus.devices):
            dev_path = f"{PERIPHERAL}{qdev.id}" if qdev.id else None
            if dev_path is not None and peripheral.get(dev_path) != qdev.type:
                dev_path = None  # an id QOM does not confirm: resolve through the link
            if dev_path is None:
                if listing is None:
                    listing = _links(snap, path, loc)
                if listing is None:
                    continue
                dev_path = _resolve_link(snap, path, listing, index, qdev, loc)
                if dev_path is None:
                    continue
            topo.devices[dev_path] = _device(dev_path, qdev, path, index, facts)
            members.append(dev_path)
            for child in qdev.buses:
                if child.type in facts.pci_bus:
                    queue.append((f"{dev_path}/{child.name}", child, False, False, dev_path))
            target = pxb_root_of.get(id(qdev))
            if target is not None:
                parents[target] = dev_path
                if target in topo.buses:
                    topo.buses[target] = replace(topo.buses[target], parent_device=dev_path)
        topo.buses[path] = replace(topo.buses[path], devices=tuple(members))
    return loc


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
        bridge=any(b.type in facts.pci_bus for b in qdev.buses) or qdev.type in T.PXB_TYPES,
    )


def _pair_expanders(root: QtreeBus, pxb_roots: list[str]) -> dict[int, str]:
    """Each pxb device (by object identity) -> the root bus of the host it created.

    pxb devices sit on root buses and cannot be hot-plugged, so their order in qtree (per
    bus, creation order) is their realize order, the order their hosts were created in.
    """
    pxbs = [d for d in _all_devices(root) if d.type in T.PXB_TYPES]
    if len(pxbs) != len(pxb_roots):
        raise ReplyShapeError(f"{len(pxbs)} expander devices but {len(pxb_roots)} expander hosts")
    return {id(dev): bus for dev, bus in zip(pxbs, pxb_roots, strict=True)}


def _all_devices(bus: QtreeBus) -> list[QtreeDevice]:
    out = []
    for dev in bus.devices:
        out.append(dev)
        for child in dev.buses:
            out += _all_devices(child)
    return out


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
