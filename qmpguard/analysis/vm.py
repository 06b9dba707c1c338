"""Analyse one snapshot: topology, vIOMMUs, bindings, order, verdicts and findings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qmpguard.analysis.binding import ExpectedBinding, expected_binding
from qmpguard.analysis.findings import RULES, Finding
from qmpguard.analysis.model import NO_ORDER, BindingKind, OrderEvidence, Relative, Verdict
from qmpguard.analysis.mtree import parse_mtree_f
from qmpguard.analysis.order import order_context, order_of
from qmpguard.analysis.reads import placed_topology
from qmpguard.analysis.topology import PciDevice, Topology
from qmpguard.analysis.viommu import VIommu, find_viommus
from qmpguard.qemu_types import HMP_MTREE
from qmpguard.snapshot import Snapshot


@dataclass(frozen=True)
class DeviceAnalysis:
    """One PCI device with its expected binding, order evidence and verdict."""

    device: PciDevice
    binding: ExpectedBinding
    order: OrderEvidence
    verdict: Verdict
    bdf: str | None


@dataclass(frozen=True)
class VmAnalysis:
    """Everything qmpguard concludes about one VM."""

    snapshot: Snapshot
    topology: Topology
    viommus: list[VIommu]
    devices: list[DeviceAnalysis]
    findings: list[Finding]


_BY_ORDER = {
    Relative.BEFORE: Verdict.MISBOUND,
    Relative.AFTER: Verdict.OK,
    Relative.UNKNOWN: Verdict.UNVERIFIED,
}


def _verdict(dev: PciDevice, binding: ExpectedBinding, order: OrderEvidence) -> Verdict:
    if not dev.vfio:
        return Verdict.NOT_APPLICABLE
    if binding.kind is BindingKind.MEMORY:
        return Verdict.OK
    return _BY_ORDER[order.relative]


def guest_bdfs(snap: Snapshot, topo: Topology) -> dict[str, str]:
    """Guest-visible BDFs from query-pci, for devices the firmware has numbered.

    query-pci has no QOM paths; devices are matched by qdev id, which only named
    devices have. Anonymous devices on the main root bus are matched by devfn.
    """
    reply = snap.get_or([], "query-pci")
    out: dict[str, str] = {}
    if not isinstance(reply, list):
        return out
    by_id = {d.id: d for d in topo.devices.values() if d.id}
    root_by_devfn = {d.devfn: d for d in topo.devices.values() if d.bus == topo.main_root}

    def walk(bus_no: int, devices: object) -> None:
        if not isinstance(devices, list):
            return
        for entry in devices:
            if not isinstance(entry, dict):
                continue
            slot, fn, qid = entry.get("slot"), entry.get("function"), entry.get("qdev_id")
            if not isinstance(slot, int) or not isinstance(fn, int):
                continue
            dev = by_id.get(qid) if isinstance(qid, str) and qid else None
            if dev is None and bus_no == 0:
                dev = root_by_devfn.get((slot << 3) | fn)
            if dev is not None:
                out[dev.path] = f"{bus_no:02x}:{slot:02x}.{fn}"
            bridge = entry.get("pci_bridge")
            if isinstance(bridge, dict):
                sec = (
                    bridge.get("bus", {}).get("secondary")
                    if isinstance(bridge.get("bus"), dict)
                    else None
                )
                if isinstance(sec, int) and sec > 0:
                    walk(sec, bridge.get("devices"))

    for bus in reply:
        if isinstance(bus, dict) and isinstance(bus.get("bus"), int):
            walk(bus["bus"], bus.get("devices"))
    return out


def analyze(snap: Snapshot) -> VmAnalysis:
    """Pure: a Snapshot in, every verdict and finding out."""
    topo = placed_topology(snap)
    viommus = find_viommus(snap, topo)
    bindings = {p: expected_binding(topo, viommus, d) for p, d in topo.devices.items()}
    mtree = parse_mtree_f(snap.get_or("", "human-monitor-command", **{"command-line": HMP_MTREE}))
    ctx = order_context(snap, topo, bindings, mtree)
    bdfs = guest_bdfs(snap, topo)
    devices = []
    for path, dev in topo.devices.items():
        binding = bindings[path]
        order = order_of(ctx, dev) if binding.kind is BindingKind.VIOMMU else NO_ORDER
        devices.append(
            DeviceAnalysis(dev, binding, order, _verdict(dev, binding, order), bdfs.get(path))
        )
    devices.sort(key=lambda d: (d.device.bus, d.device.devfn))
    vm = VmAnalysis(snap, topo, viommus, devices, [])
    version = f"QEMU {snap.qemu_version or 'version unknown'} ({snap.transport})"
    findings = [replace(f, evidence=(*f.evidence, version)) for rule in RULES for f in rule(vm)]
    return VmAnalysis(snap, topo, viommus, devices, findings)
